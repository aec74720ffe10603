"""The Python face of the operators: argument normalisation and fake kernels (autograd is C++).

``torch.ops.fusedtie.tied_conv2d`` takes fully normalised arguments (4-D input, pairs, padding as
(top, bottom, left, right)); ``tied_conv2d`` below accepts everything ``F.conv2d`` accepts, and
``tied_conv_transpose2d`` everything ``F.conv_transpose2d`` accepts.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._library import LIB
from .transforms import Transform, check_transform_name

TransformLike = Union[str, Transform]
IntOrPair = Union[int, Sequence[int]]
PaddingLike = Union[str, int, Sequence[int]]


def _pair(value: IntOrPair, name: str) -> tuple[int, int]:
    """An int, or a sequence of one or two ints (as F.conv2d takes them), as a pair."""

    def as_int(v):
        if isinstance(v, bool):
            raise TypeError
        return operator.index(v)  # ints, numpy integers, 0-d integer tensors

    try:
        if isinstance(value, (tuple, list, torch.Size)):
            if len(value) == 1:
                return (as_int(value[0]),) * 2
            if len(value) == 2:
                return (as_int(value[0]), as_int(value[1]))
            raise TypeError
        return (as_int(value),) * 2
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None


def normalize_padding(
    padding: PaddingLike, kernel_size: Sequence[int], stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), with ``"same"`` split like F.conv2d: the odd pixel goes last."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions")
            sides = []
            for d in range(2):
                total = dilation[d] * (kernel_size[d] - 1)
                sides += [total // 2, total - total // 2]
            return tuple(sides)  # type: ignore[return-value]
        raise ValueError(f"Invalid padding string '{padding}', should be one of {{'valid', 'same'}}")
    ph, pw = _pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"negative padding is not supported, got {padding!r}")
    return (ph, ph, pw, pw)


def tied_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    transform: TransformLike = "square",
    bias_transform: TransformLike = "identity",
    stride: IntOrPair = 1,
    padding: PaddingLike = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
) -> Tensor:
    """``F.conv2d(input, f(weight), g(bias), stride, padding, dilation, groups)`` as one operator.

    ``weight`` and ``bias`` are the *source* tensors; f = ``transform`` and g = ``bias_transform``
    are applied inside the operator, and gradients reach the source through f' and g'. It accepts
    what ``F.conv2d`` accepts: unbatched 3-D input, channels_last and non-contiguous tensors, batch
    0, meta tensors (shape only); float32, float64, bfloat16 and float16.

    Args:
        input: ``(N, C_in, H, W)``, or unbatched ``(C_in, H, W)``.
        weight: the source weight W, ``(C_out, C_in / groups, kH, kW)``; the convolution uses f(W).
        bias: the source bias b, ``(C_out,)``, or None; the convolution uses g(b).
        transform: f: a name from ``available_transforms()`` or a ``Transform``.
        bias_transform: g, applied to ``bias``; ``"identity"`` (the default) uses the bias as it is.
        stride: an int, or a sequence of one or two ints.
        padding: an int, a sequence of one or two ints, ``"valid"`` or ``"same"`` (stride 1 only; for
            an even kernel the odd pixel goes at the bottom/right, as in ``F.conv2d``).
        dilation: an int, or a sequence of one or two ints.
        groups: the number of groups; it divides ``C_out``, and ``C_in = weight.shape[1] * groups``.

    Returns:
        The output ``(N, C_out, H_out, W_out)`` (``(C_out, H_out, W_out)`` for unbatched input),
            differentiable with respect to ``input``, ``weight`` and ``bias``.

    Raises:
        ValueError: an unknown transform; channels or groups that do not fit the weight; a
            non-positive stride or dilation, negative padding, or a kernel larger than the padded
            input.
        TypeError: a dtype other than the four floating types, operands of different dtypes, or a
            stride, padding or dilation that is not an int or a pair.

    Examples:
        >>> w = torch.randn(16, 16, 3, 3, requires_grad=True)
        >>> x = torch.randn(1, 16, 8, 8)
        >>> y = fusedtie.tied_conv2d(x, w, transform="square", padding=1)
        >>> torch.allclose(y, F.conv2d(x, w * w, padding=1), atol=1e-3)
        True
        >>> y.sum().backward()  # w.grad is 2 * w * dL/d(w ** 2)
    """
    t = Transform.parse(transform)
    bt = Transform.parse(bias_transform)
    _check_weight_and_groups(weight, groups, "(out_channels, in_channels/groups, kH, kW)")
    stride2 = _pair(stride, "stride")
    dilation2 = _pair(dilation, "dilation")
    padding4 = normalize_padding(padding, weight.shape[2:], stride2, dilation2)
    op_args = (t.name, t.op_alpha, bt.name, bt.op_alpha, stride2, padding4, dilation2, groups)
    return run_tied_conv2d(input, weight, bias, op_args)


def _check_weight_and_groups(weight, groups, weight_layout: str) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a tensor, got {type(weight).__name__}")
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups must be an int, got {groups!r}")
    if weight.dim() != 4:
        raise ValueError(f"expected a 4-D weight {weight_layout}, got weight of size {list(weight.shape)}")


def tied_conv_transpose2d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    transform: TransformLike = "identity",
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    output_padding: IntOrPair = 0,
    groups: int = 1,
    dilation: IntOrPair = 1,
) -> Tensor:
    """``F.conv_transpose2d(input, f(weight), bias, stride, padding, output_padding, groups, dilation)``
    as one operator: the decoder of a tied autoencoder.

    ``weight`` is the *source* tensor, typically an encoder ``nn.Conv2d``'s weight (its output
    channels are this op's input channels); f = ``transform`` is applied inside the operator and the
    gradient reaches the source through f'. ``bias`` is taken as it is (the decoder's own). The
    arguments are ``F.conv_transpose2d``'s, in its order; unbatched 3-D input, batch 0 and meta
    tensors are accepted as there.

    Args:
        input: ``(N, C_in, H, W)``, or unbatched ``(C_in, H, W)``, where ``C_in = weight.shape[0]``.
        weight: the source weight W, ``(C_in, C_out / groups, kH, kW)`` (an encoder's
            ``(out_channels, in_channels / groups, kH, kW)``); the convolution uses f(W).
        bias: ``(C_out,)`` or None, used as it is.
        transform: f: a name from ``available_transforms()`` or a ``Transform``.
        stride: an int, or a sequence of one or two ints.
        padding: an int, or a sequence of one or two ints (symmetric, as ``F.conv_transpose2d``'s).
        output_padding: the extra rows/columns at the bottom/right; smaller than the stride or the
            dilation.
        groups: the number of groups; it divides ``C_in``, and ``C_out = weight.shape[1] * groups``.
        dilation: an int, or a sequence of one or two ints.

    Returns:
        The output ``(N, C_out, H_out, W_out)`` (``(C_out, H_out, W_out)`` for unbatched input),
            differentiable with respect to ``input``, ``weight`` and ``bias``.

    Raises:
        ValueError: an unknown transform, channels or groups that do not fit the weight, or bad
            geometry (negative padding, an output padding too large, an empty output).
        TypeError: a dtype other than the four floating types, or operands of different dtypes.

    Examples:
        >>> w = torch.randn(8, 3, 4, 4, requires_grad=True)  # an encoder's 3 -> 8 weight
        >>> h = F.conv2d(torch.randn(1, 3, 32, 32), w, stride=2, padding=1)
        >>> h.shape
        torch.Size([1, 8, 16, 16])
        >>> fusedtie.tied_conv_transpose2d(h, w, stride=2, padding=1).shape
        torch.Size([1, 3, 32, 32])
    """
    t = Transform.parse(transform)
    _check_weight_and_groups(weight, groups, "(in_channels, out_channels/groups, kH, kW)")
    padding2 = _pair(padding, "padding")
    if min(padding2) < 0:
        raise ValueError(f"negative padding is not supported, got {padding!r}")
    op_args = (
        t.name,
        t.op_alpha,
        _pair(stride, "stride"),
        padding2,
        _pair(output_padding, "output_padding"),
        _pair(dilation, "dilation"),
        groups,
    )
    return run_tied_conv_transpose2d(input, weight, bias, op_args)


# Two ways to call each operator. torch.ops is what tracing (torch.compile, export) and
# __torch_function__ overrides must see. A plain eager call instead goes through the _C module's
# binding, which enters the dispatcher directly with the GIL released, as PyTorch's own generated
# bindings do: measured against F.conv2d on the same at::convolution, the torch.ops call cost 9 us
# more per call on a tiny conv and 2-3% more on a 3 ms one; the binding costs what F.conv2d does.
# Both run the same dispatcher entry (autograd, dispatch modes, the profiler all see the call).
_has_torch_function = torch._C._has_torch_function
_tied_conv2d_op = torch.ops.fusedtie.tied_conv2d.default
_tied_conv2d_eager = LIB.tied_conv2d_eager
_tied_conv_transpose2d_op = torch.ops.fusedtie.tied_conv_transpose2d.default
_tied_conv_transpose2d_eager = LIB.tied_conv_transpose2d_eager


# The test is written out in each (no helper call): this is every eager call's path.
def _call_tied_conv2d(input, weight, bias, op_args):
    if torch.compiler.is_compiling() or _has_torch_function((input, weight, bias)):
        return _tied_conv2d_op(input, weight, bias, *op_args)
    return _tied_conv2d_eager(input, weight, bias, *op_args)


def _call_tied_conv_transpose2d(input, weight, bias, op_args):
    if torch.compiler.is_compiling() or _has_torch_function((input, weight, bias)):
        return _tied_conv_transpose2d_op(input, weight, bias, *op_args)
    return _tied_conv_transpose2d_eager(input, weight, bias, *op_args)


def _call_batched(call, op_name: str, input, weight, bias, op_args):
    """``call`` (an operator on 4-D input) with the unbatched (3-D) case added, as F.conv2d has it."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a tensor, got {type(input).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
    dim = input.dim()
    if dim == 4:
        return call(input, weight, bias, op_args)
    if dim == 3:
        return call(input.unsqueeze(0), weight, bias, op_args).squeeze(0)
    raise ValueError(
        f"Expected 3D (unbatched) or 4D (batched) input to {op_name}, but got input of size: {list(input.shape)}"
    )


def run_tied_conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor], op_args: tuple) -> Tensor:
    """The operator call with arguments already normalised; adds the unbatched (3-D) case."""
    return _call_batched(_call_tied_conv2d, "tied_conv2d", input, weight, bias, op_args)


