"""The fake (meta) kernels of the operators, registered with torch.library when this module is
imported (fusedtie/ops.py imports it, once): output shapes and memory formats for tracing
(torch.compile, export, meta tensors), after the argument checks of fusedtie/_checks.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _library  # noqa: F401  (defines the operators, before their fakes are registered)
from ._checks import (
    check_grad_output_device,
    check_tied_conv2d,
    check_tied_conv3d,
    check_tied_conv_transpose2d,
    check_transform_args,
)


def _suggested_format(t: Tensor) -> torch.memory_format:
    return torch._prims_common.suggest_memory_format(t)


@torch.library.register_fake("fusedtie::tied_conv2d")
def _tied_conv2d_fake(
    input, weight, bias, transform, alpha, bias_transform, bias_alpha, stride, padding, dilation, groups
):
    check_tied_conv2d(input, weight, bias, transform, bias_transform, stride, padding, dilation, groups)
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
    check_grad_output_device(grad_output, input)
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


@torch.library.register_fake("fusedtie::tied_conv3d")
def _tied_conv3d_fake(
    input, weight, bias, transform, alpha, bias_transform, bias_alpha, stride, padding, dilation, groups
):
    check_tied_conv3d(input, weight, bias, transform, bias_transform, stride, padding, dilation, groups)
    # As tied_conv2d's: aten.convolution on the input padded by the asymmetric remainder.
    symmetric = [min(padding[2 * d], padding[2 * d + 1]) for d in range(3)]
    if any(padding[2 * d] != padding[2 * d + 1] for d in range(3)):
        remainder = [padding[2 * d + side] - symmetric[d] for d in (2, 1, 0) for side in (0, 1)]  # F.pad's order
        input = F.pad(input, remainder)
    return torch.ops.aten.convolution(input, weight, bias, stride, symmetric, dilation, False, (0, 0, 0), groups)


@torch.library.register_fake("fusedtie::_tied_conv3d_backward")
def _tied_conv3d_backward_fake(
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
    check_grad_output_device(grad_output, input)
    expected = _tied_conv3d_fake(
        input, weight, bias, transform, alpha, bias_transform, bias_alpha, stride, padding, dilation, groups
    )
    return _fake_gradients(grad_output, expected, input, weight, bias, output_mask)


@torch.library.register_fake("fusedtie::tied_conv_transpose2d")
def _tied_conv_transpose2d_fake(
    input, weight, bias, transform, alpha, stride, padding, output_padding, dilation, groups
):
    check_tied_conv_transpose2d(input, weight, bias, transform, stride, padding, output_padding, dilation, groups)
    # The output's shape and memory format are aten.convolution's own, run on the fake tensors.
    return torch.ops.aten.convolution(input, weight, bias, stride, padding, dilation, True, output_padding, groups)


@torch.library.register_fake("fusedtie::_tied_conv_transpose2d_backward")
def _tied_conv_transpose2d_backward_fake(
    grad_output, input, weight, bias, transform, alpha, stride, padding, output_padding, dilation, groups, output_mask
):
    check_grad_output_device(grad_output, input)
    expected = _tied_conv_transpose2d_fake(
        input, weight, bias, transform, alpha, stride, padding, output_padding, dilation, groups
    )
    return _fake_gradients(grad_output, expected, input, weight, bias, output_mask)


@torch.library.register_fake("fusedtie::transform")
def _transform_fake(source, transform, alpha):
    check_transform_args(source, transform, "transform")
    return torch.empty_like(source)


@torch.library.register_fake("fusedtie::_transform_backward")
def _transform_backward_fake(grad, source, transform, alpha):
    check_transform_args(source, transform, "_transform_backward")
    if grad.shape != source.shape:
        raise ValueError(f"expected grad of size {list(source.shape)}, got {list(grad.shape)}")
    if grad.dtype != source.dtype:
        raise TypeError(f"expected grad of dtype {source.dtype}, got {grad.dtype}")
    return torch.empty_like(source)
