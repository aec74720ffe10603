"""The Python face of the operators: the functional API, argument normalisation and the call itself
(autograd is C++).

``torch.ops.fusedtie.tied_conv2d`` takes fully normalised arguments (4-D input, pairs, padding as
(top, bottom, left, right)); ``tied_conv2d`` below accepts everything ``F.conv2d`` accepts,
``tied_conv1d`` everything ``F.conv1d`` accepts (and runs the 2-d operator on an H = 1 view),
``tied_conv3d`` everything ``F.conv3d`` accepts (``torch.ops.fusedtie.tied_conv3d`` takes triples and
padding as (front, back, top, bottom, left, right)), ``tied_conv_transpose2d`` everything
``F.conv_transpose2d`` accepts, and ``tied_linear`` everything ``F.linear`` accepts (a 1x1
convolution on (N, C, 1, 1) views, or its transpose for the decoder). The normalised arguments are
a named tuple (fusedtie/_op_args.py); the fake kernels are fusedtie/_fake.py's, the settings
fusedtie/_settings.py's (re-exported here).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from . import _fake  # noqa: F401  (registers the fake kernels, once: this module is their only importer)
from ._checks import check_geometry_values, check_groups_and_channels, check_kernel_not_empty
from ._library import LIB
from ._op_args import (
    LINEAR_CONV2D_ARGS,
    LINEAR_CONV_TRANSPOSE2D_ARGS,
    TiedConv2dArgs,
    TiedConv3dArgs,
    TiedConvTranspose2dArgs,
    _single,
    _triple,
    as_2d_geometry,
    as_3d_geometry,
)
from ._op_args import IntOrPair as IntOrPair
from ._op_args import IntOrTriple as IntOrTriple
from ._op_args import PaddingLike as PaddingLike
from ._op_args import TransformLike as TransformLike
from ._op_args import _pair as _pair
from ._op_args import normalize_padding as normalize_padding
from ._settings import cpu_conv_algorithm_for as cpu_conv_algorithm_for
from ._settings import cpu_info as cpu_info
from ._settings import use_cpu_conv_algorithm as use_cpu_conv_algorithm
from ._settings import use_cuda_conv_algorithm as use_cuda_conv_algorithm
from .transforms import Transform


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
    args = TiedConv2dArgs(t.name, t.op_alpha, bt.name, bt.op_alpha, stride2, padding4, dilation2, groups)
    return run_tied_conv2d(input, weight, bias, args)


def _check_weight_and_groups(weight, groups, weight_layout: str, dim: int = 4) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a tensor, got {type(weight).__name__}")
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups must be an int, got {groups!r}")
    if weight.dim() != dim:
        raise ValueError(f"expected a {dim}-D weight {weight_layout}, got weight of size {list(weight.shape)}")


def tied_conv1d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    transform: TransformLike = "identity",
    bias_transform: TransformLike = "identity",
    stride: IntOrPair = 1,
    padding: PaddingLike = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
) -> Tensor:
    """``F.conv1d(input, f(weight), g(bias), stride, padding, dilation, groups)`` as one operator.

    The 2-d operator (``tied_conv2d``'s) on an H = 1 view: input ``(N, C_in, 1, L)``, weight
    ``(C_out, C_in / groups, 1, K)``, stride ``(1, stride)``, padding ``(0, padding)``, dilation
    ``(1, dilation)``; the output's H = 1 axis is dropped. So it runs every CPU algorithm and the fused
    CUDA kernels, gradients reach the source through the views and f', and it accepts what
    ``F.conv1d`` accepts: unbatched 2-D input, non-contiguous tensors, batch 0, meta tensors;
    float32, float64, bfloat16 and float16.

    Args:
        input: ``(N, C_in, L)``, or unbatched ``(C_in, L)``.
        weight: the source weight W, ``(C_out, C_in / groups, K)``; the convolution uses f(W).
        bias: the source bias b, ``(C_out,)``, or None; the convolution uses g(b).
        transform: f: a name from ``available_transforms()`` or a ``Transform``; ``"identity"`` (the
            default) uses the weight as it is.
        bias_transform: g, applied to ``bias``; ``"identity"`` (the default) uses the bias as it is.
        stride: an int, or a sequence of one int.
        padding: an int, a sequence of one int, ``"valid"`` or ``"same"`` (stride 1 only; for an even
            kernel the odd element goes on the right, as in ``F.conv1d``).
        dilation: an int, or a sequence of one int.
        groups: the number of groups; it divides ``C_out``, and ``C_in = weight.shape[1] * groups``.

    Returns:
        The output ``(N, C_out, L_out)`` (``(C_out, L_out)`` for unbatched input), differentiable with
            respect to ``input``, ``weight`` and ``bias``.

    Raises:
        ValueError: an unknown transform; an input that is not 2-D or 3-D, a weight that is not 3-D;
            channels or groups that do not fit the weight; a non-positive stride or dilation,
            negative padding, or a kernel larger than the padded input.
        TypeError: a dtype other than the four floating types, operands of different dtypes, or a
            stride, padding or dilation that is not an int or a sequence of one int.

    Examples:
        >>> w = torch.randn(16, 8, 3, requires_grad=True)
        >>> x = torch.randn(2, 8, 50)
        >>> y = fusedtie.tied_conv1d(x, w, transform="tanh", padding="same")
        >>> torch.allclose(y, F.conv1d(x, torch.tanh(w), padding="same"), atol=1e-5)
        True
        >>> y.sum().backward()  # w.grad is (1 - tanh(w) ** 2) * dL/d(tanh(w))
    """
    t = Transform.parse(transform)
    bt = Transform.parse(bias_transform)
    _check_weight_and_groups(weight, groups, "(out_channels, in_channels/groups, kW)", dim=3)
    check_kernel_not_empty(weight)
    stride1 = _single(stride, "stride")
    dilation1 = _single(dilation, "dilation")
    padding1 = padding if isinstance(padding, str) else _single(padding, "padding")
    check_geometry_values(stride1, (0,) if isinstance(padding1, str) else padding1, dilation1)
    stride2, padding4, dilation2 = as_2d_geometry(weight.shape[2:], stride1, padding1, dilation1)
    args = TiedConv2dArgs(t.name, t.op_alpha, bt.name, bt.op_alpha, stride2, padding4, dilation2, groups)
    return run_tied_conv1d(input, weight, bias, args)


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
    args = TiedConvTranspose2dArgs(
        t.name,
        t.op_alpha,
        _pair(stride, "stride"),
        padding2,
        _pair(output_padding, "output_padding"),
        _pair(dilation, "dilation"),
        groups,
    )
    return run_tied_conv_transpose2d(input, weight, bias, args)


def tied_conv3d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    transform: TransformLike = "identity",
    bias_transform: TransformLike = "identity",
    stride: IntOrTriple = 1,
    padding: PaddingLike = 0,
    dilation: IntOrTriple = 1,
    groups: int = 1,
) -> Tensor:
    """``F.conv3d(input, f(weight), g(bias), stride, padding, dilation, groups)`` as one operator.

    ``weight`` and ``bias`` are the *source* tensors; f = ``transform`` and g = ``bias_transform``
    are applied inside the operator (``torch.ops.fusedtie.tied_conv3d``), and gradients reach the
    source through f' and g'. On the CPU and on CUDA it runs the library path: f(W) in one pass,
    the library's convolution (oneDNN, cuDNN), the chain rule in place on the weight gradient; the
    CPU and CUDA algorithm settings, which choose among the 2-d kernels, do not apply. It accepts
    what ``F.conv3d`` accepts: unbatched 4-D input, channels_last_3d and non-contiguous tensors,
    batch 0, meta tensors (shape only); float32, float64, bfloat16 and float16.

    Args:
        input: ``(N, C_in, D, H, W)``, or unbatched ``(C_in, D, H, W)``.
        weight: the source weight W, ``(C_out, C_in / groups, kD, kH, kW)``; the convolution uses f(W).
        bias: the source bias b, ``(C_out,)``, or None; the convolution uses g(b).
        transform: f: a name from ``available_transforms()`` or a ``Transform``; ``"identity"`` (the
            default) uses the weight as it is.
        bias_transform: g, applied to ``bias``; ``"identity"`` (the default) uses the bias as it is.
        stride: an int, or a sequence of one or three ints.
        padding: an int, a sequence of one or three ints, ``"valid"`` or ``"same"`` (stride 1 only;
            for an even kernel the odd element goes at the back/bottom/right, as in ``F.conv3d``).
        dilation: an int, or a sequence of one or three ints.
        groups: the number of groups; it divides ``C_out``, and ``C_in = weight.shape[1] * groups``.

    Returns:
        The output ``(N, C_out, D_out, H_out, W_out)`` (without N for unbatched input),
            differentiable with respect to ``input``, ``weight`` and ``bias``.

    Raises:
        ValueError: an unknown transform; an input that is not 4-D or 5-D, a weight that is not 5-D;
            channels or groups that do not fit the weight; a non-positive stride or dilation,
            negative padding, or a kernel larger than the padded input.
        TypeError: a dtype other than the four floating types, operands of different dtypes, or a
            stride, padding or dilation that is not an int or a sequence of one or three ints.

    Examples:
        >>> w = torch.randn(8, 4, 3, 3, 3, requires_grad=True)
        >>> x = torch.randn(2, 4, 6, 10, 10)
        >>> y = fusedtie.tied_conv3d(x, w, transform="tanh", padding="same")
        >>> torch.allclose(y, F.conv3d(x, torch.tanh(w), padding="same"), atol=1e-5)
        True
        >>> y.sum().backward()  # w.grad is (1 - tanh(w) ** 2) * dL/d(tanh(w))
    """
    t = Transform.parse(transform)
    bt = Transform.parse(bias_transform)
    _check_weight_and_groups(weight, groups, "(out_channels, in_channels/groups, kD, kH, kW)", dim=5)
    check_kernel_not_empty(weight)
    stride3 = _triple(stride, "stride")
    dilation3 = _triple(dilation, "dilation")
    padding3 = padding if isinstance(padding, str) else _triple(padding, "padding")
    check_geometry_values(stride3, (0,) if isinstance(padding3, str) else padding3, dilation3)
    stride3, padding6, dilation3 = as_3d_geometry(weight.shape[2:], stride3, padding3, dilation3)
    args = TiedConv3dArgs(t.name, t.op_alpha, bt.name, bt.op_alpha, stride3, padding6, dilation3, groups)
    return run_tied_conv3d(input, weight, bias, args)


def tied_linear(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    transform: TransformLike = "identity",
    bias_transform: TransformLike = "identity",
    *,
    transpose: bool = False,
) -> Tensor:
    """``F.linear(input, f(weight), g(bias))`` as one operator call; with ``transpose=True`` the tied
    decoder ``input @ f(weight) + bias``.

    A Linear on ``(N, C)`` is a 1x1 convolution on ``(N, C, 1, 1)``, so this is ``tied_conv2d`` (or,
    transposed, ``tied_conv_transpose2d``) on those views, with its fake kernels, autograd, compile
    and autocast support. On the CPU the "linear" algorithm runs it: up to 8 rows (the product of
    the leading dimensions), fused skinny GEMMs that apply f to W as they read it and f' to dW as
    they write it, so W is read once per pass and f(W) never exists; above, the library path: f(W)
    in a reused scratch buffer and BLAS, as ``nn.Linear`` calls it. On CUDA the 2-d operators'
    fused kernels where the dispatch picks them, else f(W) by a CUDA kernel and cuBLAS.

    Args:
        input: ``(*, in_features)``; any number of leading dimensions, none included.
        weight: the source weight W, ``(out_features, in_features)`` (an ``nn.Linear``'s); with
            ``transpose=True`` the input has ``out_features`` features and the output
            ``in_features``.
        bias: ``(out_features,)`` (``(in_features,)`` with ``transpose=True``), or None.
        transform: f: a name from ``available_transforms()`` or a ``Transform``; ``"identity"`` (the
            default) uses the weight as it is.
        bias_transform: g, applied to ``bias``; only ``"identity"`` with ``transpose=True`` (the
            decoder's bias is its own).
        transpose: False for ``x f(W)^T + g(b)``, True for the decoder ``x f(W) + b``.

    Returns:
        ``(*, out_features)`` (``(*, in_features)`` with ``transpose=True``), differentiable with
            respect to ``input``, ``weight`` and ``bias``.

    Raises:
        ValueError: an unknown transform; a weight that is not 2-D or has a zero dimension; an
            input with no dimensions or whose last dimension is not the weight's (the message names
            both); a bias of another size; a bias transform with ``transpose=True``.
        TypeError: a dtype other than the four floating types, or operands of different dtypes.

    Examples:
        >>> w = torch.randn(64, 32, requires_grad=True)
        >>> x = torch.randn(5, 32)
        >>> y = fusedtie.tied_linear(x, w, transform="softplus")
        >>> torch.allclose(y, F.linear(x, F.softplus(w)), atol=1e-5)
        True
        >>> fusedtie.tied_linear(y, w, transform="softplus", transpose=True).shape  # the tied decoder
        torch.Size([5, 32])
    """
    t = Transform.parse(transform)
    bt = Transform.parse(bias_transform)
    if not isinstance(transpose, bool):
        raise TypeError(f"transpose must be True or False, got {transpose!r}")
    _check_weight_and_groups(weight, 1, "(out_features, in_features)", dim=2)
    if transpose:
        if bt.name != "identity":
            raise ValueError(
                f"tied_linear with transpose=True takes its bias as it is (the decoder's own), got "
                f"bias_transform={bt.name!r}"
            )
        args = LINEAR_CONV_TRANSPOSE2D_ARGS._replace(transform=t.name, alpha=t.op_alpha)
        return run_tied_linear(input, weight, bias, args)
    args = LINEAR_CONV2D_ARGS._replace(
        transform=t.name, alpha=t.op_alpha, bias_transform=bt.name, bias_alpha=bt.op_alpha
    )
    return run_tied_linear(input, weight, bias, args)


# Two ways to call each operator. torch.ops is what tracing (torch.compile, export) and
# __torch_function__ overrides must see. A plain eager call instead goes through the _C module's
# binding, which enters the dispatcher directly with the GIL released, as PyTorch's own generated
# bindings do, and costs what F.conv2d does (docs/design.md, "Eager calls skip torch.ops").
# Both run the same dispatcher entry (autograd, dispatch modes, the profiler all see the call).
_has_torch_function = torch._C._has_torch_function
_tied_conv2d_op = torch.ops.fusedtie.tied_conv2d.default
_tied_conv2d_eager = LIB.tied_conv2d_eager
_tied_conv3d_op = torch.ops.fusedtie.tied_conv3d.default
_tied_conv3d_eager = LIB.tied_conv3d_eager
_tied_conv_transpose2d_op = torch.ops.fusedtie.tied_conv_transpose2d.default
_tied_conv_transpose2d_eager = LIB.tied_conv_transpose2d_eager


def input_dim(input, bias, op_name: str, rank: int = 2) -> int:
    """The input's rank, 4 (batched) or 3 (unbatched, as F.conv2d takes it), or for a convolution of
    ``rank`` 1, 3 or 2; a TypeError or ValueError for anything else."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a tensor, got {type(input).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
    dim = input.dim()
    if dim != rank + 2 and dim != rank + 1:
        raise ValueError(
            f"Expected {rank + 1}D (unbatched) or {rank + 2}D (batched) input to {op_name}, but got input of "
            f"size: {list(input.shape)}"
        )
    return dim


# Each run_* is every call's path (a layer's forward calls it directly): the path test is written
# out in each rather than in a shared helper, one Python call less per call.
def run_tied_conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor], args: TiedConv2dArgs) -> Tensor:
    """The operator call with arguments already normalised; adds the unbatched (3-D) case."""
    batched = input_dim(input, bias, "tied_conv2d") == 4
    if not batched:
        input = input.unsqueeze(0)
    if torch.compiler.is_compiling() or _has_torch_function((input, weight, bias)):
        output = _tied_conv2d_op(input, weight, bias, *args)
    else:
        output = _tied_conv2d_eager(input, weight, bias, *args)
    return output if batched else output.squeeze(0)