def run_tied_conv_transpose2d(input: Tensor, weight: Tensor, bias: Optional[Tensor], op_args: tuple) -> Tensor:
    """The transposed operator's call with arguments already normalised, unbatched input included."""
    return _call_batched(_call_tied_conv_transpose2d, "tied_conv_transpose2d", input, weight, bias, op_args)


def apply_transform(source: Tensor, transform: TransformLike) -> Tensor:
    """f(source) as a new tensor, differentiable: ``apply_transform(w, "square")`` is ``w * w``.

    The same CPU pass (or CUDA kernel) the operators run on the weight; its backward applies f'.

    Args:
        source: a floating-point tensor of any shape (float32, float64, bfloat16 or float16).
        transform: f: a name from ``available_transforms()`` or a ``Transform``.

    Returns:
        f(source), a new tensor of ``source``'s shape, dtype and device.

    Raises:
        ValueError: an unknown transform, or ``"scale"`` without its constant.
        TypeError: a transform that is neither a name nor a ``Transform``, or a non-floating dtype.

    Examples:
        >>> w = torch.tensor([-2.0, 0.5, 3.0])
        >>> fusedtie.apply_transform(w, "square")
        tensor([4.0000, 0.2500, 9.0000])
        >>> fusedtie.apply_transform(w, fusedtie.Transform("scale", alpha=0.5))
        tensor([-1.0000,  0.2500,  1.5000])
    """
    t = Transform.parse(transform)
    return torch.ops.fusedtie.transform(source, t.name, t.op_alpha)


