"""The operators' argument checks that the fake (meta) kernels run, with the rules and messages of
the C++ checks of real tensors (csrc/conv_params.h, csrc/conv_transpose_params.h), so that a traced
call fails as an eager one does; the layers share the output padding rule."""

from __future__ import annotations

import torch

from ._catalog import check_transform_name

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_supported_dtype(dtype: torch.dtype, op: str) -> None:
    if dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"fusedtie::{op} supports floating-point tensors (float32, float64, bfloat16, float16), got {dtype}"
        )


def check_operands_like_input(input, weight, bias) -> None:
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


def check_grad_output_device(grad_output, input) -> None:
    """grad_output on the input's device (conv_params.h's check_backward). The backward fake kernels
    run whenever one argument is on the meta device, so this comes before they evaluate the forward
    on the others, which may be real tensors (a meta grad_output beside CPU tensors hit oneDNN)."""
    if grad_output.device != input.device:
        raise RuntimeError(f"expected grad_output on {input.device}, got {grad_output.device}")


def check_geometry_values(stride, padding, dilation) -> None:
    """The value rules both convolution operators share (their C++ params structs' messages)."""
    if min(stride) <= 0:
        raise ValueError(f"stride must be positive, got {list(stride)}")
    if min(dilation) <= 0:
        raise ValueError(f"dilation must be positive, got {list(dilation)}")
    if min(padding) < 0:
        raise ValueError(f"negative padding is not supported, got {list(padding)}")


