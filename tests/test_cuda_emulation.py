"""The fused CUDA-core kernels and their host code, run on the CPU by an emulation of CUDA's execution
model (csrc/cuda/cuda_emulation.h; the bindings in tests/cuda_emulation/), against the float64
oracle. Runs everywhere, GPU or not.

What it checks: the CUDA-core kernels' index arithmetic, tiling, padding and stride handling, the
weight gradient's split over pixels and its fixed-order reduction (with one split and with many),
the epilogues (g(b), f'(W)), and the host code of csrc/cuda/fused_conv2d.cu: geometry, layouts, and
the transposed convolution's role swaps (its forward on the input-gradient kernel with the bias in
the epilogue, its input gradient on the forward kernel, its weight gradient with x and dy
exchanged). Each CUDA thread of a block is one std::thread, __shared__ memory is shared by them and
__syncthreads is a barrier, so a missing barrier or a thread reading another's tile before it is
written can show as a wrong value, but nothing here models warps, the GPU memory model, or timing.
The geometries are tests/op_cases.py's, the ones the parity grid runs on the CPU and the GPU.
Not covered: the tensor-core kernels (inline PTX), the elementwise kernels, the dispatchers'
choice, and anything about speed. It is a CPU run of the CUDA source, not a GPU run: tests/test_cuda.py
remains the check on a GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from op_cases import GEOMETRIES, GEOMETRY_DEFAULTS, TRANSFORMS, TRANSPOSE_GEOMETRIES, with_layout
from reference import reference_conv2d, reference_conv_transpose2d, transform_arg

from fusedtie.ops import _pair, normalize_padding

ROOT = Path(__file__).resolve().parent.parent
# name -> (dtype, torch.backends.cudnn.allow_tf32, tolerance relative to max(1, largest |reference|))
PRECISIONS = {
    "float64": (torch.float64, False, 1e-10),
    "float32": (torch.float32, False, 2e-5),  # exact float32: the CUDA-core kernels
    "tf32": (torch.float32, True, 5e-3),  # TF32 allowed: the tensor-core kernels where aligned
    "bfloat16": (torch.bfloat16, False, 2e-2),
    "float16": (torch.float16, False, 4e-3),
}


@pytest.fixture(scope="module")
def emulated():
    """The emulation module, JIT-built once (about a minute on two cores; cached in build/)."""
    from torch.utils import cpp_extension

    build = ROOT / "build" / "cuda_emulation"
    build.mkdir(parents=True, exist_ok=True)
    sources = [
        str(ROOT / "tests" / "cuda_emulation" / name)
        for name in ("bindings.cpp", "host.cpp", "simt_kernels.cpp", "mma_kernels.cpp")
    ]
    return cpp_extension.load(
        name="fusedtie_cuda_emulation",
        sources=sources,
        extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=["-O2", "-std=c++20", "-Wno-unknown-pragmas", "-Wno-unused-variable", "-Wno-psabi"],
        build_directory=str(build),
        verbose=os.environ.get("FUSEDTIE_VERBOSE_BUILD", "0") == "1",
    )


def randn(shape, dtype, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)


@pytest.fixture(autouse=True)
def _restore_tf32():
    previous = torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32 = previous


def assert_close(name, ours, ref, precision, what):
    dtype, _, tolerance = PRECISIONS[precision]
    assert ours.dtype == dtype, f"{name}: dtype {ours.dtype}"
    assert tuple(ours.shape) == tuple(ref.shape), f"{name}: {list(ours.shape)} against {list(ref.shape)}"
    if ref.numel() == 0:
        return
    err = (ours.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    tol = tolerance * max(scale, 1.0)
    assert err <= tol, f"{name} ({what}): max error {err:.3g}, allowed {tol:.3g}, largest |reference| {scale:.3g}"


def transform_name_and_alpha(transform):
    t = transform_arg(transform)
    return (t.name, t.op_alpha) if not isinstance(t, str) else (t, 1.0)


# --- tied_conv2d: forward, input gradient, weight and bias gradients ---------------------------------

# Unbatched input is the Python layer's (it adds the batch dimension) and empty batches go to the
# library path: neither reaches the fused kernels.
CONV_CASES = [g for g in GEOMETRIES if g.get("layout", "contiguous") != "unbatched" and g.get("batch", 1) > 0]


def run_conv(emulated, precision, transform, bias_transform, geometry, has_bias=True):
    """Forward and backward of one call against the oracle; returns which passes ran on the
    tensor-core kernels (forward, input gradient), as the host code decided."""
    dtype, tf32, _ = PRECISIONS[precision]
    torch.backends.cudnn.allow_tf32 = tf32
    g = {**GEOMETRY_DEFAULTS, **geometry}
    x = randn((g["batch"], g["cin"], *g["hw"]), dtype)
    w = randn((g["cout"], g["cin"] // g["groups"], *g["kernel"]), dtype, 0.5)
    b = randn((g["cout"],), dtype, 0.5) if has_bias else None
    stride, dilation = _pair(g["stride"], "stride"), _pair(g["dilation"], "dilation")
    padding = normalize_padding(g["padding"], w.shape[2:], stride, dilation)
    ref_out, ref_grads = reference_conv2d(
        x, w, b, transform, bias_transform, g["stride"], g["padding"], g["dilation"], g["groups"]
    )
    grad_out = randn(tuple(ref_out.shape), dtype)
    ref_gx, ref_gw, _ = ref_grads(grad_out.double())
    x, w = with_layout(g["layout"], x, w)
    name, alpha = transform_name_and_alpha(transform)
    bias_name, bias_alpha = transform_name_and_alpha(bias_transform)
    args = (name, alpha, bias_name, bias_alpha, list(stride), list(padding), list(dilation), g["groups"])
    what = f"{precision}, {transform}/{bias_transform}, {geometry['id']}"
    out = emulated.conv_forward(x, w, b, *args)
    assert_close("output", out, ref_out, precision, what)
    if g["layout"] == "channels_last" and dtype != torch.float64:
        assert out.is_contiguous(memory_format=torch.channels_last), "the output is not channels-last as cuDNN's"
    gx, gw, gb = emulated.conv_backward(grad_out, x, w, b, *args)
    assert_close("grad_input", gx, ref_gx, precision, what)
    assert_close("grad_weight", gw, ref_gw, precision, what)
    if has_bias:  # before the bias chain rule (the dispatcher's elementwise kernel applies g')
        assert_close("grad_bias before g'", gb, grad_out.double().sum((0, 2, 3)), precision, what)
    return (
        emulated.mma_supports(x, w, list(stride), g["groups"], False),
        emulated.mma_supports(x, w, list(stride), g["groups"], True),
    )


@pytest.mark.parametrize("geometry", CONV_CASES, ids=lambda g: g["id"])
@pytest.mark.parametrize("precision", ["float64", "float32", "tf32", "bfloat16"])
def test_conv_geometry_grid(emulated, precision, geometry):
    i = CONV_CASES.index(geometry)
    run_conv(
        emulated,
        precision,
        TRANSFORMS[i % len(TRANSFORMS)],
        TRANSFORMS[(i + 3) % len(TRANSFORMS)],
        geometry,
        has_bias=i % 3 != 0,
    )


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_conv_every_transform(emulated, transform):
    run_conv(emulated, "float64", transform, transform, GEOMETRIES[1])


def tensor_cores_expected(precision, gathered_channels_per_group):
    """The README's rule: tensor cores where the gathered side (x for a forward, dy for an input
    gradient) has a multiple of 8 (16-bit types) or 4 (TF32) channels per group."""
    vector = 4 if precision == "tf32" else 8
    return gathered_channels_per_group % vector == 0


# shapes whose forward the tensor-core kernels take in every 16-bit and TF32 precision; the strided
# ones run the tensor-core input gradient with its stride-divisibility gather
MMA_CASES = [
    g
    for g in CONV_CASES
    if g["id"] in ("3x3-p1-24to40-17x13", "3x3-p1-64to64-16x16", "3x3-p1", "1x1", "3x3-s2-p1-16to32-11x10")
] + [
    dict(
        id="5x4-s(2,3)-p(2,1)-d2-g2-16to16",
        kernel=(5, 4),
        stride=(2, 3),
        padding=(2, 1),
        dilation=2,
        groups=2,
        cin=16,
        cout=16,
        hw=(13, 14),
        batch=2,
    ),
]


@pytest.mark.parametrize("geometry", MMA_CASES, ids=lambda g: g["id"])
@pytest.mark.parametrize("precision", ["tf32", "bfloat16", "float16"])
def test_conv_tensor_core_kernels(emulated, precision, geometry):
    g = {**GEOMETRY_DEFAULTS, **geometry}
    forward_mma, input_grad_mma = run_conv(emulated, precision, "tanh", "square", geometry)
    assert forward_mma, "the host code did not pick the tensor-core forward"
    assert input_grad_mma == tensor_cores_expected(precision, g["cout"] // g["groups"])


def test_a_wrong_kernel_result_is_caught(emulated):
    """The checks here can fail: the emulated output compared with a different transform's oracle."""
    x, w = randn((1, 4, 6, 6), torch.float64), randn((4, 4, 3, 3), torch.float64)
    out = emulated.conv_forward(x, w, None, "square", 1.0, "identity", 1.0, [1, 1], [1, 1, 1, 1], [1, 1], 1)
    wrong, _ = reference_conv2d(x, w, None, "abs", padding=1)
    with pytest.raises(AssertionError, match="max error"):
        assert_close("output", out, wrong, "float64", "square against abs")