@contextlib.contextmanager
def use_cpu_conv_algorithm(name: str) -> Iterator[None]:
    """Run the CPU path's convolutions with ``name`` inside the block (process-wide), then restore.

    ``"auto"`` (the default) picks per shape, and takes the GEMM path only where torch's BLAS is
    MKL on an Intel CPU at its full instruction set (``cpu_info()`` says whether and why);
    ``"library"`` is ``at::convolution`` (oneDNN);
    ``"gemm"`` is fusedtie's im2col + BLAS GEMM (``csrc/cpu/gemm_conv2d.cpp``), where it applies
    (groups 1, float32/float64, contiguous NCHW); ``"depthwise"`` is fusedtie's depthwise kernel with
    f and f' fused into it (``csrc/cpu/depthwise_conv2d.cpp``), where it applies (groups ==
    in_channels, float32/float64, contiguous NCHW); ``"brgemm"`` is im2col and oneDNN's brgemm
    micro-kernel with f applied to each weight tile as it is packed and f' to each weight-gradient
    tile as it is written (``csrc/cpu/brgemm_conv2d.cpp``), where it applies (groups 1, float32,
    contiguous NCHW, batch 1 or outputs under 32x32). Where the forced one does not apply, the library
    runs. All compute the same convolution; this is a knob for benchmarks and tests. See
    docs/cpu-algorithms.md.

    Args:
        name: ``"auto"``, ``"library"``, ``"gemm"``, ``"depthwise"`` or ``"brgemm"``.

    Yields:
        Nothing; the setting holds inside the ``with`` block and the previous one is restored on
            exit, however the block ends.

    Raises:
        ValueError: an unknown name (on entering the block).

    Examples:
        >>> x, w = torch.randn(1, 8, 16, 16), torch.randn(8, 1, 3, 3)
        >>> with fusedtie.use_cpu_conv_algorithm("depthwise"):
        ...     y = fusedtie.tied_conv2d(x, w, transform="tanh", padding=1, groups=8)
        ...     fusedtie.cpu_conv_algorithm_for(x, w, padding=1, groups=8)
        'depthwise'
    """
    previous = LIB.set_cpu_conv_algorithm(name)
    try:
        yield
    finally:
        LIB.set_cpu_conv_algorithm(previous)


