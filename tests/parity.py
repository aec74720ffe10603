"""The checks that run a case of tests/op_cases.py against the float64 oracle (tests/reference.py).

- ``run_case``: tied_conv2d on the CPU, forward and every gradient, at a fixed tolerance (float64:
  1e-9; float32: 1e-4), in any layout of op_cases.LAYOUTS.
- ``run_parity`` / ``run_transpose_parity``: tied_conv2d / tied_conv_transpose2d on a device, in a
  precision, forward and every gradient. float64 is held to a fixed tolerance (FLOAT64_REL_TOL of the
  largest reference magnitude). The other precisions (CUDA) are judged by the rule of the CUDA issue:
  the error against a float64 reference computed from the same (rounded) inputs is at most 2x the
  error of PyTorch's own ``F.conv2d(x, f(W), g(b))`` in the same dtype, plus a floor of a fraction
  of one unit of the dtype at the tensor's largest magnitude, so that an exact-zero error of
  PyTorch's (an empty batch, a reduction PyTorch happens to get exact) does not fail. TF32 (float32
  with torch.backends.cudnn.allow_tf32) may also use TF32's own error bound, 2**-9 * sum|x||f(W)|
  (and likewise for each gradient): TF32 *allows* tensor cores, so cuDNN may run a tiny shape
  exactly in float32 while fusedtie's kernel rounds its operands to TF32 (by truncation or to
  nearest), and both are right; exact float32 gets no such allowance, so a kernel that uses TF32
  when it is not allowed fails.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from op_cases import ALGORITHMS, GEOMETRY_DEFAULTS, needs_cuda, non_contiguous, with_layout
from reference import reference_conv2d, reference_conv_transpose2d, reference_f, transform_arg

import fusedtie

# --- the CPU operator at a fixed tolerance ---------------------------------------------------------


def run_case(
    transform,
    bias_mode,
    kernel,
    batch=2,
    cin=4,
    cout=6,
    hw=(9, 8),
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    dtype=torch.float64,
    layout="contiguous",
):
    if layout == "unbatched":
        batch = 1
    if layout == "expanded":  # stride-0 dimensions: one image and one filter repeated
        x = torch.randn(1, cin, *hw, dtype=dtype).expand(batch, cin, *hw)
        w = (torch.randn(1, cin // groups, *kernel, dtype=dtype) * 0.5).expand(cout, cin // groups, *kernel)
    else:
        x = torch.randn(batch, cin, *hw, dtype=dtype)
        w = torch.randn(cout, cin // groups, *kernel, dtype=dtype) * 0.5
    b = None if bias_mode == "none" else torch.randn(cout, dtype=dtype) * 0.5
    bias_transform = transform if bias_mode == "transform" else "identity"
    ref_out, ref_grads = reference_conv2d(x, w, b, transform, bias_transform, stride, padding, dilation, groups)

    if layout == "unbatched":
        x = x[0]
    elif layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
        w = w.to(memory_format=torch.channels_last)
    elif layout == "non_contiguous":
        x = non_contiguous(x)
        w = non_contiguous(w)
    x.requires_grad_(True)
    w.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    out = fusedtie.tied_conv2d(
        x, w, b, transform_arg(transform), transform_arg(bias_transform), stride, padding, dilation, groups
    )
    expected_shape = ref_out.shape[1:] if layout == "unbatched" else ref_out.shape
    assert out.shape == expected_shape
    assert out.dtype == dtype
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.double().reshape(ref_out.shape), ref_out, **tol)
    grad_out = torch.randn(ref_out.shape, dtype=torch.float64)
    inputs = [x, w] + ([b] if b is not None else [])
    grads = torch.autograd.grad(out, inputs, grad_out.to(dtype).reshape(out.shape))
    ref = ref_grads(grad_out)
    torch.testing.assert_close(grads[0].double().reshape(ref[0].shape), ref[0], **tol)
    torch.testing.assert_close(grads[1].double(), ref[1], **tol)
    if b is not None:
        torch.testing.assert_close(grads[2].double(), ref[2], **tol)


# --- the parity rule, on any device ---------------------------------------------------------------

# name -> (dtype, whether cuDNN-style TF32 is allowed)
PRECISIONS = {
    "float64": (torch.float64, False),
    "float32": (torch.float32, False),
    "tf32": (torch.float32, True),
    "float16": (torch.float16, False),
    "bfloat16": (torch.bfloat16, False),
}
# How many times PyTorch's own error ours may be, and the floor, as a fraction of the tensor's
# largest reference magnitude (float32: a few ulp of accumulation-order difference; fp16/bf16: a
# quarter of the dtype's eps, i.e. half a unit roundoff).
ERROR_FACTOR = 2.0
TF32_BOUND = 2.0**-9  # two operands, each rounded to a 10-bit mantissa (truncation: < 2**-10 each)
FLOOR_REL = {"float32": 1e-6, "tf32": 1e-6, "float16": 2.0**-12, "bfloat16": 2.0**-9}
ABS_FLOOR = 1e-6
FLOAT64_REL_TOL = 1e-10


@contextlib.contextmanager
def cudnn_tf32(enabled: bool):
    """torch.backends.cudnn.allow_tf32, which fusedtie's float32 CUDA path follows as cuDNN does."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous


