"""The loader: a prebuilt fusedtie._C wins; without it, import JIT-builds once and reuses the cache."""

import glob
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import fusedtie

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = textwrap.dedent(
    """
    import sys, torch, torch.nn.functional as F
    import fusedtie
    x, w = torch.randn(1, 3, 6, 6, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64)
    assert torch.allclose(fusedtie.tied_conv2d(x, w, transform="tanh"), F.conv2d(x, torch.tanh(w)))
    print("library:", fusedtie._LIB.__name__, "prebuilt loaded:", "fusedtie._C" in sys.modules)
    """
)


def _run(env_extra, timeout=1200):
    env = dict(os.environ, **env_extra)
    return subprocess.run(
        [sys.executable, "-c", CHECK], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _start(env_extra):
    env = dict(os.environ, **env_extra)
    return subprocess.Popen(
        [sys.executable, "-c", CHECK],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _jit_env(cache_dir):
    return {
        "FUSEDTIE_FORCE_JIT": "1",
        "FUSEDTIE_CACHE_DIR": str(cache_dir),
        "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 2)),
    }


def test_prebuilt_extension_is_used_when_installed():
    if fusedtie._LIB.__name__ != "fusedtie._C":
        pytest.skip("this session runs the JIT build (no prebuilt fusedtie._C installed)")
    assert "fusedtie_jit" not in sys.modules


def test_import_without_importing_torch_first():
    result = subprocess.run(
        [sys.executable, "-c", "import fusedtie; print(fusedtie.available_transforms())"],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "square" in result.stdout


def test_jit_build_compiles_once_then_reuses_the_cache(tmp_path):
    env = _jit_env(tmp_path)
    first = _run(env)
    assert first.returncode == 0, first.stderr[-3000:]
    notices = [line for line in first.stderr.splitlines() if line.startswith("fusedtie: compiling")]
    assert len(notices) == 1, first.stderr[-3000:]
    assert "library: fusedtie_jit prebuilt loaded: False" in first.stdout
    assert "expect 1-3 minutes" in notices[0] or "expect 5-15 minutes" in notices[0]
    assert any(line.startswith("fusedtie: built in ") for line in first.stderr.splitlines())
    second = _run(env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "fusedtie: compiling" not in second.stderr
    assert "library: fusedtie_jit" in second.stdout
    # torch's lock file left by a build killed outright: torch <= 2.13 waits on its mere existence
    # forever, so the next import removes it and says so; later torch locks it with flock and leaves
    # it in place, and there is nothing to remove. Either way the cached build loads within seconds.
    (build_dir,) = [d for d in glob.glob(os.path.join(str(tmp_path), "*")) if os.path.isdir(d)]
    stale = os.path.join(build_dir, "lock")
    open(stale, "w").close()
    third = _run(env, timeout=120)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "fusedtie: compiling" not in third.stderr
    from torch.utils import cpp_extension

    if getattr(cpp_extension, "FileLock", None) is None:  # existence-based FileBaton
        assert f"fusedtie: removing {stale}, left by an interrupted build" in third.stderr
        assert not os.path.exists(stale)
    else:
        assert "fusedtie: removing" not in third.stderr
    # The library loads only if it matches the record written after its build (size, SHA-256):
    # truncated (a link killed midway, a full disk), overwritten, or without a record, it is linked
    # again from the compiled objects, with one line saying so.
    (library,) = glob.glob(os.path.join(build_dir, "fusedtie_jit*.so"))
    for damage in ("truncate", "garbage", "no record"):
        if damage == "truncate":
            os.truncate(library, 1000)
        elif damage == "garbage":
            with open(library, "r+b") as f:
                f.seek(4096)
                f.write(b"\xde\xad\xbe\xef" * 64)
        else:
            os.remove(library + ".record")
        damaged = _run(env, timeout=900)
        assert damaged.returncode == 0, (damage, damaged.stderr[-3000:])
        said = [line for line in damaged.stderr.splitlines() if "does not match the record of its build" in line]
        assert len(said) == 1 and library in said[0], (damage, damaged.stderr[-3000:])
        assert "library: fusedtie_jit" in damaged.stdout
    clean = _run(env)
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert "does not match" not in clean.stderr and "fusedtie: compiling" not in clean.stderr


def test_interrupted_jit_build_recovers_and_concurrent_imports_build_once(tmp_path):
    """Ctrl-C in the middle of the first build, then two imports at once: one of them builds, the
    other waits for it, and both work."""
    env = _jit_env(tmp_path)
    first = _start(env)
    for line in first.stderr:  # wait until the build is under way, then interrupt it
        if line.startswith("fusedtie: compiling"):
            break
    time.sleep(8)
    os.killpg(first.pid, signal.SIGINT)  # what Ctrl-C sends the terminal's foreground group
    first.wait(timeout=120)
    assert first.returncode != 0
    imports = [_start(env) for _ in range(2)]
    outputs = [p.communicate(timeout=1500) for p in imports]
    for p, (out, err) in zip(imports, outputs):
        assert p.returncode == 0, err[-3000:]
        assert "library: fusedtie_jit prebuilt loaded: False" in out
    errs = [err for _, err in outputs]
    assert sum("fusedtie: compiling" in err for err in errs) == 1, errs
    assert sum("fusedtie: waiting for process " in err for err in errs) <= 1, errs


def test_build_reports_whether_cuda_was_compiled():
    from fusedtie import _build

    compile_cuda, reason = _build.cuda_build_decision()
    if torch.version.cuda is None:
        assert compile_cuda is False and "CPU build" in reason
    # What the loaded library says it is agrees with what a build would decide now.
    assert fusedtie.cuda_compiled is compile_cuda


CAPABILITY_CHECK = textwrap.dedent(
    """
    import torch, torch.nn.functional as F
    import fusedtie
    from reference import reference_f, transform_arg
    used = fusedtie._LIB.cpu_transform_capability()
    assert used == torch.backends.cpu.get_cpu_capability(), (used, torch.backends.cpu.get_cpu_capability())
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6), (torch.bfloat16, 1e-2)):
        # 1000 elements: whole vectors and a ragged tail, values across every transform's branches
        w = (torch.linspace(-25, 25, 1000, dtype=torch.float64) + 0.013).to(dtype)
        g = torch.randn(1000, dtype=torch.float64).to(dtype)
        for name in fusedtie.available_transforms():
            w64 = w.double().requires_grad_(True)
            ref = reference_f(name, w64)
            (ref_grad,) = torch.autograd.grad(ref, w64, g.double())
            wt = w.clone().requires_grad_(True)
            out = fusedtie.apply_transform(wt, transform_arg(name))
            (grad,) = torch.autograd.grad(out, wt, g)
            scale = ref.abs().clamp_min(1.0)
            assert ((out.double() - ref.detach()).abs() / scale).max() <= tol, (name, dtype)
            gscale = ref_grad.abs().clamp_min(1.0)
            assert ((grad.double() - ref_grad).abs() / gscale).max() <= 4 * tol, (name, dtype, "grad")
    print("capability", used)
    """
)


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_every_cpu_capability_of_the_transform_passes(capability):
    env = dict(
        os.environ,
        ATEN_CPU_CAPABILITY=capability,
        PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]),
    )
    result = subprocess.run(
        [sys.executable, "-c", CAPABILITY_CHECK], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "capability" in result.stdout