def cpu_info() -> dict:
    """What the CPU path runs on and how ``auto`` chooses there.

    Returns:
        A dict with ``vendor`` and ``model`` (cpuid's strings), ``blas`` (``"MKL"`` or ``"other"``),
            ``gemm_under_auto`` (whether ``auto`` may take the GEMM path), ``reason`` (why, in words),
            ``brgemm_micro_kernel`` (whether oneDNN's micro-kernel runs the brgemm path), and
            ``transform_capability`` (the instruction set of the transform passes: ``"DEFAULT"``,
            ``"AVX2"`` or ``"AVX512"``).

    Examples:
        >>> info = fusedtie.cpu_info()
        >>> sorted(info)
        ['blas', 'brgemm_micro_kernel', 'gemm_under_auto', 'model', 'reason', 'transform_capability', 'vendor']
        >>> isinstance(info["gemm_under_auto"], bool)  # False on AMD CPUs
        True
    """
    info = dict(LIB.gemm_blas_assessment())
    info["brgemm_micro_kernel"] = LIB.brgemm_micro_kernel_available()
    info["transform_capability"] = LIB.cpu_transform_capability()
    return info


def cpu_conv_algorithm_for(
    input: Tensor,
    weight: Tensor,
    stride: IntOrPair = 1,
    padding: PaddingLike = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    *,
    backward: bool = False,
    input_gradient: bool = True,
) -> str:
    """The CPU algorithm ``tied_conv2d`` runs for this call's forward or, with ``backward=True``,
    its backward, under the current setting (``use_cpu_conv_algorithm``).

    Nothing is computed: the rule ``auto`` applies (or the forced setting, where it applies) is
    evaluated on the tensors' shapes, dtypes and layouts.

    Args:
        input: a 4-D input ``(N, C_in, H, W)`` (or a meta tensor of that shape).
        weight: the source weight, as ``tied_conv2d`` takes it.
        stride: as ``tied_conv2d`` takes it.
        padding: as ``tied_conv2d`` takes it.
        dilation: as ``tied_conv2d`` takes it.
        groups: as ``tied_conv2d`` takes it.
        backward: name the backward's algorithm rather than the forward's.
        input_gradient: with ``backward=True``, whether the backward computes the input gradient
            (False: only the weight and bias gradients, as for a network's first layer).

    Returns:
        ``"library"``, ``"gemm"``, ``"depthwise"`` or ``"brgemm"``, ``auto``'s choice or the forced
            setting where it applies (where it does not, ``"library"``).

    Examples:
        >>> x, w = torch.randn(1, 64, 56, 56), torch.randn(64, 1, 3, 3)
        >>> fusedtie.cpu_conv_algorithm_for(x, w, padding=1, groups=64)
        'depthwise'
    """
    stride2 = _pair(stride, "stride")
    dilation2 = _pair(dilation, "dilation")
    padding4 = normalize_padding(padding, weight.shape[2:], stride2, dilation2)
    return LIB.cpu_conv_algorithm_for(input, weight, stride2, padding4, dilation2, groups, backward, input_gradient)