def run_tied_conv1d(input: Tensor, weight: Tensor, bias: Optional[Tensor], args: TiedConv2dArgs) -> Tensor:
    """The 1-d call with ``args`` already those of the H = 1 view (``as_2d_geometry``), unbatched input
    included: input and weight get the H axis at -2 and the output loses it. Rank, groups and channels
    are checked on the shapes as given, so the messages name those rather than the views'."""
    input_dim(input, bias, "tied_conv1d", 1)
    check_groups_and_channels(input, weight, args.groups, -2)
    return run_tied_conv2d(input.unsqueeze(-2), weight.unsqueeze(-2), bias, args).squeeze(-2)


def run_tied_linear(
    input: Tensor, weight: Tensor, bias: Optional[Tensor], args: Union[TiedConv2dArgs, TiedConvTranspose2dArgs]
) -> Tensor:
    """The Linear call with ``args`` those of the 1x1 convolution (``TiedConv2dArgs``) or of its
    transpose (``TiedConvTranspose2dArgs``, the decoder): the leading dimensions are flattened into
    the batch of a ``(M, C, 1, 1)`` view, and restored on the output."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a tensor, got {type(input).__name__}")
    transpose = type(args) is TiedConvTranspose2dArgs
    if weight.numel() == 0:
        # F.linear sums over no features (bias only); the convolutions it runs on do not.
        raise ValueError(f"tied_linear needs a weight with at least one feature on each side, got {list(weight.shape)}")
    features_in = weight.shape[0] if transpose else weight.shape[1]
    if input.dim() == 0 or input.shape[-1] != features_in:
        side = "(out_features, the weight's first dimension, for transpose=True)" if transpose else "(in_features)"
        raise ValueError(
            f"expected input with {features_in} features in its last dimension {side} for weight of size "
            f"{list(weight.shape)}, got input of size {list(input.shape)}"
        )
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
    # One view op per tensor (each is a node in the autograd graph), and the operator called as
    # run_tied_conv2d calls it, its rank checks skipped: these views are 4-D by construction.
    lead = input.shape[:-1]
    rows = input.reshape(math.prod(lead), features_in, 1, 1)
    source = weight.reshape(weight.shape[0], weight.shape[1], 1, 1)
    if torch.compiler.is_compiling() or _has_torch_function((rows, source, bias)):
        op = _tied_conv_transpose2d_op if transpose else _tied_conv2d_op
    else:
        op = _tied_conv_transpose2d_eager if transpose else _tied_conv2d_eager
    output = op(rows, source, bias, *args)
    return output.reshape(*lead, output.shape[1])


def run_tied_conv_transpose2d(
    input: Tensor, weight: Tensor, bias: Optional[Tensor], args: TiedConvTranspose2dArgs
) -> Tensor:
    """The transposed operator's call with arguments already normalised, unbatched input included."""
    batched = input_dim(input, bias, "tied_conv_transpose2d") == 4
    if not batched:
        input = input.unsqueeze(0)
    if torch.compiler.is_compiling() or _has_torch_function((input, weight, bias)):
        output = _tied_conv_transpose2d_op(input, weight, bias, *args)
    else:
        output = _tied_conv_transpose2d_eager(input, weight, bias, *args)
    return output if batched else output.squeeze(0)


def run_tied_conv3d(input: Tensor, weight: Tensor, bias: Optional[Tensor], args: TiedConv3dArgs) -> Tensor:
    """The 3-d operator's call with arguments already normalised, unbatched (4-D) input included."""
    batched = input_dim(input, bias, "tied_conv3d", 3) == 5
    if not batched:
        input = input.unsqueeze(0)
    if torch.compiler.is_compiling() or _has_torch_function((input, weight, bias)):
        output = _tied_conv3d_op(input, weight, bias, *args)
    else:
        output = _tied_conv3d_eager(input, weight, bias, *args)
    return output if batched else output.squeeze(0)


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


# Autograd is registered in C++ (csrc/autograd.cpp): torch.library.register_autograd's Python
# wrapper costs a visible share of a small convolution (docs/design.md).