def check_padded_size(input, pad, layer: str, padding_mode: str) -> None:
    """The size F.pad gives, in 64 bits: F.pad's own sum wraps past 2**63 and its kernel then
    indexes out of bounds (torch 2.13 segfaults on padding 2**63 - 1 with mode="replicate"). ``pad``
    is in F.pad's order (last dimension first)."""
    for d in range(len(pad) // 2):
        size = input.shape[-1 - d]
        if size + pad[2 * d] + pad[2 * d + 1] > 2**63 - 1:
            raise RuntimeError(
                f"{layer}: padding_mode={padding_mode!r} pads the input of size {list(input.shape)} by "
                f"{list(pad)} (F.pad's order), past what 64 bits can count"
            )


def check_kernel_not_empty(weight) -> None:
    """check_kernel_not_empty of csrc/conv_params.h (F.conv2d raises an IndexError from its kernel),
    for a 4-D or 5-D weight or tied_conv1d's 3-D one."""
    if 0 in weight.shape[2:]:
        least = " x ".join("1" * (weight.dim() - 2))
        raise ValueError(f"expected a kernel of at least {least}, got weight of size {list(weight.shape)}")


def check_groups_and_channels(input, weight, groups, channel_dim: int = 1) -> None:
    """Groups that divide the weight's out_channels, and input channels that are weight.shape[1] *
    groups: TiedConv2dParams::check's rules and messages, with the shapes as the caller gave them
    (tied_conv1d's 3-D ones too, whose channels are at ``channel_dim`` -2, unbatched input included)."""
    if groups <= 0:
        raise ValueError(f"groups must be a positive integer, got {groups}")
    out_channels = weight.shape[0]
    if out_channels % groups != 0:
        raise ValueError(f"out_channels ({out_channels}) must be divisible by groups ({groups})")
    channels = input.shape[channel_dim]
    if channels != weight.shape[1] * groups:
        raise ValueError(
            f"Given groups={groups}, weight of size {list(weight.shape)}, expected input{list(input.shape)} "
            f"to have {weight.shape[1] * groups} channels, but got {channels} channels instead"
        )


_CONV_LAYOUTS = {  # spatial rank: (op, input layout, weight layout, padding order), as conv_params.h names them
    2: ("tied_conv2d", "(N, C, H, W)", "(out_channels, in_channels/groups, kH, kW)", "(top, bottom, left, right)"),
    3: (
        "tied_conv3d",
        "(N, C, D, H, W)",
        "(out_channels, in_channels/groups, kD, kH, kW)",
        "(front, back, top, bottom, left, right)",
    ),
}


def check_tied_conv2d(input, weight, bias, transform, bias_transform, stride, padding, dilation, groups) -> None:
    """The fake kernel's argument checks: the rules and messages of TiedConv2dParams::check
    (csrc/conv_params.h), which checks real tensors. Both are exercised by tests/test_bad_input.py."""
    _check_tied_conv(2, input, weight, bias, transform, bias_transform, stride, padding, dilation, groups)


def check_tied_conv3d(input, weight, bias, transform, bias_transform, stride, padding, dilation, groups) -> None:
    """check_tied_conv2d's for tied_conv3d (TiedConv3dParams::check); tests/test_conv3d.py runs both."""
    _check_tied_conv(3, input, weight, bias, transform, bias_transform, stride, padding, dilation, groups)


def _check_tied_conv(rank, input, weight, bias, transform, bias_transform, stride, padding, dilation, groups) -> None:
    op, input_layout, weight_layout, padding_order = _CONV_LAYOUTS[rank]
    check_transform_name(transform)
    check_transform_name(bias_transform)
    for name, values, length in (
        ("stride", stride, rank),
        ("padding", padding, 2 * rank),
        ("dilation", dilation, rank),
    ):
        if len(values) != length:
            order = f" {padding_order}" if name == "padding" else ""
            raise ValueError(f"{name} must have {length} elements{order}, got {list(values)}")
    check_geometry_values(stride, padding, dilation)
    if groups <= 0:
        raise ValueError(f"groups must be a positive integer, got {groups}")
    dim = rank + 2
    if input.dim() != dim:
        raise ValueError(
            f"fusedtie::{op} expects a {dim}-D input {input_layout}, got input of size {list(input.shape)}"
        )
    if weight.dim() != dim:
        raise ValueError(
            f"fusedtie::{op} expects a {dim}-D weight {weight_layout}, got weight of size {list(weight.shape)}"
        )
    check_kernel_not_empty(weight)
    check_supported_dtype(input.dtype, op)
    check_operands_like_input(input, weight, bias)
    check_groups_and_channels(input, weight, groups)
    out_channels = weight.shape[0]
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_channels):
        raise ValueError(f"expected bias of size [{out_channels}] (out_channels), got {list(bias.shape)}")
    padded = [input.shape[2 + d] + padding[2 * d] + padding[2 * d + 1] for d in range(rank)]
    extent = [dilation[d] * (weight.shape[2 + d] - 1) + 1 for d in range(rank)]
    if any(p < e for p, e in zip(padded, extent)):
        raise ValueError(
            f"Calculated padded input size per channel: ({' x '.join(map(str, padded))}). Kernel size: "
            f"({' x '.join(map(str, extent))}). Kernel size can't be greater than actual input size"
        )


def check_output_padding(output_padding, stride, dilation) -> None:
    """F.conv_transpose2d's rule, with TiedConvTranspose2dParams' message (the layer checks it too)."""
    if min(output_padding) < 0:
        raise ValueError(f"negative output_padding is not supported, got {list(output_padding)}")
    for d in range(2):
        if output_padding[d] >= stride[d] and output_padding[d] >= dilation[d]:
            raise ValueError(
                f"output_padding must be smaller than either stride or dilation, got output_padding "
                f"{list(output_padding)}, stride {list(stride)}, dilation {list(dilation)}"
            )


def check_tied_conv_transpose2d(
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
    check_geometry_values(stride, padding, dilation)
    check_output_padding(output_padding, stride, dilation)
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
    check_kernel_not_empty(weight)
    check_supported_dtype(input.dtype, "tied_conv_transpose2d")
    check_operands_like_input(input, weight, bias)
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


def check_transform_args(source, transform, op):
    check_transform_name(transform)
    check_supported_dtype(source.dtype, op)