@contextlib.contextmanager
def use_cuda_conv_algorithm(name: str) -> Iterator[None]:
    """Run the CUDA path's convolutions with ``name`` inside the block (process-wide), then restore.

    ``"auto"`` (the default) picks per shape by a heuristic; ``"autotune"`` times both choices once
    per (device, shape, dtype, layout, transform) and keeps the faster for the process, like
    ``torch.backends.cudnn.benchmark``; ``"fused"`` runs fusedtie's implicit-GEMM kernels, which
    apply f while loading the weight tiles and f' in the weight gradient's epilogue, wherever they
    support the call; ``"library"`` runs one elementwise kernel for f(W), then cuDNN
    (``at::convolution``), then one for f'(W) * dL/dW. All compute the same convolution. It applies
    to both operators (``tied_conv2d`` and ``tied_conv_transpose2d``). In a build without CUDA the
    setting is kept and has nothing to act on. ``fusedtie.clear_cuda_autotune_cache()`` forgets the
    choices ``"autotune"`` measured.

    Args:
        name: ``"auto"``, ``"autotune"``, ``"fused"`` or ``"library"``.

    Yields:
        Nothing; the setting holds inside the ``with`` block and the previous one is restored on
            exit, however the block ends.

    Raises:
        ValueError: an unknown name (on entering the block).

    Examples:
        >>> conv = nn.Conv2d(16, 16, 3, padding=1)
        >>> tied = fusedtie.FusedTiedConv2d(conv, "tanh")
        >>> with fusedtie.use_cuda_conv_algorithm("autotune"):  # on CUDA tensors
        ...     y = tied(torch.randn(2, 16, 32, 32))
    """
    previous = LIB.set_cuda_conv_algorithm(name)
    try:
        yield
    finally:
        LIB.set_cuda_conv_algorithm(previous)


# --- fake (meta) kernels --------------------------------------------------------------------------


def _suggested_format(t: Tensor) -> torch.memory_format:
    return torch._prims_common.suggest_memory_format(t)


_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_supported_dtype(dtype: torch.dtype, op: str) -> None:
    if dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"fusedtie::{op} supports floating-point tensors (float32, float64, bfloat16, float16), got {dtype}"
        )


def _check_operands_like_input(input, weight, bias) -> None:
    """Weight and bias (if any) share the input's dtype and device."""
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != input.dtype:
            raise TypeError(
                f"expected input and {name} to have the same dtype, got input {input.dtype} and {name} {t.dtype}"
            )
        if t.device != input.device:
            raise RuntimeError(
                f"expected input and {name} on the same device, got input on {input.device} and {name} on {t.device}"
            )


def _check_geometry_values(stride, padding, dilation) -> None:
    """The value rules both convolution operators share (their C++ params structs' messages)."""
    if min(stride) <= 0:
        raise ValueError(f"stride must be positive, got {list(stride)}")
    if min(dilation) <= 0:
        raise ValueError(f"dilation must be positive, got {list(dilation)}")
    if min(padding) < 0:
        raise ValueError(f"negative padding is not supported, got {list(padding)}")