# --- tied_conv_transpose2d through the same kernels ------------------------------------------------


def run_transpose(emulated, precision, transform, geometry, has_bias=True):
    gid, x_shape, w_shape, stride, padding, output_padding, groups, dilation, layout = geometry
    dtype, tf32, _ = PRECISIONS[precision]
    torch.backends.cudnn.allow_tf32 = tf32
    x = randn(x_shape, dtype)
    w = randn(w_shape, dtype, 0.5)
    b = randn((w_shape[1] * groups,), dtype, 0.5) if has_bias else None
    conv = (stride, padding, output_padding, groups, dilation)
    ref_out, ref_grads = reference_conv_transpose2d(x, w, b, transform, *conv)
    grad_out = randn(tuple(ref_out.shape), dtype)
    ref_gx, ref_gw, _ = ref_grads(grad_out.double())
    x, w = with_layout(layout, x, w)
    name, alpha = transform_name_and_alpha(transform)
    args = (
        name,
        alpha,
        list(_pair(stride, "stride")),
        list(_pair(padding, "padding")),
        list(_pair(output_padding, "output_padding")),
        list(_pair(dilation, "dilation")),
        groups,
    )
    what = f"transposed, {precision}, {transform}, {gid}"
    out = emulated.transpose_forward(x, w, b, *args)
    assert_close("output", out, ref_out, precision, what)
    gx, gw = emulated.transpose_backward(grad_out, x, w, *args)
    assert_close("grad_input", gx, ref_gx, precision, what)
    assert_close("grad_weight", gw, ref_gw, precision, what)
    # the transposed forward is the convolution's input gradient, its input gradient the forward
    return (emulated.mma_supports(out, w, args[2], groups, True), emulated.mma_supports(out, w, args[2], groups, False))


