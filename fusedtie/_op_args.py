"""The operators' arguments besides the tensors: the normalisation of what ``F.conv2d`` accepts
(ints or pairs, padding strings) and the named argument objects, ``TiedConv2dArgs`` and
``TiedConvTranspose2dArgs``, which a layer builds once and every call passes on as they are."""

from __future__ import annotations

import operator
from typing import NamedTuple, Sequence, Union

import torch

from .transforms import Transform

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


class TiedConv2dArgs(NamedTuple):
    """``torch.ops.fusedtie.tied_conv2d``'s arguments after the tensors, in its schema's order."""

    transform: str
    alpha: float
    bias_transform: str
    bias_alpha: float
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]  # (top, bottom, left, right)
    dilation: tuple[int, int]
    groups: int

    def derived(self) -> TiedConv2dArgs:
        """The same call on tensors that are already f(W) and g(b) (``fusedtie.cached()``'s path)."""
        return self._replace(transform="identity", alpha=1.0, bias_transform="identity", bias_alpha=1.0)


class TiedConvTranspose2dArgs(NamedTuple):
    """``torch.ops.fusedtie.tied_conv_transpose2d``'s arguments after the tensors, in its schema's order."""

    transform: str
    alpha: float
    stride: tuple[int, int]
    padding: tuple[int, int]
    output_padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    def derived(self) -> TiedConvTranspose2dArgs:
        """The same call on a weight that is already f(W) (``fusedtie.cached()``'s path)."""
        return self._replace(transform="identity", alpha=1.0)