def _check_tied_conv2d(input, weight, bias, transform, bias_transform, stride, padding, dilation, groups) -> None:
    """The fake kernel's argument checks: the rules and messages of TiedConv2dParams::check
    (csrc/conv_params.h), which checks real tensors. Both are exercised by tests/test_bad_input.py."""
    check_transform_name(transform)
    check_transform_name(bias_transform)
    if len(stride) != 2 or len(dilation) != 2 or len(padding) != 4:
        raise ValueError(f"expected stride and dilation pairs and 4 paddings, got {stride}, {dilation}, {padding}")
    _check_geometry_values(stride, padding, dilation)
    if groups <= 0:
        raise ValueError(f"groups must be a positive integer, got {groups}")
    if input.dim() != 4:
        raise ValueError(
            f"fusedtie::tied_conv2d expects a 4-D input (N, C, H, W), got input of size {list(input.shape)}"
        )
    if weight.dim() != 4:
        raise ValueError(f"fusedtie::tied_conv2d expects a 4-D weight, got weight of size {list(weight.shape)}")
    _check_supported_dtype(input.dtype, "tied_conv2d")
    _check_operands_like_input(input, weight, bias)
    out_channels = weight.shape[0]
    if out_channels % groups != 0:
        raise ValueError(f"out_channels ({out_channels}) must be divisible by groups ({groups})")
    if input.shape[1] != weight.shape[1] * groups:
        raise ValueError(
            f"Given groups={groups}, weight of size {list(weight.shape)}, expected input{list(input.shape)} "
            f"to have {weight.shape[1] * groups} channels, but got {input.shape[1]} channels instead"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_channels):
        raise ValueError(f"expected bias of size [{out_channels}] (out_channels), got {list(bias.shape)}")
    padded = [input.shape[2] + padding[0] + padding[1], input.shape[3] + padding[2] + padding[3]]
    extent = [dilation[d] * (weight.shape[2 + d] - 1) + 1 for d in range(2)]
    if padded[0] < extent[0] or padded[1] < extent[1]:
        raise ValueError(
            f"Calculated padded input size per channel: ({padded[0]} x {padded[1]}). Kernel size: "
            f"({extent[0]} x {extent[1]}). Kernel size can't be greater than actual input size"
        )


@torch.library.register_fake("fusedtie::tied_conv2d")
def _tied_conv2d_fake(
    input, weight, bias, transform, alpha, bias_transform, bias_alpha, stride, padding, dilation, groups
):
    _check_tied_conv2d(input, weight, bias, transform, bias_transform, stride, padding, dilation, groups)
    # The output's shape and memory format are aten.convolution's own, run on the fake tensors.
    top, bottom, left, right = padding
    sym_h, sym_w = min(top, bottom), min(left, right)
    if (top, left) != (bottom, right):
        input = F.pad(input, (left - sym_w, right - sym_w, top - sym_h, bottom - sym_h))
    return torch.ops.aten.convolution(input, weight, bias, stride, (sym_h, sym_w), dilation, False, (0, 0), groups)


@torch.library.register_fake("fusedtie::_tied_conv2d_backward")
def _tied_conv2d_backward_fake(
    grad_output,
    input,
    weight,
    bias,
    transform,
    alpha,
    bias_transform,
    bias_alpha,
    stride,
    padding,
    dilation,
    groups,
    output_mask,
):
    expected = _tied_conv2d_fake(
        input, weight, bias, transform, alpha, bias_transform, bias_alpha, stride, padding, dilation, groups
    )
    return _fake_gradients(grad_output, expected, input, weight, bias, output_mask)


def _fake_gradients(grad_output, expected, input, weight, bias, output_mask):
    """A backward fake kernel's checks of grad_output against the forward's (fake) output, and the
    gradients laid out in their tensors' suggested memory formats (every backend's rule)."""
    if grad_output.shape != expected.shape:
        raise ValueError(f"expected grad_output of size {list(expected.shape)}, got {list(grad_output.shape)}")
    if grad_output.dtype != input.dtype:
        raise TypeError(f"expected grad_output of dtype {input.dtype}, got {grad_output.dtype}")
    if output_mask[2] and bias is None:
        raise ValueError("output_mask asks for a bias gradient, but bias is None")

    def like(t):
        return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=_suggested_format(t))

    return (
        like(input) if output_mask[0] else None,
        like(weight) if output_mask[1] else None,
        like(bias) if output_mask[2] else None,
    )


def _check_output_padding(output_padding, stride, dilation) -> None:
    """F.conv_transpose2d's rule, with TiedConvTranspose2dParams' message (the layer checks it too)."""
    if min(output_padding) < 0:
        raise ValueError(f"negative output_padding is not supported, got {list(output_padding)}")
    for d in range(2):
        if output_padding[d] >= stride[d] and output_padding[d] >= dilation[d]:
            raise ValueError(
                f"output_padding must be smaller than either stride or dilation, got output_padding "
                f"{list(output_padding)}, stride {list(stride)}, dilation {list(dilation)}"
            )


