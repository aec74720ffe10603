"""The benchmark script runs end to end on one small case of each kind (conv, decoder, linear,
conv1d): every contender passes its correctness guard (outputs and source gradients against the
reference) and the JSON has what the README's tables are made from. Timings are not judged here;
they live in the benchmark's own output. The decoder, linear and conv1d guards are also checked to
reject wrong results, and the decoder's float64 reference to be the adjoint of the encoder's own
convolution."""

import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks", "bench.py")

CONTENDERS = ("plain", "fusedtie", "forum", "parametrize")
KINDS = ("conv", "decoder", "linear", "conv1d")
# The algorithm fusedtie's CPU path may run, per kind, on the end-to-end run's shapes.
ALGORITHMS = {
    "conv": ("depthwise", "library"),
    "decoder": ("library",),
    "linear": ("linear",),
    "conv1d": ("library", "gemm", "brgemm"),
}
SHAPE_NAMES = {
    "conv": "depthwise 3x3 b1",
    "decoder": "decoder 3x3 s2 b1",
    "linear": "linear 1024x4096 b1",
    "conv1d": "conv1d k2 s2 b1",
}


def test_quick_case_runs_and_reports(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        BENCH,
        "--shapes",
        ",".join(SHAPE_NAMES.values()),
        "--transforms",
        "tanh",
        "--reps",
        "4",
        "--warmup",
        "1",
        "--case-budget",
        "0.5",
        "--compile",
        "none",
        "--json",
        str(out),
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| plain ms |" in result.stdout  # the ratio table was printed
    table_rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert any(r.startswith("| depthwise 3x3 b1:") for r in table_rows)
    assert any(r.startswith("| decoder 3x3 s2 b1: 1x64x28x28 64->32 3x3 s2 p1 op1 -> 56x56") for r in table_rows)
    assert any(r.startswith("| linear 1024x4096 b1: 1x1024 1024->4096 |") for r in table_rows)
    assert any(r.startswith("| conv1d k2 s2 b1: 1x512x99 512->512 k2 s2 |") for r in table_rows)
    assert "Baseline (plain) of the decoder cases: nn.ConvTranspose2d" in result.stdout
    assert "Baseline (plain) of the linear cases: nn.Linear" in result.stdout
    assert "Baseline (plain) of the conv1d cases: nn.Conv1d" in result.stdout
    assert "worst fusedtie/plain: " in result.stdout and "worst fusedtie/forum: " in result.stdout
    assert "worst fusedtie/plain on linear at batch 1-8, CPU float32 (issue 17): " in result.stdout
    assert ("ABOVE TARGET in " in result.stdout) != ("every case within its targets" in result.stdout)
    report = json.loads(out.read_text())
    assert report["environment"]["torch"]
    info = report["environment"]["cpu_info"]
    assert info["vendor"] and info["blas"] in ("MKL", "other") and isinstance(info["gemm_under_auto"], bool)
    assert info["vendor"] in result.stdout.splitlines()[0]  # the header names the CPU's vendor
    assert report["targets"]["worst"] and isinstance(report["targets"]["missed"], list)
    assert report["settings"]["baseline"] == "plain"
    assert set(report["settings"]["baseline_by_kind"]) == set(KINDS)
    assert set(report["settings"]["guard_reference_by_kind"]) == set(KINDS)
    rows = {(r["kind"], r["mode"], r["contender"]) for r in report["results"]}
    for kind in KINDS:
        for contender in CONTENDERS:
            assert (kind, "inference", contender) in rows and (kind, "train", contender) in rows
        assert (kind, "inference", "fusedtie+cache") in rows and (kind, "train", "fusedtie+cache") not in rows
    for r in report["results"]:
        assert r["median_ms"] > 0 and r["ratio_to_plain"] > 0 and len(r["samples_ms"]) >= 4
        assert r["shape_params"]["kind"] == r["kind"] and r["device"] == "cpu"
        assert r["shape_name"] == SHAPE_NAMES[r["kind"]]
        # the algorithm fusedtie ran (auto's choice: the decoder's is always the library)
        assert r["fusedtie_cpu_algorithm"] in ALGORITHMS[r["kind"]]
        if r["kind"] == "decoder":
            assert r["shape_params"]["stride"] == 2 and r["shape_params"]["output_padding"] == 1
        if r["kind"] == "linear":
            assert r["shape_params"]["in_channels"] == 1024 and r["shape_params"]["out_channels"] == 4096
            assert r["shape_params"]["height"] is None and r["shape_params"]["kernel"] is None


# --- the decoder guard, in process ------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench():
    """The benchmark's modules, as bench.py imports them: loading bench.py by its path puts
    benchmarks/ on sys.path, and its siblings (cases, contenders, guard, bench_targets) come from
    there."""
    spec = importlib.util.spec_from_file_location("fusedtie_bench_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        yield types.SimpleNamespace(
            **{
                name: importlib.import_module(name)
                for name in ("fusedtie", "cases", "contenders", "guard", "bench_targets")
            }
        )
    finally:
        del sys.modules[spec.name]


def _small_decoder(bench, transform="tanh"):
    """A 2x4x5x5 -> 2x3x10x10 decoder (3x3, stride 2, padding 1, output_padding 1), its tie and h."""
    shape = bench.cases.ShapeCase(
        "decoder test", 2, 4, 3, 5, 5, 3, stride=2, padding=1, output_padding=1, kind=bench.cases.DECODER
    )
    torch.manual_seed(0)
    source = shape.source_layer(torch.device("cpu"), torch.float32)
    h = shape.input(torch.device("cpu"), torch.float32)
    tie = bench.contenders.make_decoder_tie(shape, source)
    return shape, tie, h, bench.guard.decoder_reference(tie, transform, h)


def test_decoder_reference_is_the_encoders_adjoint(bench):
    # <conv2d(u, f(W)), h> == <u, conv_transpose2d(h, f(W))> for every u: the reference (bias taken
    # off) is the transpose of the encoder's own convolution, f(W) = W**2 computed here.
    shape, tie, h, (y, _) = _small_decoder(bench, "square")
    assert y.dtype == torch.float64 and tuple(y.shape[2:]) == shape.output_hw() == (10, 10)
    w = tie.source.weight.detach().double() ** 2
    u = torch.randn(y.shape, dtype=torch.float64)
    s = tie.source
    lhs = (F.conv2d(u, w, None, s.stride, s.padding, s.dilation, s.groups) * h.double()).sum()
    rhs = (u * (y - tie.bias.detach().double()[None, :, None, None])).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode_name", ["inference", "train"])
def test_decoder_guard_passes_every_contender(bench, mode_name):
    _, tie, h, reference = _small_decoder(bench)
    mode = next(m for m in bench.cases.MODES if m.name == mode_name)
    runners = {
        c.name: c.build_decoder(tie, "tanh", mode.trains)
        for c in bench.contenders.CONTENDERS
        if c.name != bench.contenders.COMPILED and mode_name in c.modes
    }
    assert set(runners) == set(CONTENDERS) | ({"fusedtie+cache"} if mode_name == "inference" else set())
    for runner in runners.values():
        runner.open_scope()
    try:
        bench.guard.guard(runners, reference, h, mode)
    finally:
        for runner in runners.values():
            runner.close_scope()


class _WrongDecoder(torch.nn.Module):
    """conv_transpose2d with one thing wrong, chosen by `fault`."""

    def __init__(self, tie, fault):
        super().__init__()
        self.tie, self.fault = tie, fault

    def forward(self, h):
        s, b = self.tie.source, self.tie.bias
        w, op = torch.tanh(s.weight), self.tie.output_padding
        if fault := self.fault:
            if fault == "transform":
                w = s.weight**2
            elif fault == "output_padding":
                op = 0
            elif fault == "flipped":  # the kernel turned by 180 degrees: same shapes, other values
                w = w.flip(2, 3)
            elif fault == "derivative":  # the right output, f' = 1 instead of tanh's in backward
                w = torch.tanh(s.weight.detach()) + (s.weight - s.weight.detach())
        return F.conv_transpose2d(h, w, b, s.stride, s.padding, op, s.groups, s.dilation)


@pytest.mark.parametrize(
    "fault,mode_name",
    [("transform", "inference"), ("output_padding", "inference"), ("flipped", "inference"), ("derivative", "train")],
)
def test_decoder_guard_rejects_a_wrong_decoder(bench, fault, mode_name):
    _, tie, h, reference = _small_decoder(bench)
    mode = next(m for m in bench.cases.MODES if m.name == mode_name)
    good = bench.contenders.Runner(_WrongDecoder(tie, None), tie.leaves)
    bench.guard.guard({"good": good}, reference, h, mode)  # the unbroken module passes
    wrong = bench.contenders.Runner(_WrongDecoder(tie, fault), tie.leaves)
    with pytest.raises(bench.guard.GuardError):
        bench.guard.guard({"wrong": wrong}, reference, h, mode)


# --- the linear and conv1d guards, in process -----------------------------------------------------


def _small_layer(bench, kind, transform="tanh"):
    """A small source of the kind (nn.Linear(8, 5) on 3x8; nn.Conv1d(4, 3, 3, stride 2) on 2x4x12),
    its input and the guard's reference."""
    cases = bench.cases
    if kind == cases.LINEAR:
        shape = cases.ShapeCase("linear test", 3, 8, 5, None, None, None, kind=kind)
    else:
        shape = cases.ShapeCase("conv1d test", 2, 4, 3, None, 12, 3, stride=2, kind=kind)
    torch.manual_seed(0)
    source = shape.source_layer(torch.device("cpu"), torch.float32)
    x = shape.input(torch.device("cpu"), torch.float32)
    reference_of, _ = bench.guard.REFERENCES[kind]
    return source, x, reference_of(source, transform, x)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("mode_name", ["inference", "train"])
def test_layer_guard_passes_every_contender(bench, kind, mode_name):
    source, x, reference = _small_layer(bench, kind)
    assert reference[0].dtype == torch.float64 and [g.dtype for g in reference[1]] == [torch.float64] * 2
    mode = next(m for m in bench.cases.MODES if m.name == mode_name)
    runners = {
        c.name: c.build(source, "tanh", mode.trains)
        for c in bench.contenders.CONTENDERS
        if c.name != bench.contenders.COMPILED and mode_name in c.modes
    }
    assert set(runners) == set(CONTENDERS) | ({"fusedtie+cache"} if mode_name == "inference" else set())
    for runner in runners.values():
        runner.open_scope()
    try:
        if mode_name == "inference":
            bench.guard.check_cache_scope(runners)  # fusedtie+cache's tied layer alone is cached
        bench.guard.guard(runners, reference, x, mode)
    finally:
        for runner in runners.values():
            runner.close_scope()


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_cache_scope_check_sees_the_new_layers(bench, kind):
    # The `fusedtie` contender inside a scope of its own would be timed as fusedtie+cache.
    source, _, _ = _small_layer(bench, kind)
    tied = bench.contenders.build_fusedtie(source, "tanh", False)
    runners = {"fusedtie": tied}
    with bench.fusedtie.cached(tied.module), pytest.raises(bench.guard.ScopeError):
        bench.guard.check_cache_scope(runners)


class _WrongLayer(torch.nn.Module):
    """F.linear / F.conv1d with one thing wrong, chosen by `fault`."""

    def __init__(self, source, fault):
        super().__init__()
        self.source, self.fault = source, fault

    def forward(self, x):
        s = self.source
        w = torch.tanh(s.weight)
        if fault := self.fault:
            if fault == "transform":  # W itself, not f(W)
                w = s.weight
            elif fault == "flipped":  # the 1-d kernel reversed: same shapes, other values
                w = w.flip(-1)
            elif fault == "derivative":  # the right output, f' = 1 instead of tanh's in backward
                w = torch.tanh(s.weight.detach()) + (s.weight - s.weight.detach())
        if isinstance(s, torch.nn.Linear):
            return F.linear(x, w, s.bias)
        return F.conv1d(x, w, s.bias, s.stride, s.padding, s.dilation, s.groups)


@pytest.mark.parametrize(
    "kind,fault,mode_name",
    [
        ("linear", "transform", "inference"),
        ("linear", "transform", "train"),
        ("linear", "derivative", "train"),
        ("conv1d", "transform", "inference"),
        ("conv1d", "flipped", "inference"),
        ("conv1d", "derivative", "train"),
    ],
)
def test_layer_guard_rejects_a_wrong_result(bench, kind, fault, mode_name):
    source, x, reference = _small_layer(bench, kind)
    mode = next(m for m in bench.cases.MODES if m.name == mode_name)
    leaves = [source.weight, source.bias]
    good = bench.contenders.Runner(_WrongLayer(source, None), leaves)
    bench.guard.guard({"good": good}, reference, x, mode)  # the unbroken module passes
    wrong = bench.contenders.Runner(_WrongLayer(source, fault), leaves)
    with pytest.raises(bench.guard.GuardError):
        bench.guard.guard({"wrong": wrong}, reference, x, mode)


# --- the targets' check, on made-up records ----------------------------------------------------------


def _records(iqr=5.0, kind="conv", batch=1, **ratios):
    mode = ratios.pop("mode", "inference")
    case = {"mode": mode, "kind": kind, "shape_params": {"batch": batch}, "dtype": "float32", "device": "cpu"}
    out = {"plain": {"ratio_to_plain": 1.0, "iqr_pct": iqr, **case}}
    for name, ratio in ratios.items():
        out[name.replace("_cache", "+cache")] = {"ratio_to_plain": ratio, "iqr_pct": 1.0, **case}
    return out


def test_targets_flag_every_miss_and_name_the_worst(bench):
    targets = bench.bench_targets
    cases = {
        "a | inference": _records(fusedtie=1.04, fusedtie_cache=1.03, forum=1.10),  # cache misses 1.02
        "b | train": _records(fusedtie=1.30, forum=1.20, mode="train"),  # misses 1.05 and forum
        "c | inference": _records(fusedtie=0.90, fusedtie_cache=0.99, forum=1.50),  # within all
    }
    lines, misses = targets.summary(cases)
    assert lines[0] == "worst fusedtie/plain: 1.30 (b | train)"
    assert lines[1] == "worst fusedtie/forum: 1.08 (b | train)"
    assert lines[2] == "worst fusedtie+cache/plain: 1.03 (a | inference)"
    assert sorted((m.case, m.contender, m.against) for m in misses) == [
        ("a | inference", "fusedtie+cache", "plain"),
        ("b | train", "fusedtie", "forum"),
        ("b | train", "fusedtie", "plain"),
    ]
    assert targets.flagged("fusedtie", cases["b | train"]) and not targets.flagged("fusedtie", cases["a | inference"])
    # the cache's target covers inference only
    assert not targets.case_misses("t", _records(fusedtie_cache=1.5, mode="train"))
    # no linear case at batch 1-8: no line for issue 17's target
    assert not any("issue 17" in line for line in lines)


def test_issue17_linear_target_has_its_own_worst_line(bench):
    targets = bench.bench_targets
    label = "worst fusedtie/plain on linear at batch 1-8, CPU float32 (issue 17)"
    cases = {
        "l1 | train": _records(kind="linear", batch=1, fusedtie=1.04, forum=3.0, mode="train"),
        "l8 | inference": _records(kind="linear", batch=8, fusedtie=1.02, forum=3.0),
        "l64 | inference": _records(kind="linear", batch=64, fusedtie=1.30, forum=3.0),  # out of its scope
        "c | inference": _records(fusedtie=1.20, forum=3.0),
    }
    lines, misses = targets.summary(cases)
    assert f"{label}: 1.04 (l1 | train), within its 1.05" in lines
    assert lines[0] == "worst fusedtie/plain: 1.30 (l64 | inference)"
    cases["l8 | inference"] = _records(kind="linear", batch=8, fusedtie=1.10, forum=3.0)
    lines, misses = targets.summary(cases)
    assert f"{label}: 1.10 (l8 | inference), ABOVE its 1.05" in lines
    # a case under both fusedtie targets misses once
    assert [m.case for m in misses if m.case.startswith("l8")] == ["l8 | inference"]
    # on CUDA or in bfloat16 the universal target alone applies
    for other in ({"device": "cuda"}, {"dtype": "bfloat16"}):
        records = _records(kind="linear", batch=1, fusedtie=1.10)
        for record in records.values():
            record.update(other)
        lines, _ = targets.summary({"x | inference": records})
        assert not any("issue 17" in line for line in lines)


def test_cpu_passes_script_reports_every_shape():
    """benchmarks/cpu_passes.py (docs/cpu-algorithms.md's per-pass table) runs and prints a ratio
    per algorithm and pass for each of its shapes."""
    script = os.path.join(ROOT, "benchmarks", "cpu_passes.py")
    result = subprocess.run(
        [sys.executable, script, "--rounds", "2", "--algorithms", "library,brgemm"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| conv")]
    assert len(rows) == 6
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 7 and all(float(c) > 0 for c in cells[1:])


def test_cpu_network_script_reports_every_stack():
    """benchmarks/cpu_network.py (docs/cpu-algorithms.md's network table) runs and prints a ratio per
    algorithm for each of its stacks."""
    script = os.path.join(ROOT, "benchmarks", "cpu_network.py")
    result = subprocess.run(
        [sys.executable, script, "--rounds", "2", "--algorithms", "library,brgemm,auto", "--mode", "train"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| conv")]
    assert len(rows) == 3 and all(len(row.split("|")) == 7 for row in rows), result.stdout


def test_cpu_network_per_layer_table():
    """--per-layer adds each layer's median for every network of every stack (the table in
    docs/cpu-algorithms.md), and refuses training, where layers are not timed apart."""
    script = os.path.join(ROOT, "benchmarks", "cpu_network.py")
    command = [sys.executable, script, "--rounds", "2", "--algorithms", "library,brgemm", "--per-layer"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.count("|") == 7 and "layer" not in line]
    per_layer = [row for row in rows if row.startswith("| conv") and ("untied |" in row or "tied," in row)]
    assert len(per_layer) == 3 * 3, result.stdout  # three stacks x (untied, library, brgemm)
    for row in per_layer:
        cells = [cell.strip() for cell in row.strip("|").split("|")[2:]]
        assert all(float(cell.rstrip("*")) > 0 for cell in cells), row
        assert sum(cell.endswith("*") for cell in cells) == (0 if "untied |" in row else 1), row
    refused = subprocess.run(command + ["--mode", "train"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "--per-layer times forwards only" in refused.stderr
