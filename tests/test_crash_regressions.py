"""Calls that once killed the process (issue 18), each run in a child process so that a signal
fails the test with the call instead of taking pytest down: hostile geometry under every CPU
algorithm, and PyTorch's own crash on a huge stride, which the library path now avoids."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fusedtie

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALGORITHMS = ["auto", "library", "gemm", "brgemm", "depthwise"]


def run_child(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, env=env
    )


def signal_name(returncode: int) -> str:
    return signal.Signals(-returncode).name if returncode < 0 else f"exit {returncode}"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("padding", [2**31, 2**62, (1, 2**40)])
def test_huge_padding_is_a_clear_error(algorithm, padding):
    """padding=2**31 segfaulted under auto and gemm (a wrapped output size); F.conv2d raises."""
    run = run_child(f"""
        import torch, fusedtie
        x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 9, 9)
        with fusedtie.use_cpu_conv_algorithm({algorithm!r}):
            try:
                fusedtie.tied_conv2d(x, w, None, padding={padding!r})
            except RuntimeError as error:
                print("RuntimeError:", str(error).splitlines()[0])
    """)
    assert run.returncode == 0, f"{signal_name(run.returncode)}: {run.stderr[-2000:]}"
    assert run.stdout.startswith("RuntimeError:")
    assert "64 bits" in run.stdout or "allocate" in run.stdout, run.stdout


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_huge_stride_computes_what_f_conv2d_means(algorithm):
    """torch 2.13's F.conv2d segfaults in backward with stride 32768 and padding (1, 2) on an 8x8
    input; every output dimension has one position there, so fusedtie runs the smallest stride
    with the same result. Checked against the float64 reference with a small stride of the same
    meaning (F.conv2d itself cannot be the reference: it is the call that crashes)."""
    run = run_child(f"""
        import torch, fusedtie
        from reference import reference_conv2d
        torch.manual_seed(0)
        x = torch.randn(2, 3, 8, 8, requires_grad=True)
        w = torch.randn(4, 3, 3, 3, requires_grad=True)
        b = torch.randn(4, requires_grad=True)
        with fusedtie.use_cpu_conv_algorithm({algorithm!r}):
            out = fusedtie.tied_conv2d(x, w, b, "tanh", stride=32768, padding=(1, 2))
            grads = torch.autograd.grad(out.sum(), (x, w, b))
        # the same convolution: one output position per dimension, at the top-left corner
        ref, reference_grads = reference_conv2d(x, w, b, "tanh", stride=(8, 10), padding=(1, 2))
        ref_grads = reference_grads(torch.ones(ref.shape, dtype=torch.float64))
        assert out.shape == ref.shape == (2, 4, 1, 1), (out.shape, ref.shape)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        print("ok")
    """)
    assert run.returncode == 0, f"{signal_name(run.returncode)}: {run.stderr[-2000:]}"
    assert run.stdout.strip() == "ok"


def test_library_stride_leaves_ordinary_strides_alone():
    """The stride clamp applies only where a dimension has one output position."""
    torch.manual_seed(1)
    x = torch.randn(1, 2, 9, 9, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    with fusedtie.use_cpu_conv_algorithm("library"):
        for stride in [(2, 3), (7, 1), (9, 9), (100, 2)]:
            out = fusedtie.tied_conv2d(x, w, None, "square", stride=stride, padding=1)
            torch.testing.assert_close(out, F.conv2d(x, w * w, None, stride=stride, padding=1))