def _check_tied_conv_transpose2d(
    input, weight, bias, transform, stride, padding, output_padding, dilation, groups
) -> None:
    """The fake kernel's argument checks: the rules and messages of TiedConvTranspose2dParams::check
    (csrc/conv_transpose_params.h), which checks real tensors; tests/test_conv_transpose.py runs
    both."""
    check_transform_name(transform)
    if len(stride) != 2 or len(padding) != 2 or len(output_padding) != 2 or len(dilation) != 2:
        raise ValueError(
            f"expected stride, padding, output_padding and dilation pairs, got {stride}, {padding}, "
            f"{output_padding}, {dilation}"
        )
    _check_geometry_values(stride, padding, dilation)
    _check_output_padding(output_padding, stride, dilation)
    if groups <= 0:
        raise ValueError(f"groups must be a positive integer, got {groups}")
    if input.dim() != 4:
        raise ValueError(
            f"fusedtie::tied_conv_transpose2d expects a 4-D input (N, C, H, W), got input of size {list(input.shape)}"
        )
    if weight.dim() != 4:
        raise ValueError(
            "fusedtie::tied_conv_transpose2d expects a 4-D weight (in_channels, out_channels/groups, kH, kW), "
            f"got weight of size {list(weight.shape)}"
        )
    _check_supported_dtype(input.dtype, "tied_conv_transpose2d")
    _check_operands_like_input(input, weight, bias)
    in_channels = weight.shape[0]
    if in_channels % groups != 0:
        raise ValueError(
            f"in_channels ({in_channels}, the weight's first dimension) must be divisible by groups ({groups}), "
            f"got weight of size {list(weight.shape)}"
        )
    if input.shape[1] != in_channels:
        raise ValueError(
            f"Given transposed=1, weight of size {list(weight.shape)}, expected input{list(input.shape)} to have "
            f"{in_channels} channels, but got {input.shape[1]} channels instead"
        )
    out_channels = weight.shape[1] * groups
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_channels):
        raise ValueError(
            f"expected bias of size [{out_channels}] (out_channels = weight.size(1) * groups), got {list(bias.shape)}"
        )
    out = [
        (input.shape[2 + d] - 1) * stride[d]
        - 2 * padding[d]
        + dilation[d] * (weight.shape[2 + d] - 1)
        + output_padding[d]
        + 1
        for d in range(2)
    ]
    if out[0] <= 0 or out[1] <= 0:
        raise ValueError(
            f"Given input size per channel: ({input.shape[2]} x {input.shape[3]}). Calculated output size per "
            f"channel: ({out[0]} x {out[1]}). Output size is too small"
        )


@torch.library.register_fake("fusedtie::tied_conv_transpose2d")
def _tied_conv_transpose2d_fake(
    input, weight, bias, transform, alpha, stride, padding, output_padding, dilation, groups
):
    _check_tied_conv_transpose2d(input, weight, bias, transform, stride, padding, output_padding, dilation, groups)
    # The output's shape and memory format are aten.convolution's own, run on the fake tensors.
    return torch.ops.aten.convolution(input, weight, bias, stride, padding, dilation, True, output_padding, groups)


@torch.library.register_fake("fusedtie::_tied_conv_transpose2d_backward")
def _tied_conv_transpose2d_backward_fake(
    grad_output, input, weight, bias, transform, alpha, stride, padding, output_padding, dilation, groups, output_mask
):
    expected = _tied_conv_transpose2d_fake(
        input, weight, bias, transform, alpha, stride, padding, output_padding, dilation, groups
    )
    return _fake_gradients(grad_output, expected, input, weight, bias, output_mask)


def _check_transform_args(source, transform, op):
    check_transform_name(transform)
    _check_supported_dtype(source.dtype, op)


@torch.library.register_fake("fusedtie::transform")
def _transform_fake(source, transform, alpha):
    _check_transform_args(source, transform, "transform")
    return torch.empty_like(source)


@torch.library.register_fake("fusedtie::_transform_backward")
def _transform_backward_fake(grad, source, transform, alpha):
    _check_transform_args(source, transform, "_transform_backward")
    if grad.shape != source.shape:
        raise ValueError(f"expected grad of size {list(source.shape)}, got {list(grad.shape)}")
    if grad.dtype != source.dtype:
        raise TypeError(f"expected grad of dtype {source.dtype}, got {grad.dtype}")
    return torch.empty_like(source)


# Autograd is registered in C++ (csrc/autograd.cpp): the Python wrapper of
# torch.library.register_autograd costs about 140 us per call in grad mode on the CPU.
