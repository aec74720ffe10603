"""tied_conv2d forward and every gradient against the float64 oracle, over the case grid of
tests/op_cases.py.

The CPU grids (transforms x bias modes x kernels x padding, stride x dilation x groups, layouts,
float32) run on the CPU; the parity grid (the named geometries, and every transform and bias mode)
runs on each device: the CPU in float64, and on CUDA under each algorithm ("fused", "library",
"auto") in each precision (float64, float32, TF32, float16, bfloat16) by tests/parity.py's rule.
The "cuda" parameters are skipped without a GPU and a build with the CUDA kernels.
"""

import pytest
import torch
from op_cases import (
    ALGORITHMS,
    BIAS_MODES,
    GEOMETRIES,
    KERNELS,
    LAYOUTS,
    PADDINGS,
    PRODUCT_GEOMETRIES,
    TRANSFORM_BIAS_GEOMETRY,
    TRANSFORMS,
    needs_cuda,
)
from parity import PRECISIONS, cycled_runs, device_runs, on_device, randn, run_case, run_parity
from reference import reference_conv2d

import fusedtie


@pytest.mark.parametrize("padding", PADDINGS, ids=str)
@pytest.mark.parametrize("kernel", KERNELS, ids=str)
@pytest.mark.parametrize("bias_mode", BIAS_MODES)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_transforms_biases_padding(transform, bias_mode, kernel, padding):
    run_case(transform, bias_mode, kernel, padding=padding)


@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("kernel", KERNELS, ids=str)
@pytest.mark.parametrize("geometry", PRODUCT_GEOMETRIES, ids=lambda g: "-".join(f"{k}{v}" for k, v in g.items()))
def test_geometry(geometry, kernel, batch):
    run_case("tanh", "transform", kernel, batch=batch, hw=(11, 10), **geometry)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_layouts(transform, layout):
    run_case(transform, "transform", (3, 3), padding=1, layout=layout)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_float32_against_float64_reference(transform):
    run_case(transform, "transform", (3, 3), padding=1, stride=2, dtype=torch.float32)


# --- the parity grid, on each device ---------------------------------------------------------------


def _geometry_grid():
    """geometry x device (x precision x algorithm on CUDA), with the transform and the bias mode
    cycling; the CPU's case is the CUDA fused float64 case's."""
    params = []
    for gi, geometry, device, algorithm, precision, pi, ai in cycled_runs(GEOMETRIES):
        transform = TRANSFORMS[(gi + 2 * pi + 4 * ai) % len(TRANSFORMS)]
        bias_mode = BIAS_MODES[(2 * gi + pi + ai) % len(BIAS_MODES)]
        name = f"{geometry['id']}-{precision}" + (f"-{algorithm}" if algorithm else "")
        params.append(
            pytest.param(
                device,
                algorithm,
                precision,
                transform,
                bias_mode,
                geometry,
                marks=needs_cuda if device == "cuda" else (),
                id=f"{device}-{name}-{transform}-bias_{bias_mode}",
            )
        )
    return params


@pytest.mark.parametrize("device,algorithm,precision,transform,bias_mode,geometry", _geometry_grid())
def test_geometry_grid(device, algorithm, precision, transform, bias_mode, geometry):
    run_parity(device, algorithm, precision, transform, bias_mode, geometry)


@pytest.mark.parametrize("bias_mode", BIAS_MODES)
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("device,algorithm,precision", device_runs(ALGORITHMS, PRECISIONS))
def test_every_transform_and_bias(device, algorithm, precision, transform, bias_mode):
    run_parity(device, algorithm, precision, transform, bias_mode, TRANSFORM_BIAS_GEOMETRY)


@pytest.mark.parametrize(
    "device,algorithm",
    [pytest.param("cpu", None, id="cpu")]
    + [pytest.param("cuda", algorithm, marks=needs_cuda, id=f"cuda-{algorithm}") for algorithm in ALGORITHMS],
)
def test_channels_last_output_format_matches_conv2d(device, algorithm):
    x = randn((2, 8, 8, 8), device=device).to(memory_format=torch.channels_last)
    w = randn((12, 8, 3, 3), device=device)
    with on_device(device, algorithm):
        out = fusedtie.tied_conv2d(x, w, transform="square", padding=1)
    ref = torch.nn.functional.conv2d(x, w * w, padding=1)
    assert out.is_contiguous(memory_format=torch.channels_last) == ref.is_contiguous(memory_format=torch.channels_last)
    assert out.stride() == ref.stride()


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
