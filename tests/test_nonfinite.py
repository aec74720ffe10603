"""NaN and Inf propagate as F.conv2d propagates them, under every CPU algorithm.

The gemm and depthwise kernels multiply zeros they insert themselves (the zero padding, the depthwise
input gradient's zero margins, the zero columns of its flat weight-gradient loop) by the other
operand, where oneDNN skips them; 0 * Inf is NaN. These tests place NaN/Inf in the source weight (at
corner taps, which reach the padding, and at the centre), in f(W) alone (exp(100) overflows float32),
in the input (corners, first and last column) and in grad_output (borders), and require the NaN,
+Inf and -Inf masks of the output and of all three gradients to equal F.conv2d's on f(W) (PyTorch's
own kernels and autograd, same dtype), and the finite values to agree.

The reference is F.conv2d in the *same* dtype, not float64: PyTorch's own pattern depends on the
dtype (float32 runs oneDNN, which skips the padding and keeps border outputs finite; float64 runs
PyTorch's im2col path, which gives NaN there), and fusedtie's contract is F.conv2d's pattern.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import nonfinite_mask_differences, reference_f

import fusedtie

NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}

# (input shape, weight shape, conv2d keyword arguments) per geometry, and the algorithm "auto" picks
# there (tied_conv2d_kernel.cpp: depthwise_wins, gemm_wins), so that auto is tested on each fast path.
GEOMETRIES = {
    # stride 1, a 12x12 output: the depthwise kernel's flat loops; auto picks depthwise.
    "depthwise": ((2, 4, 12, 12), (4, 1, 3, 3), dict(padding=1, groups=4)),
    # stride 2: its row loops (auto: library).
    "depthwise-stride2": ((2, 4, 12, 12), (4, 1, 3, 3), dict(stride=2, padding=1, groups=4)),
    # two output channels per input channel, an even kernel with "same" (asymmetric) padding, dilation.
    "depthwise-multiplier-same": ((1, 3, 11, 11), (6, 1, 4, 4), dict(padding="same", dilation=2, groups=3)),
    # groups 1, batch 2 on a 12x12 output: one GEMM for the batch (auto: library).
    "gemm": ((2, 4, 12, 12), (5, 4, 3, 3), dict(padding=1)),
    # weights large next to the output: auto picks gemm (20736 >= 1000 * 2 * 9), one GEMM for the
    # batch; and (50176 >= 1000 * 1 * 49) one GEMM per image. Both shapes run oneDNN in float32
    # F.conv2d (batch > 1; a kernel larger than 3x3), which skips the padding.
    "gemm-weight-heavy": ((2, 48, 3, 3), (48, 48, 3, 3), dict(padding=1)),
    "gemm-weight-heavy-4x4": ((1, 56, 6, 6), (56, 56, 4, 4), dict(padding=2)),
    # an even kernel with "same" padding: the asymmetric remainder padded explicitly.
    "gemm-same": ((2, 3, 7, 7), (4, 3, 2, 2), dict(padding="same")),
}
ALGORITHMS = ["auto", "library", "gemm", "depthwise"]
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def _place(where, value, x, w, grad_out):
    """Puts `value` into the tensor `where` names; returns the weight transform for the case."""
    v = NONFINITE.get(value)
    last_h, last_w = x.shape[2] - 1, x.shape[3] - 1
    if where == "weight":
        w[1, 0, 0, 0] = v  # the top-left tap: it reads the padding along the top and left borders
        w[-1, 0, -1, -1] = v  # the bottom-right tap: the bottom and right borders
        w[2, 0, 1, 1] = v  # an inner tap
        return "identity" if value == "-inf" else "square"  # square(-inf) would be +inf
    if where == "exp-overflow":  # f(W) = exp(W) is Inf in float32 where W is finite
        w[1, 0, 0, 0] = 100.0
        w[-1, 0, -1, -1] = 100.0
        return "exp"
    if where == "input":
        x[0, 1, 0, 0] = v  # a corner
        x[0, 1, min(5, last_h), 0] = v  # the first column (the depthwise flat loops wrap onto it)
        x[-1, 2, min(6, last_h), last_w] = v  # the last column
        x[-1, 0, last_h, min(3, last_w)] = -v if value != "nan" else v  # the last row
        return "square"
    if where == "grad_output":
        last_oh, last_ow = grad_out.shape[2] - 1, grad_out.shape[3] - 1
        grad_out[0, 1, 0, min(2, last_ow)] = v  # the top row
        grad_out[-1, 2, last_oh, last_ow] = v  # the bottom-right corner
        grad_out[0, 3, min(2, last_oh), 0] = -v if value != "nan" else v  # the first column
        return "square"
    raise AssertionError(where)


def _cases():
    for where, values in (
        ("weight", ("nan", "inf", "-inf")),
        ("exp-overflow", ("100",)),
        ("input", ("nan", "inf", "-inf")),
        ("grad_output", ("nan", "inf", "-inf")),
    ):
        for value in values:
            yield where, value


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("where,value", list(_cases()), ids=[f"{w}-{v}" for w, v in _cases()])
def test_nonfinite_values_propagate_like_conv2d(geometry, algorithm, dtype, where, value):
    x_shape, w_shape, kwargs = GEOMETRIES[geometry]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, dtype=dtype, generator=g)
    w = torch.randn(w_shape, dtype=dtype, generator=g)
    b = torch.randn(w_shape[0], dtype=dtype, generator=g)
    grad_out = torch.randn(F.conv2d(x, w, b, **kwargs).shape, dtype=dtype, generator=g)
    transform = _place(where, value, x, w, grad_out)

    ref_params = [t.clone().requires_grad_(True) for t in (x, w, b)]
    ref = F.conv2d(ref_params[0], reference_f(transform, ref_params[1]), ref_params[2], **kwargs)
    ref_grads = torch.autograd.grad(ref, ref_params, grad_out)
    params = [t.clone().requires_grad_(True) for t in (x, w, b)]
    with fusedtie.use_cpu_conv_algorithm(algorithm):
        out = fusedtie.tied_conv2d(params[0], params[1], params[2], transform, "identity", **kwargs)
        grads = torch.autograd.grad(out, params, grad_out)

    triples = list(zip(("output", "input grad", "weight grad", "bias grad"), (out, *grads), (ref, *ref_grads)))
    differences = nonfinite_mask_differences(triples)
    for name, ours, theirs in triples:
        finite = torch.isfinite(theirs)
        if torch.equal(torch.isfinite(ours), finite):
            torch.testing.assert_close(ours[finite], theirs[finite], **TOLERANCE[dtype], msg=lambda m: f"{name}: {m}")
    assert not differences, "; ".join(differences)
    # Not vacuous: the case reaches the results, and some of each stays finite.
    results = (ref, *ref_grads)
    if where != "exp-overflow" or dtype == torch.float32:
        assert any(not torch.isfinite(t).all() for t in results)
    assert all(torch.isfinite(t).any() for t in results)


@pytest.mark.parametrize("algorithm", ["gemm", "depthwise"])
def test_finite_data_stays_exact(algorithm):
    """The non-finite rule changes nothing on finite data: the fast kernels match the float64
    reference to float32 accuracy on a padded geometry, forward and backward."""
    geometry = "depthwise" if algorithm == "depthwise" else "gemm"
    x_shape, w_shape, kwargs = GEOMETRIES[geometry]
    x = torch.randn(x_shape)
    w = torch.randn(w_shape)
    b = torch.randn(w_shape[0])
    ref_params = [t.double().requires_grad_(True) for t in (x, w, b)]
    ref = F.conv2d(ref_params[0], ref_params[1] ** 2, ref_params[2], **kwargs)
    grad_out = torch.randn(ref.shape, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, ref_params, grad_out)
    params = [t.clone().requires_grad_(True) for t in (x, w, b)]
    with fusedtie.use_cpu_conv_algorithm(algorithm):
        out = fusedtie.tied_conv2d(params[0], params[1], params[2], "square", **kwargs)
        grads = torch.autograd.grad(out, params, grad_out.float())
    for ours, theirs in zip((out, *grads), (ref, *ref_grads)):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-4)
