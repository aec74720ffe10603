"""The CPU convolution algorithms (library = at::convolution, gemm = gemm_conv2d.cpp, depthwise =
depthwise_conv2d.cpp) against the float64 reference, forward and every gradient, and the rules for
when each may run.

The default ("auto") picks per shape, so the main grid exercises whichever auto picks; here each
algorithm is forced over geometries it accepts and ones it must hand back to the library.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from parity import run_case
from reference import reference_conv2d

import fusedtie

ALGORITHMS = ["library", "gemm", "brgemm"]
# Whether auto may take the GEMM path in this process (MKL on an Intel CPU at full speed; not on AMD).
GEMM_UNDER_AUTO = fusedtie.cpu_info()["gemm_under_auto"]
AUTO_GEMM = "gemm" if GEMM_UNDER_AUTO else "library"
# auto's backward for float32 pointwise convs (batch <= 8) and the weight-heaviest im2col shapes:
# brgemm wherever oneDNN's micro-kernel runs, else the GEMM's rule; their forward follows the GEMM's rule.
BRGEMM_UNDER_AUTO = fusedtie.cpu_info()["brgemm_micro_kernel"]
AUTO_BACKWARD = "brgemm" if BRGEMM_UNDER_AUTO else AUTO_GEMM
# auto's forward for a float32 f other than identity whose weight has >= 10000x more elements than
# batch * output positions (pointwise or not): brgemm where the micro-kernel runs.
AUTO_HEAVY_FORWARD = "brgemm" if BRGEMM_UNDER_AUTO else AUTO_GEMM
GEOMETRIES = [  # (kernel, batch, stride, padding, hw)
    ((1, 1), 1, 1, 0, (7, 7)),
    ((1, 1), 3, 2, 0, (9, 8)),
    ((3, 3), 1, 1, 1, (7, 7)),
    ((3, 3), 2, 2, 1, (9, 8)),
    ((5, 4), 1, 1, "same", (9, 8)),  # asymmetric padding: padded explicitly, then the GEMM
    ((3, 1), 1, (2, 1), (0, 2), (6, 5)),
    ((3, 3), 0, 1, 1, (5, 5)),  # empty batch
    ((1, 1), 3, 1, 0, (5, 4)),  # pointwise, batch in one GEMM (the images' columns side by side)
    ((1, 1), 2, 1, 0, (33, 32)),  # pointwise, >= 1024 outputs: one GEMM per image, read in place
    ((3, 3), 2, 1, 1, (32, 32)),  # im2col, >= 1024 outputs: one GEMM per image
]
DILATED = [((3, 3), 2, 1, 2, (9, 8)), ((2, 3), 1, 2, 1, (9, 8))]  # dilation 2


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("transform,bias_mode", [("square", "identity"), ("tanh", "transform"), ("exp", "none")])
def test_forced_algorithm_matches_reference(algorithm, geometry, transform, bias_mode):
    kernel, batch, stride, padding, hw = geometry
    with fusedtie.use_cpu_conv_algorithm(algorithm):
        run_case(transform, bias_mode, kernel, batch=batch, hw=hw, stride=stride, padding=padding)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("geometry", DILATED, ids=str)
def test_forced_algorithm_with_dilation(algorithm, geometry):
    kernel, batch, stride, padding, hw = geometry
    with fusedtie.use_cpu_conv_algorithm(algorithm):
        run_case("sigmoid", "transform", kernel, batch=batch, hw=hw, stride=stride, padding=padding, dilation=2)


# float32 shapes that cross the brgemm path's tiles: output channels across and off its 64-channel
# blocks, depth (cin * kh * kw) across and off its 256-deep packed tiles, a batch's images side by
# side, and positions split between threads (one channel block, three threads).
BRGEMM_TILE_EDGES = [  # (batch, cin, cout, kernel, hw, padding, threads)
    (1, 37, 130, (3, 3), (11, 9), 1, None),
    (1, 300, 40, (1, 1), (9, 9), 0, 3),
    (3, 29, 70, (3, 3), (5, 5), 1, None),
    (1, 16, 8, (3, 3), (13, 13), 0, 3),
]


@pytest.mark.parametrize("case", BRGEMM_TILE_EDGES, ids=str)
@pytest.mark.parametrize("transform,bias_mode", [("square", "identity"), ("tanh", "transform"), ("exp", "none")])
def test_brgemm_float32_across_its_tile_edges(case, transform, bias_mode):
    batch, cin, cout, kernel, hw, padding, threads = case
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        with fusedtie.use_cpu_conv_algorithm("brgemm"):
            run_case(transform, bias_mode, kernel, batch, cin, cout, hw, padding=padding, dtype=torch.float32)
            x = torch.randn(batch, cin, *hw, requires_grad=True)
            w = torch.randn(cout, cin, *kernel, requires_grad=True)
            names, _ = ops_run(lambda: fusedtie.tied_conv2d(x, w, None, transform, padding=padding).sum().backward())
    finally:
        torch.set_num_threads(previous)
    assert algorithm_used(names) == "brgemm"  # the path under test, not a hand-back to the library


def test_brgemm_scratch_across_sizes():
    """The brgemm path keeps its column matrix, output and tiles in per-thread scratch between calls
    (csrc/cpu/scratch.h): calls that grow, shrink and exceed what it keeps (16 MiB, then a buffer of
    its own) must each see only their own data, the padding's zeros included."""
    sizes = [  # (batch, cin, cout, kernel, hw, padding); the second's columns are 23 MiB, over the kept
        (1, 8, 8, (3, 3), (7, 7), 1),
        (1, 64, 16, (3, 3), (100, 100), 1),
        (1, 128, 70, (3, 3), (15, 15), 1),
        (2, 3, 5, (3, 3), (6, 6), 1),
        (1, 128, 70, (1, 1), (15, 15), 0),
    ]
    torch.manual_seed(0)
    with fusedtie.use_cpu_conv_algorithm("brgemm"):
        for batch, cin, cout, kernel, hw, padding in sizes:
            x = torch.randn(batch, cin, *hw, requires_grad=True)
            w = (torch.randn(cout, cin, *kernel) * 0.5).requires_grad_(True)
            b = torch.randn(cout, requires_grad=True)
            ref_out, ref_grads = reference_conv2d(x, w, b, "square", "square", padding=padding)
            out = fusedtie.tied_conv2d(x, w, b, "square", "square", padding=padding)
            grad_out = torch.randn(ref_out.shape, dtype=torch.float64)
            grads = torch.autograd.grad(out, (x, w, b), grad_out.float())
            # float32 sums of up to 10^4 terms: tolerances scale with each result's largest value
            for got, want in zip((out, *grads), (ref_out, *ref_grads(grad_out))):
                torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_brgemm_scratch_is_per_thread():
    """Two Python threads running brgemm convolutions of different sizes at once: each thread's
    scratch is its own, so every result matches its float64 reference."""
    import threading

    torch.manual_seed(0)
    cases = []
    for cin, hw in ((32, (9, 9)), (48, (13, 11))):
        x, w = torch.randn(1, cin, *hw), torch.randn(24, cin, 3, 3) * 0.2
        expected = torch.nn.functional.conv2d(x.double(), w.double().square(), padding=1)
        cases.append((x, w, expected))
    errors = []

    def work(x, w, expected):
        try:
            for _ in range(40):
                with torch.no_grad():
                    out = fusedtie.tied_conv2d(x, w, None, "square", padding=1)
                torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
        except Exception as error:  # reported below, from the main thread
            errors.append(error)

    # The setting is process-wide (as torch.backends flags are): set once, around both threads.
    with fusedtie.use_cpu_conv_algorithm("brgemm"):
        threads = [threading.Thread(target=work, args=case) for case in cases]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_brgemm_packing_under_each_cpu_capability(capability):
    """The packing (f and a transpose in one pass) is compiled per instruction set; the tests above
    run the widest this CPU has, so the narrower ones run here, in a child process each."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "tile_edges"],
        cwd=os.path.dirname(__file__),
        env={**os.environ, "ATEN_CPU_CAPABILITY": capability},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"{3 * len(BRGEMM_TILE_EDGES)} passed" in result.stdout, result.stdout[-3000:]


@pytest.mark.parametrize("case", [dict(groups=2), dict(layout="channels_last"), dict(layout="non_contiguous")], ids=str)
def test_gemm_hands_unsupported_cases_to_the_library(case):
    # groups and non-NCHW layouts are outside the GEMM path; these must still be right.
    with fusedtie.use_cpu_conv_algorithm("gemm"):
        run_case("square", "identity", (3, 3), batch=1, padding=1, **case)


def test_both_algorithms_match_the_reference_in_float32():
    x = torch.randn(1, 64, 7, 7)
    w = torch.randn(32, 64, 3, 3) * 0.1
    b = torch.randn(32)
    ref, _ = reference_conv2d(x, w, b, "tanh", padding=1)
    for algorithm in ALGORITHMS:
        with fusedtie.use_cpu_conv_algorithm(algorithm):
            out = fusedtie.tied_conv2d(x, w, b, "tanh", padding=1)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_setting_is_restored_and_validated():
    lib = fusedtie._LIB
    assert lib.cpu_conv_algorithm() == "auto"
    with fusedtie.use_cpu_conv_algorithm("gemm"):
        assert lib.cpu_conv_algorithm() == "gemm"
        with pytest.raises(
            ValueError, match="unknown CPU convolution algorithm 'fast'.*auto, library, gemm, depthwise"
        ):
            with fusedtie.use_cpu_conv_algorithm("fast"):
                pass
        assert lib.cpu_conv_algorithm() == "gemm"
    assert lib.cpu_conv_algorithm() == "auto"


def ops_run(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return {e.name for e in prof.events()}, result


def algorithm_used(names):
    """ "gemm" when BLAS was called directly, "library" when at::convolution(_backward) ran,
    "brgemm" when the brgemm path's own profiler ranges ran, and "depthwise" when none did (the
    depthwise kernel calls no ATen convolution or GEMM)."""
    library = {"aten::convolution", "aten::convolution_backward"} & names
    gemm = {"aten::mm", "aten::addmm"} & names
    brgemm = {"fusedtie::brgemm_conv2d_forward", "fusedtie::brgemm_conv2d_backward"} & names
    assert len([used for used in (library, gemm, brgemm) if used]) <= 1, sorted(
        n for n in names if "conv" in n or "mm" in n
    )
    return "gemm" if gemm else "library" if library else "brgemm" if brgemm else "depthwise"


@pytest.mark.parametrize(
    "algorithm,x_shape,w_shape,padding,stride,input_grad,expected",
    [
        ("gemm", (2, 8, 30, 30), (8, 8, 3, 3), 1, 1, True, ("gemm", "gemm")),
        ("library", (1, 64, 7, 7), (64, 64, 1, 1), 0, 1, True, ("library", "library")),
        # auto, up to batch 8: pointwise convs and the weight-heaviest (>= 10000x more weight elements
        # than batch * output positions) run brgemm; others with >= 1000x run the GEMM where the BLAS
        # is trusted; the rest the library
        ("auto", (1, 64, 7, 7), (64, 64, 1, 1), 0, 1, True, (AUTO_GEMM, AUTO_BACKWARD)),
        ("auto", (8, 64, 7, 7), (64, 64, 1, 1), 0, 1, False, (AUTO_GEMM, AUTO_BACKWARD)),
        ("auto", (9, 64, 7, 7), (64, 64, 1, 1), 0, 1, True, ("library", "library")),
        ("auto", (1, 128, 7, 7), (128, 128, 3, 3), 1, 1, True, (AUTO_GEMM, AUTO_GEMM)),  # 147456 / 49
        ("auto", (2, 128, 7, 7), (128, 128, 3, 3), 1, 1, True, (AUTO_GEMM, AUTO_GEMM)),  # / 98
        ("auto", (4, 128, 7, 7), (128, 128, 3, 3), 1, 1, True, ("library", "library")),  # / 196 < 1000
        # / 25 >= 10000: brgemm for a backward without the input gradient (col2im costs more than it saves)
        # (and a forward of f = square there runs brgemm too, f applied as W is packed)
        ("auto", (1, 256, 5, 5), (256, 256, 3, 3), 1, 1, False, (AUTO_HEAVY_FORWARD, AUTO_BACKWARD)),
        ("auto", (1, 256, 5, 5), (256, 256, 3, 3), 1, 1, True, (AUTO_HEAVY_FORWARD, AUTO_GEMM)),
        ("auto", (1, 16, 40, 40), (16, 16, 3, 3), 1, 1, True, ("library", "library")),
        # depthwise convs: auto takes the fused depthwise kernel for stride 1 and >= 10x10 outputs
        ("auto", (1, 32, 10, 10), (32, 1, 3, 3), 1, 1, True, ("depthwise", "depthwise")),
        ("auto", (2, 16, 28, 28), (32, 1, 5, 5), 2, 1, False, ("depthwise", "depthwise")),  # multiplier 2
        ("auto", (8, 32, 7, 7), (32, 1, 3, 3), 1, 1, True, ("library", "library")),  # 7x7 outputs
        ("auto", (1, 32, 28, 28), (32, 1, 3, 3), 1, 2, True, ("library", "library")),  # stride 2
        ("depthwise", (1, 32, 28, 28), (32, 1, 3, 3), 1, 2, True, ("depthwise", "depthwise")),
        # brgemm: groups 1, float32, batch 1 or outputs under 32x32 (the batch's one column matrix)
        ("brgemm", (1, 8, 40, 40), (8, 8, 3, 3), 1, 1, True, ("brgemm", "brgemm")),
        ("brgemm", (4, 8, 9, 9), (8, 8, 1, 1), 0, 1, False, ("brgemm", "brgemm")),
        ("brgemm", (2, 8, 32, 32), (8, 8, 3, 3), 1, 1, True, ("library", "library")),  # 1024 outputs, batch 2
        ("brgemm", (1, 8, 9, 9), (8, 4, 3, 3), 1, 1, True, ("library", "library")),  # groups 2
        ("depthwise", (1, 8, 9, 9), (8, 4, 3, 3), 1, 1, True, ("library", "library")),  # groups 2
        ("library", (1, 32, 10, 10), (32, 1, 3, 3), 1, 1, True, ("library", "library")),
    ],
)
def test_which_algorithm_runs(algorithm, x_shape, w_shape, padding, stride, input_grad, expected):
    groups = x_shape[1] // w_shape[1]
    x = torch.randn(x_shape, requires_grad=input_grad)
    w = torch.randn(w_shape, requires_grad=True)
    b = torch.randn(w_shape[0], requires_grad=True)
    with fusedtie.use_cpu_conv_algorithm(algorithm):
        forward_ops, out = ops_run(
            lambda: fusedtie.tied_conv2d(x, w, b, "square", padding=padding, stride=stride, groups=groups)
        )
        inputs = [x, w, b] if input_grad else [w, b]
        backward_ops, _ = ops_run(lambda: torch.autograd.grad(out.sum(), inputs))
        reported = tuple(
            fusedtie.cpu_conv_algorithm_for(
                x, w, padding=padding, stride=stride, groups=groups, backward=backward, input_gradient=input_grad
            )
            for backward in (False, True)
        )
    assert (algorithm_used(forward_ops), algorithm_used(backward_ops)) == expected
    assert reported == expected


# auto's shape rule where the GEMM path is trusted: (input, weight, padding, expected).
AUTO_SHAPE_RULE = [
    ((1, 64, 7, 7), (64, 64, 1, 1), 0, "gemm"),
    ((8, 64, 7, 7), (64, 64, 1, 1), 0, "gemm"),
    ((9, 64, 7, 7), (64, 64, 1, 1), 0, "library"),
    ((1, 128, 7, 7), (128, 128, 3, 3), 1, "gemm"),
    ((4, 128, 7, 7), (128, 128, 3, 3), 1, "library"),
    ((1, 16, 40, 40), (16, 16, 3, 3), 1, "library"),
    ((1, 512, 7, 7), (512, 512, 3, 3), 1, "gemm"),  # conv5_x 3x3 b1
]


def run_fusedtie(code: str, **env) -> dict:
    """Runs `code` in a fresh interpreter with `env` added; it prints one JSON object."""
    run = subprocess.run(
        [sys.executable, "-c", "import json, torch, fusedtie\n" + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("forced", ["0", "1"])
def test_auto_shape_rule_follows_the_blas_assessment(forced):
    """FUSEDTIE_GEMM_UNDER_AUTO overrides the assessment, so the shape rule is checked on any CPU."""
    out = run_fusedtie(
        f"""
        cases = {[(x, w, p) for x, w, p, _ in AUTO_SHAPE_RULE]!r}
        f64 = dict(dtype=torch.float64)  # brgemm is float32-only: float64 shows the GEMM's rule
        chosen = [fusedtie.cpu_conv_algorithm_for(torch.empty(x, **f64), torch.empty(w, **f64), padding=p)
                  for x, w, p in cases]
        print(json.dumps(dict(info=fusedtie.cpu_info(), chosen=chosen)))
    """,
        FUSEDTIE_GEMM_UNDER_AUTO=forced,
    )
    assert out["info"]["gemm_under_auto"] is (forced == "1")
    assert out["info"]["reason"].startswith(f"FUSEDTIE_GEMM_UNDER_AUTO={forced}")
    expected = [e if forced == "1" else "library" for *_, e in AUTO_SHAPE_RULE]
    assert out["chosen"] == expected


def test_auto_takes_brgemm_on_weight_heavy_float32_calls():
    """float32 under auto: the backward of pointwise shapes, and of the weight-heaviest ones when
    it wants no input gradient, runs brgemm wherever oneDNN's micro-kernel runs, whatever the BLAS
    (AVX2 or AVX-512, oneDNN enabled). The forward runs it on the weight-heaviest shapes (pointwise
    or not) when there is an f to apply; with identity it keeps the GEMM's rule."""

    def chosen(**kwargs):
        return [
            fusedtie.cpu_conv_algorithm_for(torch.empty(x), torch.empty(w), padding=p, **kwargs)
            for x, w, p, _ in AUTO_SHAPE_RULE
        ]

    gemm_rule = [AUTO_GEMM if e == "gemm" else "library" for *_, e in AUTO_SHAPE_RULE]
    assert chosen(transform="identity") == gemm_rule
    forward, weight_only, with_input = [], [], []
    for (x, w, p, _), fallback in zip(AUTO_SHAPE_RULE, gemm_rule):
        out_positions = (x[2] + 2 * p - w[2] + 1) * (x[3] + 2 * p - w[3] + 1)
        pointwise = w[2:] == (1, 1) and x[0] <= 8
        outweighs = x[0] <= 8 and torch.Size(w).numel() >= 10000 * x[0] * out_positions
        forward.append("brgemm" if BRGEMM_UNDER_AUTO and outweighs else fallback)
        weight_only.append("brgemm" if BRGEMM_UNDER_AUTO and (pointwise or outweighs) else fallback)
        with_input.append("brgemm" if BRGEMM_UNDER_AUTO and pointwise else fallback)
    assert chosen() == forward  # f = square, the default
    assert chosen(transform="tanh") == forward
    assert chosen(transform=fusedtie.Transform("scale", alpha=0.5)) == forward
    assert chosen(backward=True, input_gradient=False) == weight_only
    assert chosen(backward=True) == with_input
    assert forward.count("brgemm") == (1 if BRGEMM_UNDER_AUTO else 0)
    assert weight_only.count("brgemm") == (3 if BRGEMM_UNDER_AUTO else 0)
    assert with_input.count("brgemm") == (2 if BRGEMM_UNDER_AUTO else 0)
    assert BRGEMM_UNDER_AUTO == (
        torch.backends.mkldnn.enabled and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    )