FUSED_TRANSPOSE_CASES = [g for g in TRANSPOSE_GEOMETRIES if "fallback" not in g[0] and g[1][0] > 0]


@pytest.mark.parametrize("geometry", FUSED_TRANSPOSE_CASES, ids=lambda g: g[0])
@pytest.mark.parametrize("precision", ["float64", "float32", "tf32", "bfloat16"])
def test_transpose_geometry_grid(emulated, precision, geometry):
    i = FUSED_TRANSPOSE_CASES.index(geometry)
    run_transpose(emulated, precision, TRANSFORMS[i % len(TRANSFORMS)], geometry, has_bias=i % 2 == 0)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_transpose_every_transform(emulated, transform):
    run_transpose(emulated, "float64", transform, TRANSPOSE_GEOMETRIES[1])


@pytest.mark.parametrize(
    "geometry",
    [
        g
        for g in FUSED_TRANSPOSE_CASES
        if g[0]
        in (
            "3x3-s1-p1",
            "64to64-3x3-s1-p1",
            "3x3-s1-p1-channels_last",
            "4x4-s2-p1",
            "3x3-s2-p1-op1",
            "4x4-s2-p1-channels_last",
        )
    ],
    ids=lambda g: g[0],
)
@pytest.mark.parametrize("precision", ["tf32", "bfloat16", "float16"])
def test_transpose_tensor_core_kernels(emulated, precision, geometry):
    _, x_shape, w_shape, stride, _, _, groups, _, _ = geometry
    forward_mma, input_grad_mma = run_transpose(emulated, precision, "square", geometry)
    # the transposed forward gathers x (the weight's first dimension), its input gradient dy
    assert forward_mma == tensor_cores_expected(precision, w_shape[0] // groups)
    assert input_grad_mma == tensor_cores_expected(precision, w_shape[1])
    assert forward_mma or input_grad_mma, "neither pass ran on the tensor-core kernels"


def test_transpose_output_padding_past_the_stride_is_refused(emulated):
    """output_padding >= stride (allowed below the dilation) adds rows the convolution would not map
    back onto x: the fused kernels must refuse the call (the dispatcher then takes the library)."""
    (gid, x_shape, w_shape, stride, padding, output_padding, groups, dilation, _) = next(
        g for g in TRANSPOSE_GEOMETRIES if "fallback" in g[0]
    )
    x, w = randn(x_shape, torch.float64), randn(w_shape, torch.float64)
    args = (
        "identity",
        1.0,
        list(_pair(stride, "s")),
        list(_pair(padding, "p")),
        list(_pair(output_padding, "o")),
        list(_pair(dilation, "d")),
        groups,
    )
    assert not emulated.transpose_supported(x, w, None, *args)
    assert emulated.transpose_supported(x, w, None, args[0], args[1], args[2], args[3], [0, 0], args[5], args[6])
    with pytest.raises(RuntimeError, match="do not support"):
        emulated.transpose_forward(x, w, None, *args)