@contextlib.contextmanager
def cuda_algorithm(name: str):
    with fusedtie.use_cuda_conv_algorithm(name):
        assert fusedtie._LIB.cuda_conv_algorithm() == name
        yield


def on_device(device: str, algorithm: str | None):
    """The CUDA algorithm setting on "cuda"; nothing on the CPU (algorithm None)."""
    if device == "cpu":
        assert algorithm is None, f"no CUDA algorithm ({algorithm!r}) on the CPU"
        return contextlib.nullcontext()
    return cuda_algorithm(algorithm)


def randn(shape, dtype=torch.float32, scale=1.0, device="cuda"):
    """Generated on the CPU (the same values on any GPU), rounded to dtype, then moved."""
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device)


def max_error(t, ref):
    if ref.numel() == 0:
        return 0.0
    return (t.detach().double().reshape(ref.shape) - ref).abs().max().item()


def check_against_reference(name, ours, theirs, ref, precision, what="", allowance=0.0, device="cuda"):
    """float64: a fixed tolerance. Otherwise: at most ERROR_FACTOR x PyTorch's error in the same
    dtype (``theirs``), or ``allowance`` if larger (TF32's own bound), plus the floor. NaN anywhere
    fails (NaN <= tol is False)."""
    dtype = PRECISIONS[precision][0]
    assert ours.dtype == dtype, f"{name}: dtype {ours.dtype}, expected {dtype}"
    assert ours.device.type == device, f"{name}: on {ours.device}"
    assert ours.numel() == ref.numel(), f"{name}: {list(ours.shape)} against reference {list(ref.shape)}"
    if ref.numel() == 0:
        return
    scale = ref.abs().max().item()
    err = max_error(ours, ref)
    if precision == "float64":
        err_torch = float("nan")
        tol = FLOAT64_REL_TOL * scale + 1e-12
    else:
        err_torch = max_error(theirs, ref)
        tol = max(ERROR_FACTOR * err_torch, allowance) + FLOOR_REL[precision] * scale + ABS_FLOOR
    assert err <= tol, (
        f"{name} ({precision}{', ' + what if what else ''}): max error {err:.4g} against the float64 "
        f"reference; PyTorch's own {precision} error {err_torch:.4g}; TF32 allowance {allowance:.4g}; "
        f"allowed {tol:.4g}; "
        f"largest |reference| {scale:.4g}"
    )


