"""tied_conv2d forward and every gradient against the float64 oracle, over a grid of geometries."""

import itertools

import pytest
import torch
from reference import reference_conv2d, transform_arg

import fusedtie

TRANSFORMS = fusedtie.available_transforms()
BIAS_MODES = ["none", "identity", "transform"]
KERNELS = [(1, 1), (3, 3), (3, 1), (5, 4)]


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
        x = _non_contiguous(x)
        w = _non_contiguous(w)
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


def _non_contiguous(t):
    """The same values, viewed with a gap in every row (a strided slice of a wider tensor)."""
    wide = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)
    wide[..., ::2] = t
    view = wide[..., ::2]
    assert not view.is_contiguous()
    return view


@pytest.mark.parametrize("padding", [1, (2, 1), "same", "valid"], ids=str)
@pytest.mark.parametrize("kernel", KERNELS, ids=str)
@pytest.mark.parametrize("bias_mode", BIAS_MODES)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_transforms_biases_padding(transform, bias_mode, kernel, padding):
    run_case(transform, bias_mode, kernel, padding=padding)


GEOMETRIES = [
    dict(stride=s, dilation=d, groups=g, padding=p)
    for s, d, g, p in itertools.product([1, 2, (2, 1)], [1, 2, (1, 2)], [1, 2], [1, (0, 2)])
]


@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("kernel", KERNELS, ids=str)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "-".join(f"{k}{v}" for k, v in g.items()))
def test_geometry(geometry, kernel, batch):
    run_case("tanh", "transform", kernel, batch=batch, hw=(11, 10), **geometry)


@pytest.mark.parametrize("layout", ["unbatched", "channels_last", "non_contiguous", "expanded"])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_layouts(transform, layout):
    run_case(transform, "transform", (3, 3), padding=1, layout=layout)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_float32_against_float64_reference(transform):
    run_case(transform, "transform", (3, 3), padding=1, stride=2, dtype=torch.float32)


def test_channels_last_output_format_matches_conv2d():
    x = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last)
    w = torch.randn(6, 4, 3, 3)
    out = fusedtie.tied_conv2d(x, w, transform="square", padding=1)
    ref = torch.nn.functional.conv2d(x, w * w, padding=1)
    assert out.is_contiguous(memory_format=torch.channels_last) == ref.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transform", ["square", "tanh", "softplus"])
def test_low_precision_error_within_twice_pytorch(transform, dtype):
    """Low precision: our error against float64 is at most 2x that of PyTorch's own same-dtype path."""
    x = torch.randn(2, 8, 12, 12)
    w = torch.randn(8, 8, 3, 3) * 0.3
    b = torch.randn(8) * 0.3
    ref, _ = reference_conv2d(x, w, b, transform, "identity", 1, 1)
    from reference import reference_f

    try:
        torch_low = torch.nn.functional.conv2d(x.to(dtype), reference_f(transform, w.to(dtype)), b.to(dtype), padding=1)
    except RuntimeError as error:  # a CPU build without this dtype's convolution
        pytest.skip(f"PyTorch's CPU conv2d has no {dtype}: {error}")
    ours = fusedtie.tied_conv2d(x.to(dtype), w.to(dtype), b.to(dtype), transform, padding=1)
    assert ours.dtype == dtype
    err_torch = (torch_low.double() - ref).abs().max().item()
    err_ours = (ours.double() - ref).abs().max().item()
    assert err_ours <= 2 * err_torch + 1e-6, (err_ours, err_torch)

    # the weight gradient, by the same rule
    grad_out = torch.randn(ref.shape)
    w64 = w.double().requires_grad_(True)
    out64 = torch.nn.functional.conv2d(x.double(), reference_f(transform, w64), b.double(), padding=1)
    (ref_grad,) = torch.autograd.grad(out64, w64, grad_out.double())
    w_low = w.to(dtype).requires_grad_(True)
    (torch_grad,) = torch.autograd.grad(
        torch.nn.functional.conv2d(x.to(dtype), reference_f(transform, w_low), b.to(dtype), padding=1),
        w_low,
        grad_out.to(dtype),
    )
    w_ours = w.to(dtype).requires_grad_(True)
    (our_grad,) = torch.autograd.grad(
        fusedtie.tied_conv2d(x.to(dtype), w_ours, b.to(dtype), transform, padding=1), w_ours, grad_out.to(dtype)
    )
    assert our_grad.dtype == dtype
    gerr_torch = (torch_grad.double() - ref_grad).abs().max().item()
    gerr_ours = (our_grad.double() - ref_grad).abs().max().item()
    assert gerr_ours <= 2 * gerr_torch + 1e-6, (gerr_ours, gerr_torch)
