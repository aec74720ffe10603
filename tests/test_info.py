"""`python -m fusedtie` and the public helpers of fusedtie/info.py: the report, its JSON form, a
self-check that fails when a kernel is broken at the dispatcher, and build_info / cpu_capability /
clear_cuda_autotune_cache."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types

import pytest
import torch

import fusedtie
from fusedtie import _build, info

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every CPU check the self-check runs: (operator, algorithm), each once per checked transform.
CPU_CHECKS = {
    ("tied_conv2d", "auto"),
    ("tied_conv2d", "library"),
    ("tied_conv2d", "gemm"),
    ("tied_conv2d", "brgemm"),
    ("tied_conv2d", "depthwise"),
    ("tied_conv_transpose2d", "library"),
}


def run_python(*args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def run_wrapped(tmp_path, script):
    """Run ``script`` (which ends by running the command's main) in a fresh interpreter."""
    path = tmp_path / "wrapper.py"
    path.write_text(textwrap.dedent(script))
    return run_python(str(path))


def check_lines(stdout):
    """The self-check's result lines, by (device, op, algorithm setting, transform, dtype)."""
    lines = {}
    for line in stdout.splitlines():
        m = re.match(r"^(cpu|cuda:\d+)\s+(tied_conv\w+)\s+(\w+)(?:\([\w/]+\))?\s+(\S+)\s+(\w+)\s", line)
        if m:
            lines[m.groups()] = line
    return lines


@pytest.fixture(scope="module")
def report():
    return run_python("-m", "fusedtie")


@pytest.fixture(scope="module")
def json_report():
    return run_python("-m", "fusedtie", "--json")


def test_command_prints_the_environment_and_passes(report):
    assert report.returncode == 0, report.stdout + report.stderr
    out = report.stdout
    assert re.search(rf"^fusedtie\s+{re.escape(fusedtie.__version__)}$", out, re.M)
    assert re.search(rf"^torch\s+{re.escape(torch.__version__)} ", out, re.M)
    assert re.search(r"^python\s+\d+\.\d+\.\d+ ", out, re.M)
    assert re.search(r"^platform\s+\S", out, re.M)
    build = fusedtie.build_info()
    assert re.search(rf"^build\s+{build['loaded']} ", out, re.M)
    assert re.search(rf"^  path\s+{re.escape(build['path'])}$", out, re.M)
    assert re.search(r"^  kernels\s+" + ("CPU \\+ CUDA" if build["cuda"] else "CPU only"), out, re.M)
    assert re.search(rf"^  jit cache\s+{re.escape(build['jit_cache_dir'])}", out, re.M)
    assert re.search(rf"^  user transforms\s+{re.escape(build['user_transform_cache_dir'])}$", out, re.M)
    assert re.search(rf"^  capability\s+{fusedtie.cpu_capability()} ", out, re.M)
    assert re.search(r"^  gemm under auto\s+(yes|no): ", out, re.M)
    assert re.search(r"^transforms\s+identity, square, ", out, re.M)
    assert re.search(r"^gpus\s+\S", out, re.M)
    assert out.rstrip().splitlines()[-1].startswith("PASS: ")


def test_command_checks_every_cpu_algorithm_and_transform(report):
    lines = check_lines(report.stdout)
    transforms = [str(t) for t in info.checked_transforms()]
    assert transforms == ["identity", "square", "tanh", "scale(alpha=1.5)"]
    cpu = {key: line for key, line in lines.items() if key[0] == "cpu"}
    assert {(op, algorithm) for _, op, algorithm, _, _ in cpu} == CPU_CHECKS
    assert len(cpu) == len(CPU_CHECKS) * len(transforms)
    for line in cpu.values():
        # Each forced algorithm ran (no skip), with four errors under the tolerance.
        assert re.search(r"(\d\.\de[-+]\d\d\s+){4}tol \d\.\de-\d\d\s+ok$", line), line
    if not (fusedtie.cuda_compiled and torch.cuda.is_available()):
        assert not any(key[0] != "cpu" for key in lines)


def test_json_report_has_the_fields(json_report):
    assert json_report.returncode == 0, json_report.stderr
    doc = json.loads(json_report.stdout)
    assert doc["fusedtie"] == fusedtie.__version__
    assert doc["torch"]["version"] == torch.__version__
    assert doc["torch"]["cuda"] == torch.version.cuda
    assert set(doc["python"]) == {"version", "implementation", "executable"}
    assert isinstance(doc["platform"], str)
    assert doc["build"] == json.loads(json.dumps(fusedtie.build_info()))
    assert doc["cpu"]["transform_capability"] == fusedtie.cpu_capability()
    assert {"vendor", "model", "blas", "gemm_under_auto", "reason", "algorithm_setting"} <= set(doc["cpu"])
    assert [t["name"] for t in doc["transforms"]] == fusedtie.available_transforms()
    assert isinstance(doc["gpus"], list)
    assert doc["passed"] is True
    cpu_checks = [c for c in doc["checks"] if c["device"] == "cpu"]
    assert {(c["op"], c["algorithm"]) for c in cpu_checks} == CPU_CHECKS
    for c in doc["checks"]:
        assert c["status"] == "ok", c
        assert set(c["errors"]) == {"out", "d_input", "d_weight", "d_bias"}
        assert all(0 <= e <= c["tolerance"] for e in c["errors"].values()), c
        assert c["name"] == f"{c['device']} {c['op']} {c['algorithm']} {c['transform']} {c['dtype']}"


def test_no_check_prints_only_the_information():
    text = run_python("-m", "fusedtie", "--no-check")
    assert text.returncode == 0, text.stderr
    assert "self-check" not in text.stdout and "PASS" not in text.stdout
    assert re.search(r"^fusedtie\s", text.stdout, re.M)
    doc = run_python("-m", "fusedtie", "--no-check", "--json")
    assert doc.returncode == 0, doc.stderr
    parsed = json.loads(doc.stdout)
    assert parsed["checks"] is None and parsed["build"]["version"] == fusedtie.__version__


def test_self_check_fails_when_the_cpu_kernel_is_broken(tmp_path):
    # The CPU kernel of fusedtie::tied_conv2d replaced, at the dispatcher, by one that is right
    # except for tanh, where it is 1% off: the check must exit 1 and name exactly those checks.
    run = run_wrapped(
        tmp_path,
        """
        import sys
        import warnings

        import torch
        import torch.nn.functional as F

        from fusedtie import info

        def broken(input, weight, bias, transform, alpha, bias_transform, bias_alpha, stride, padding, dilation,
                   groups):
            fw = torch.ops.fusedtie.transform(weight, transform, alpha)
            fb = None if bias is None else torch.ops.fusedtie.transform(bias, bias_transform, bias_alpha)
            top, bottom, left, right = padding
            x = F.pad(input, (left, right, top, bottom))
            out = torch.ops.aten.convolution(x, fw, fb, stride, (0, 0), dilation, False, (0, 0), groups)
            return out * 1.01 if transform == "tanh" else out

        warnings.simplefilter("ignore")  # "Overriding a previously registered kernel"
        lib = torch.library.Library("fusedtie", "IMPL")
        lib.impl("tied_conv2d", broken, "CPU")
        sys.exit(info.main([]))
        """,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    lines = check_lines(run.stdout)
    assert len(lines) == len(CPU_CHECKS) * 4
    for (device, op, algorithm, transform, dtype), line in lines.items():
        if op == "tied_conv2d" and transform == "tanh":
            assert line.endswith("FAIL (out)"), line
        else:
            assert line.endswith(" ok"), line
    summary = run.stdout.split("\nFAIL: ", 1)[1]
    assert summary.startswith(f"5 of {len(lines)} checks failed")
    assert "  cpu tied_conv2d library tanh float32: FAIL out" in summary
    assert "scale" not in summary and "tied_conv_transpose2d" not in summary


def test_self_check_fails_on_a_wrong_gradient_and_on_a_kernel_that_raises(tmp_path):
    # The real backward kernel of fusedtie::tied_conv_transpose2d, its weight gradient perturbed for
    # square (by a dispatch mode around it) and made to raise for scale.
    run = run_wrapped(
        tmp_path,
        """
        import sys

        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        from fusedtie import info

        class BreakBackward(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if func is torch.ops.fusedtie._tied_conv_transpose2d_backward.default:
                    if args[4] == "square":
                        grad_input, grad_weight, grad_bias = out
                        grad_weight = grad_weight.clone()
                        grad_weight.view(-1)[3] += 1e-2 * grad_weight.abs().max()
                        return grad_input, grad_weight, grad_bias
                    if args[4] == "scale":
                        raise RuntimeError("deliberately broken kernel")
                return out

        with BreakBackward():
            status = info.main([])
        sys.exit(status)
        """,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    lines = check_lines(run.stdout)
    transposed = {key[3]: line for key, line in lines.items() if key[1] == "tied_conv_transpose2d"}
    assert transposed["square"].endswith("FAIL (d_weight)"), transposed["square"]
    assert "ERROR: RuntimeError: deliberately broken kernel" in transposed["scale(alpha=1.5)"]
    assert transposed["identity"].endswith(" ok") and transposed["tanh"].endswith(" ok")
    assert all(line.endswith(" ok") for key, line in lines.items() if key[1] == "tied_conv2d")
    summary = run.stdout.split("\nFAIL: ", 1)[1]
    assert "  cpu tied_conv_transpose2d library square float32: FAIL d_weight" in summary
    assert "  cpu tied_conv_transpose2d library scale(alpha=1.5) float32: ERROR RuntimeError" in summary


def test_build_info():
    b = fusedtie.build_info()
    assert set(b) >= {
        "version",
        "torch_version",
        "torch_cuda_version",
        "loaded",
        "loaded_why",
        "path",
        "cuda",
        "cuda_archs",
        "jit_cache_dir",
        "user_transform_cache_dir",
        "cpu_capability",
    }
    assert b["version"] == fusedtie.__version__
    assert b["torch_version"] == torch.__version__ and b["torch_cuda_version"] == torch.version.cuda
    assert b["path"] == fusedtie._LIB.__file__ and os.path.isfile(b["path"])
    # The loader's own record agrees with the module it returned.
    assert b["loaded"] == ("prebuilt" if fusedtie._LIB.__name__ == "fusedtie._C" else "jit")
    assert b["loaded_why"]
    assert b["cuda"] is fusedtie.cuda_compiled
    if b["cuda"]:
        assert b["cuda_archs"] is None or all(re.fullmatch(r"(sm|compute)_\d+", a) for a in b["cuda_archs"])
    else:
        assert b["cuda_archs"] == []
    if b["loaded"] == "jit":
        assert b["jit_cache_dir"] == os.path.dirname(b["path"])
    assert isinstance(b["jit_cache_dir"], str) and isinstance(b["user_transform_cache_dir"], str)
    assert b["user_transform_cache_dir"].endswith("fusedtie_user_transforms")
    assert b["cpu_capability"] == fusedtie.cpu_capability()
    json.dumps(b)  # JSON-ready


def test_build_info_of_a_jit_cuda_build(monkeypatch, tmp_path):
    # The branches this machine's prebuilt CPU build does not take: a JIT-loaded module, with CUDA
    # kernels whose fatbinary cannot be read (here: a file without one).
    env = info.environment()
    jit_dir = tmp_path / "torch-cache"
    jit_dir.mkdir()
    (jit_dir / "fusedtie_jit.so").write_bytes(b"\x7fELF not really")
    fake = types.SimpleNamespace(
        __name__="fusedtie_jit",
        __file__=str(jit_dir / "fusedtie_jit.so"),
        cuda_compiled=True,
        cpu_transform_capability=lambda: "AVX2",
    )
    monkeypatch.setattr(info, "LIB", fake)
    loaded = {"how": "jit", "why": "FUSEDTIE_FORCE_JIT=1", "cuda": "nvcc at /usr/local/cuda"}
    monkeypatch.setattr(_build, "LOADED", loaded)
    b = fusedtie.build_info()
    assert (b["loaded"], b["loaded_why"], b["jit_cuda_decision"]) == tuple(loaded.values())
    assert b["jit_cache_dir"] == str(jit_dir)
    assert b["cuda"] is True and b["cuda_archs"] is None  # unknown, not a guess
    assert b["cpu_capability"] == "AVX2"
    text = info.format_environment({**env, "build": b})
    assert re.search(r"^build\s+jit \(FUSEDTIE_FORCE_JIT=1\); CUDA kernels: nvcc at /usr/local/cuda$", text, re.M)
    assert re.search(r"^  kernels\s+CPU \+ CUDA \(compiled architectures unknown\)$", text, re.M)
    monkeypatch.setattr(_build, "LOADED", {})  # not recorded: told by the module's name
    assert fusedtie.build_info()["loaded"] == "jit"


def test_cpu_capability_is_the_extensions():
    capability = fusedtie.cpu_capability()
    assert isinstance(capability, str)
    assert capability in {"DEFAULT", "AVX2", "AVX512"}
    assert capability == fusedtie._LIB.cpu_transform_capability() == fusedtie.cpu_info()["transform_capability"]
    # It is this process's choice: capping ATen's capability caps it.
    capped = run_python(
        "-c", "import fusedtie; print(fusedtie.cpu_capability())", env={"ATEN_CPU_CAPABILITY": "default"}
    )
    assert capped.returncode == 0, capped.stderr
    assert capped.stdout.strip() == "DEFAULT"


def test_clear_cuda_autotune_cache():
    assert fusedtie.clear_cuda_autotune_cache() is None
    assert fusedtie._LIB.cuda_autotune_cache_size() == 0
    assert {"build_info", "cpu_capability", "clear_cuda_autotune_cache"} <= set(fusedtie.__all__)


def test_compiled_cuda_archs_of_a_cpu_file():
    archs = info._compiled_cuda_archs(fusedtie._LIB.__file__)
    if fusedtie.cuda_compiled:
        assert archs and all(re.fullmatch(r"(sm|compute)_\d+", a) for a in archs), archs
    else:
        assert archs is None  # no .nv_fatbin section
    assert info._compiled_cuda_archs(os.path.join(REPO, "README.md")) is None
    assert info._compiled_cuda_archs(os.path.join(REPO, "no-such-file.so")) is None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (no GPU)")
def test_compiled_cuda_archs_read_from_the_fatbinary(tmp_path):
    # Two objects as a torch CUDA extension links them (two fatbinaries, one compressed), machine
    # code for three architectures and PTX for one: what cuobjdump --list-elf --list-ptx would list.
    (tmp_path / "a.cu").write_text("__global__ void a(float* x) { x[threadIdx.x] *= 2.f; }\n")
    (tmp_path / "b.cu").write_text("__global__ void b(double* x) { x[threadIdx.x] += 1.0; }\n")
    for name, flags in (
        ("a", ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=[sm_90,compute_90]"]),
        ("b", ["-Xfatbin", "-compress-all", "-gencode", "arch=compute_86,code=sm_86"]),
    ):
        subprocess.run(
            ["nvcc", "-c", "-Xcompiler", "-fPIC", *flags, f"{name}.cu", "-o", f"{name}.o"],
            cwd=tmp_path,
            check=True,
            capture_output=True,
            timeout=300,
        )
    subprocess.run(["c++", "-shared", "a.o", "b.o", "-o", "ab.so"], cwd=tmp_path, check=True, timeout=120)
    assert info._compiled_cuda_archs(str(tmp_path / "ab.so")) == ["sm_80", "sm_86", "sm_90", "compute_90"]