def run_parity(device, algorithm, precision, transform, bias_mode, geometry):
    """tied_conv2d on ``device`` (under the CUDA ``algorithm`` on "cuda") in ``precision``, with a
    geometry of op_cases.GEOMETRIES (overrides of op_cases.GEOMETRY_DEFAULTS), against the oracle."""
    dtype, tf32 = PRECISIONS[precision]
    g = {**GEOMETRY_DEFAULTS, **geometry}
    layout = g["layout"]
    batch = 1 if layout == "unbatched" else g["batch"]
    x = randn((batch, g["cin"], *g["hw"]), dtype, device=device)
    w = randn((g["cout"], g["cin"] // g["groups"], *g["kernel"]), dtype, 0.5, device=device)
    b = None if bias_mode == "none" else randn((g["cout"],), dtype, 0.5, device=device)
    bias_transform = transform if bias_mode == "transform" else "identity"
    conv = (g["stride"], g["padding"], g["dilation"], g["groups"])
    # the oracle, from the very values ours gets (already rounded to dtype)
    ref_out, ref_grads = reference_conv2d(x, w, b, transform, bias_transform, *conv)
    grad_out = randn(tuple(ref_out.shape), dtype, device=device)
    ref = [ref_out, *ref_grads(grad_out.double())]
    allowances = tf32_allowances(x, w, transform, conv, grad_out) if tf32 else [0.0] * 4

    if layout == "unbatched":
        x = x[0].clone()
    else:
        x, w = with_layout(layout, x, w)
    leaves = [x.requires_grad_(True), w.requires_grad_(True)] + ([b.requires_grad_(True)] if b is not None else [])

    with cudnn_tf32(tf32), on_device(device, algorithm):
        out = fusedtie.tied_conv2d(x, w, b, transform_arg(transform), transform_arg(bias_transform), *conv)
        grads = torch.autograd.grad(out, leaves, grad_out.reshape(out.shape))
        # PyTorch's own computation in the same dtype and layout, for the error rule
        theirs = F.conv2d(x, reference_f(transform, w), None if b is None else reference_f(bias_transform, b), *conv)
        their_grads = torch.autograd.grad(theirs, leaves, grad_out.reshape(theirs.shape))

    assert out.shape == theirs.shape, (list(out.shape), list(theirs.shape))
    for leaf, grad in zip(leaves, grads):
        assert grad.shape == leaf.shape
    what = f"{device}, {algorithm}, {transform}, bias {bias_mode}, {geometry['id']}"
    names = ["output", "grad_input", "grad_weight", "grad_bias"]
    for name, ours, them, r, allowance in zip(names, [out, *grads], [theirs, *their_grads], ref, allowances):
        check_against_reference(name, ours, them, r, precision, what, allowance, device=device)


def tf32_allowances(x, w, transform, conv, grad_out):
    """TF32's error bound for the output and the input and weight gradients: TF32_BOUND times the
    largest sum of |operand| products that each is made of (conv(|x|, |f(W)|), its transposed
    conv of |grad_out|, and corr(|x|, |grad_out|) * |f'(W)|). The bias gradient is a plain float32
    reduction of grad_out, with no allowance."""
    w64 = w.detach().double().requires_grad_(True)
    fw = reference_f(transform, w64)
    (fprime,) = torch.autograd.grad(fw.sum(), w64)
    xa = x.detach().double().abs().requires_grad_(True)
    fwa = fw.detach().abs().requires_grad_(True)
    out = F.conv2d(xa, fwa, None, *conv)
    if out.numel() == 0:
        return [0.0] * 4
    gx, gfw = torch.autograd.grad(out, (xa, fwa), grad_out.double().abs())
    bounds = [out.detach(), gx, gfw * fprime.abs()]
    return [TF32_BOUND * t.max().item() for t in bounds] + [0.0]


# --- the transposed operator ------------------------------------------------------------------------
# tied_conv_transpose2d runs the same kernels as tied_conv2d with their roles swapped (its forward is
# the input-gradient kernel, its input gradient the forward kernel, its weight gradient the
# weight-gradient kernel with x and dy exchanged), so it gets the same parity rule.


def transpose_tf32_allowances(x, w, transform, conv, grad_out):
    """tf32_allowances for the transposed convolution: TF32_BOUND times the largest sum of |operand|
    products of the output and of the input and weight gradients; none for the bias gradient."""
    w64 = w.detach().double().requires_grad_(True)
    fw = reference_f(transform, w64)
    (fprime,) = torch.autograd.grad(fw.sum(), w64)
    xa = x.detach().double().abs().requires_grad_(True)
    fwa = fw.detach().abs().requires_grad_(True)
    out = F.conv_transpose2d(xa, fwa, None, *conv)
    if out.numel() == 0:
        return [0.0] * 4
    gx, gfw = torch.autograd.grad(out, (xa, fwa), grad_out.double().abs())
    return [TF32_BOUND * t.max().item() for t in (out.detach(), gx, gfw * fprime.abs())] + [0.0]


def run_transpose_parity(device, algorithm, precision, transform, bias, geometry):
    """tied_conv_transpose2d on ``device`` with a geometry of op_cases.TRANSPOSE_GEOMETRIES."""
    gid, x_shape, w_shape, stride, padding, output_padding, groups, dilation, layout = geometry
    dtype, tf32 = PRECISIONS[precision]
    x = randn(x_shape, dtype, device=device)
    w = randn(w_shape, dtype, 0.5, device=device)
    b = randn((w_shape[1] * groups,), dtype, 0.5, device=device) if bias else None
    conv = (stride, padding, output_padding, groups, dilation)
    ref_out, ref_grads = reference_conv_transpose2d(x, w, b, transform, *conv)
    grad_out = randn(tuple(ref_out.shape), dtype, device=device)
    ref = [ref_out, *ref_grads(grad_out.double())]
    allowances = transpose_tf32_allowances(x, w, transform, conv, grad_out) if tf32 else [0.0] * 4
    x, w = with_layout(layout, x, w)
    leaves = [x.requires_grad_(True), w.requires_grad_(True)] + ([b.requires_grad_(True)] if bias else [])
    with cudnn_tf32(tf32), on_device(device, algorithm):
        out = fusedtie.tied_conv_transpose2d(x, w, b, transform_arg(transform), *conv)
        grads = torch.autograd.grad(out, leaves, grad_out)
        theirs = F.conv_transpose2d(x, reference_f(transform, w), b, *conv)
        their_grads = torch.autograd.grad(theirs, leaves, grad_out)
    assert out.shape == theirs.shape, (list(out.shape), list(theirs.shape))
    # the layout rule of the fake kernel: aten.convolution's output format, each gradient its tensor's
    assert out.is_contiguous(memory_format=torch._prims_common.suggest_memory_format(theirs))
    for leaf, grad in zip(leaves, grads):
        assert grad.shape == leaf.shape
    what = f"transposed, {device}, {algorithm}, {transform}, bias {bias}, {gid}"
    names = ["output", "grad_input", "grad_weight", "grad_bias"]
    for name, ours, them, r, allowance in zip(names, [out, *grads], [theirs, *their_grads], ref, allowances):
        check_against_reference(name, ours, them, r, precision, what, allowance, device=device)


def cycled_runs(geometries):
    """(gi, geometry, device, algorithm, precision, pi, ai) for the parity grids: per geometry, the CPU
    in float64 (indexed as CUDA's first precision and algorithm) and on "cuda" every precision x
    algorithm; the indexes let a grid cycle its transform and bias through the runs."""
    for gi, geometry in enumerate(geometries):
        yield gi, geometry, "cpu", None, "float64", 0, 0
        for pi, precision in enumerate(PRECISIONS):
            for ai, algorithm in enumerate(ALGORITHMS):
                yield gi, geometry, "cuda", algorithm, precision, pi, ai


def device_runs(algorithms, precisions):
    """(device, algorithm, precision) parameters: the CPU in float64 (no CUDA algorithm), and on
    "cuda" every algorithm x precision, skipped without a GPU. The ids are "cpu-float64" and
    "cuda-<algorithm>-<precision>"."""
    return [pytest.param("cpu", None, "float64", id="cpu-float64")] + [
        pytest.param("cuda", algorithm, precision, marks=needs_cuda, id=f"cuda-{algorithm}-{precision}")
        for algorithm in algorithms
        for precision in precisions
    ]