def test_bad_gemm_override_is_a_clear_error():
    run = subprocess.run(
        [sys.executable, "-c", "import torch, fusedtie; fusedtie.cpu_info()"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "FUSEDTIE_GEMM_UNDER_AUTO": "yes"},
    )
    assert run.returncode != 0
    assert "FUSEDTIE_GEMM_UNDER_AUTO must be 0 or 1, got 'yes'" in run.stderr


@pytest.mark.parametrize(
    "vendor,has_mkl,instructions,cbwr,trusted,why",
    [
        ("GenuineIntel", True, "", "", True, "MKL on an Intel CPU"),
        ("GenuineIntel", True, "AVX512", "", True, "MKL on an Intel CPU"),
        ("GenuineIntel", True, "avx512_e1", "", True, "MKL on an Intel CPU"),
        ("GenuineIntel", True, "AVX2", "", False, "MKL_ENABLE_INSTRUCTIONS=AVX2"),
        ("GenuineIntel", True, "SSE4_2", "", False, "MKL_ENABLE_INSTRUCTIONS=SSE4_2"),
        ("GenuineIntel", True, "", "COMPATIBLE", False, "MKL_CBWR=COMPATIBLE"),
        ("GenuineIntel", True, "", "AVX2", False, "MKL_CBWR=AVX2"),
        ("GenuineIntel", True, "", "AUTO", True, "MKL on an Intel CPU"),
        ("AuthenticAMD", True, "", "", False, "non-Intel CPU (AuthenticAMD)"),
        ("HygonGenuine", True, "", "", False, "non-Intel CPU (HygonGenuine)"),
        ("", True, "", "", False, "unknown vendor"),
        ("GenuineIntel", False, "", "", False, "not MKL"),
    ],
)
def test_gemm_blas_rule(vendor, has_mkl, instructions, cbwr, trusted, why):
    a = fusedtie._LIB.assess_gemm_blas(vendor, "a model", has_mkl, instructions, cbwr)
    assert a["gemm_under_auto"] is trusted
    assert why in a["reason"]
    assert (a["vendor"], a["model"], a["blas"]) == (vendor, "a model", "MKL" if has_mkl else "other")


