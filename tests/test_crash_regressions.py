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


# Geometry oneDNN mishandles (torch 2.13), which the library path rewrites to the same convolution
# (csrc/library_conv.h): strides of 1024 or more that exceed the kernel's extent go through
# windows; a 1-wide kernel's dilation is dropped. Each case: (input, weight, keyword arguments).
LARGE_STRIDE_CONV2D = [
    ((2, 2, 3, 2**15 + 2), (3, 2, 1, 2), dict(stride=(1, 2**15))),  # brgconv_strided wrote out of bounds
    ((2, 4, 2 * 1500 + 3, 5), (4, 2, 3, 2), dict(stride=(1500, 2), padding=(1, 1), groups=2)),
    ((1, 2, 1030, 2100), (3, 2, 2, 3), dict(stride=(1024, 1030), padding=(2, 0), dilation=(3, 2))),
]
LARGE_STRIDE_CONV_TRANSPOSE2D = [
    ((2, 3, 8, 8), (3, 2, 3, 1), dict(stride=(2**15, 1))),  # 24 s in oneDNN
    ((2, 2, 3, 2), (2, 3, 1, 1), dict(stride=(1, 2**15))),  # wrote out of bounds
    ((2, 4, 3, 2), (4, 1, 2, 3), dict(stride=(1100, 1024), padding=(1, 2), output_padding=(5, 1), groups=2)),
    ((1, 2, 2, 2), (2, 2, 3, 2), dict(stride=(2000, 1500), padding=(3, 0), dilation=(4, 1))),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_large_strides_compute_the_reference(channels_last):
    """Forward and every gradient of both operators against float64 F.conv2d / F.conv_transpose2d
    (which do not use oneDNN), for strides that crashed oneDNN or took it seconds, with padding,
    output_padding, groups and dilation; in a child process, as a crash is how this fails."""
    run = run_child(f"""
        import time, torch, fusedtie
        from reference import reference_conv2d, reference_conv_transpose2d
        from test_crash_regressions import LARGE_STRIDE_CONV2D, LARGE_STRIDE_CONV_TRANSPOSE2D
        torch.manual_seed(0)
        fmt = torch.channels_last if {channels_last} else torch.contiguous_format

        def check(op, reference, x_size, w_size, kwargs, transform):
            x = torch.randn(x_size).to(memory_format=fmt).requires_grad_()
            w = torch.randn(w_size).requires_grad_()
            b = torch.randn(w_size[0] if op is fusedtie.tied_conv2d else w_size[1] * kwargs.get("groups", 1))
            b.requires_grad_()
            start = time.monotonic()
            out = op(x, w, b, transform, **kwargs)
            grad_out = torch.randn(out.shape)
            grads = torch.autograd.grad(out, (x, w, b), grad_out)
            took = time.monotonic() - start
            ref, ref_grads = reference(x, w, b, transform, **kwargs)
            assert out.shape == ref.shape, (out.shape, ref.shape)
            assert out.is_contiguous(memory_format=fmt), "output layout"
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
            for name, got, want in zip("xwb", grads, ref_grads(grad_out)):
                torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=lambda m: name + ": " + m)
            assert took < 5, f"{{took:.1f}} s"  # oneDNN took 24 s on the first transposed case

        for algorithm in ("library", "auto"):
            with fusedtie.use_cpu_conv_algorithm(algorithm):
                for x_size, w_size, kwargs in LARGE_STRIDE_CONV2D:
                    check(fusedtie.tied_conv2d, reference_conv2d, x_size, w_size, kwargs, "tanh")
        for x_size, w_size, kwargs in LARGE_STRIDE_CONV_TRANSPOSE2D:
            check(fusedtie.tied_conv_transpose2d, reference_conv_transpose2d, x_size, w_size, kwargs, "square")
        print("ok")
    """)
    assert run.returncode == 0, f"{signal_name(run.returncode)}: {run.stderr[-3000:]}"
    assert run.stdout.strip() == "ok"


def test_one_tap_dilation_on_channels_last_computes_the_reference():
    """oneDNN's brg_conv_fwd wrote through a null pointer for a channels_last input, a bias, and
    dilation 2 along a 1-wide kernel whose every output column reads padding (plain F.conv2d
    segfaults on this call); fusedtie drops the meaningless dilation."""
    run = run_child("""
        import torch, fusedtie
        from reference import reference_conv2d
        torch.manual_seed(0)
        x = torch.randn(2, 1, 2, 1).to(memory_format=torch.channels_last).requires_grad_()
        w, b = torch.randn(3, 1, 1, 1, requires_grad=True), torch.randn(3, requires_grad=True)
        kwargs = dict(stride=(1, 2), padding=(0, 1), dilation=(1, 2))
        out = fusedtie.tied_conv2d(x, w, b, "exp", **kwargs)
        grad_out = torch.randn(out.shape)
        grads = torch.autograd.grad(out, (x, w, b), grad_out)
        ref, ref_grads = reference_conv2d(x, w, b, "exp", **kwargs)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, ref_grads(grad_out)):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        print("ok")
    """)
    assert run.returncode == 0, f"{signal_name(run.returncode)}: {run.stderr[-3000:]}"
    assert run.stdout.strip() == "ok"