def test_cpu_info_describes_this_machine():
    info = fusedtie.cpu_info()
    with open("/proc/cpuinfo") as f:
        vendors = {line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")}
    assert vendors == {info["vendor"]}
    assert info["blas"] == ("MKL" if torch.backends.mkl.is_available() else "other")
    expected = fusedtie._LIB.assess_gemm_blas(
        info["vendor"],
        info["model"],
        info["blas"] == "MKL",
        os.environ.get("MKL_ENABLE_INSTRUCTIONS", ""),
        os.environ.get("MKL_CBWR", ""),
    )
    if "FUSEDTIE_GEMM_UNDER_AUTO" not in os.environ:
        assert info["gemm_under_auto"] is expected["gemm_under_auto"]
    assert info["transform_capability"] in ("DEFAULT", "AVX2", "AVX512")


def test_slowed_mkl_keeps_auto_off_the_gemm():
    """MKL held to AVX2 (as one would slow it on an Intel CPU): auto never takes the GEMM path (MKL);
    the brgemm path (oneDNN's micro-kernel, not MKL) stays where it runs."""
    out = run_fusedtie(
        """
        x, w = torch.randn(1, 512, 7, 7), torch.randn(512, 512, 3, 3)
        chosen = [fusedtie.cpu_conv_algorithm_for(x, w, padding=1, backward=b, input_gradient=False)
                  for b in (False, True)]
        print(json.dumps(dict(info=fusedtie.cpu_info(), chosen=chosen)))
    """,
        MKL_ENABLE_INSTRUCTIONS="AVX2",
    )
    assert out["info"]["gemm_under_auto"] is False
    assert out["chosen"] == ["brgemm" if BRGEMM_UNDER_AUTO else "library"] * 2  # f = square, the default


# Depthwise geometries: (kernel, batch, in_channels, multiplier, stride, padding, dilation, hw).
DEPTHWISE_GEOMETRIES = [
    ((3, 3), 2, 4, 1, 1, 1, 1, (9, 8)),
    ((3, 3), 1, 3, 2, 1, 1, 1, (7, 7)),  # two output channels per input channel
    ((5, 5), 2, 2, 3, 1, "same", 1, (6, 9)),
    ((7, 7), 1, 2, 1, 1, 3, 1, (8, 7)),
    ((2, 3), 1, 3, 1, 1, "same", 1, (6, 5)),  # asymmetric padding
    ((4, 4), 2, 2, 1, 1, 0, 1, (9, 9)),  # a tap count without an unrolled variant
    ((3, 3), 2, 3, 1, 1, 2, 2, (9, 10)),  # dilation 2
    ((1, 1), 2, 3, 1, 1, 0, 1, (4, 5)),
    ((3, 3), 1, 2, 1, 1, 0, 1, (3, 3)),  # the kernel covers the whole input: 1x1 output
    ((3, 3), 2, 3, 1, 2, 1, 1, (9, 8)),  # stride 2
    ((3, 3), 1, 2, 2, (1, 2), (0, 1), 1, (7, 9)),  # strides differ by dimension
    ((5, 3), 1, 2, 1, (2, 1), 2, (1, 2), (11, 9)),
    ((3, 3), 0, 3, 1, 1, 1, 1, (5, 5)),  # empty batch: the library's
]


@pytest.mark.parametrize("geometry", DEPTHWISE_GEOMETRIES, ids=str)
@pytest.mark.parametrize(
    "transform,bias_mode", [("square", "identity"), ("tanh", "transform"), ("exp", "none"), ("abs", "identity")]
)
def test_depthwise_kernel_matches_reference(geometry, transform, bias_mode):
    kernel, batch, cin, multiplier, stride, padding, dilation, hw = geometry
    with fusedtie.use_cpu_conv_algorithm("depthwise"):
        run_case(
            transform,
            bias_mode,
            kernel,
            batch=batch,
            cin=cin,
            cout=cin * multiplier,
            hw=hw,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=cin,
        )


@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous", "unbatched"])
def test_depthwise_kernel_hands_other_layouts_to_the_library(layout):
    with fusedtie.use_cpu_conv_algorithm("depthwise"):
        run_case("square", "identity", (3, 3), batch=2, cin=4, cout=4, padding=1, groups=4, layout=layout)


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_kernel_matches_the_reference_in_float32(stride):
    x = torch.randn(2, 32, 20, 20)
    w = torch.randn(32, 1, 3, 3)
    b = torch.randn(32)
    ref, ref_grads = reference_conv2d(x, w, b, "tanh", stride=stride, padding=1, groups=32)
    x.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    with fusedtie.use_cpu_conv_algorithm("depthwise"):
        out = fusedtie.tied_conv2d(x, w, b, "tanh", stride=stride, padding=1, groups=32)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn(ref.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, (x, w, b), grad_out.float())
    for got, want in zip(grads, ref_grads(grad_out)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_depthwise_kernel_is_bitwise_independent_of_the_thread_count():
    # Each sum runs in one task in a fixed order, so the thread count cannot change any bit.
    x = torch.randn(3, 16, 15, 14, requires_grad=True)
    w = torch.randn(32, 1, 3, 3, requires_grad=True)
    b = torch.randn(32, requires_grad=True)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            with fusedtie.use_cpu_conv_algorithm("depthwise"):
                out = fusedtie.tied_conv2d(x, w, b, "sigmoid", padding=1, groups=16)
                grads = torch.autograd.grad(out, (x, w, b), torch.ones_like(out))
            results.append((out, *grads))
    finally:
        torch.set_num_threads(threads)
    for later in results[1:]:
        for a, b_ in zip(results[0], later):
            assert torch.equal(a, b_)
