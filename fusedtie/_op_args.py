"""The operators' arguments besides the tensors: the normalisation of what ``F.conv2d``,
``F.conv1d`` and ``F.conv3d`` accept (ints, pairs, single ints or triples, padding strings), the
H = 1 view that runs a 1-d convolution through the 2-d operator, and the named argument objects,
``TiedConv2dArgs``, ``TiedConv3dArgs`` and ``TiedConvTranspose2dArgs``, which a layer builds once and
every call passes on as they are."""

from __future__ import annotations

import operator
from typing import NamedTuple, Sequence, Union

import torch

from .transforms import Transform

TransformLike = Union[str, Transform]
IntOrPair = Union[int, Sequence[int]]
PaddingLike = Union[str, int, Sequence[int]]
IntOrTriple = Union[int, Sequence[int]]


def _as_int(v) -> int:
    if isinstance(v, bool):
        raise TypeError
    return operator.index(v)  # ints, numpy integers, 0-d integer tensors


def _pair(value: IntOrPair, name: str) -> tuple[int, int]:
    """An int, or a sequence of one or two ints (as F.conv2d takes them), as a pair."""
    try:
        if isinstance(value, (tuple, list, torch.Size)):
            if len(value) == 1:
                return (_as_int(value[0]),) * 2
            if len(value) == 2:
                return (_as_int(value[0]), _as_int(value[1]))
            raise TypeError
        return (_as_int(value),) * 2
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None


def _single(value: IntOrPair, name: str) -> tuple[int]:
    """An int, or a sequence of one int (as F.conv1d takes them), as a 1-tuple."""
    try:
        if isinstance(value, (tuple, list, torch.Size)):
            if len(value) == 1:
                return (_as_int(value[0]),)
            raise TypeError
        return (_as_int(value),)
    except TypeError:
        raise TypeError(f"{name} must be an int or a sequence of one int, got {value!r}") from None


def _triple(value: IntOrTriple, name: str) -> tuple[int, int, int]:
    """An int, or a sequence of one or three ints (as F.conv3d takes them), as a triple."""
    try:
        if isinstance(value, (tuple, list, torch.Size)):
            if len(value) == 1:
                return (_as_int(value[0]),) * 3
            if len(value) == 3:
                return (_as_int(value[0]), _as_int(value[1]), _as_int(value[2]))
            raise TypeError
        return (_as_int(value),) * 3
    except TypeError:
        raise TypeError(f"{name} must be an int or a sequence of one or three ints, got {value!r}") from None


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


def as_2d_geometry(
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Union[str, Sequence[int]],
    dilation: Sequence[int],
) -> tuple[tuple[int, int], tuple[int, int, int, int], tuple[int, int]]:
    """``tied_conv2d``'s (stride, padding, dilation) for a normalised 2-d geometry (pairs) or 1-d one
    (1-tuples): a 1-d convolution is the 2-d one on an H = 1 view (input ``(N, C, 1, L)``, weight
    ``(O, C/groups, 1, K)``), with stride and dilation 1 and no padding along H; ``"same"`` and
    ``"valid"`` split as ``normalize_padding`` splits them."""
    fill = 2 - len(kernel_size)  # 0 (2-d) or 1 (1-d): the H = 1 axis put in front
    stride2 = (1,) * fill + tuple(stride)
    dilation2 = (1,) * fill + tuple(dilation)
    if not isinstance(padding, str):
        padding = (0,) * fill + tuple(padding)
    padding4 = normalize_padding(padding, (1,) * fill + tuple(kernel_size), stride2, dilation2)  # type: ignore[arg-type]
    return stride2, padding4, dilation2  # type: ignore[return-value]


def as_3d_geometry(
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Union[str, Sequence[int]],
    dilation: Sequence[int],
) -> tuple[tuple[int, int, int], tuple[int, int, int, int, int, int], tuple[int, int, int]]:
    """``tied_conv3d``'s (stride, padding, dilation) for a normalised 3-d geometry (triples): padding
    as (front, back, top, bottom, left, right), ``"same"`` split like F.conv3d (the odd element goes
    last)."""
    stride3, dilation3 = tuple(stride), tuple(dilation)
    if not isinstance(padding, str):
        if min(padding) < 0:
            raise ValueError(f"negative padding is not supported, got {list(padding)}")
        return stride3, tuple(p for p in padding for _ in range(2)), dilation3  # type: ignore[return-value]
    if padding == "valid":
        return stride3, (0,) * 6, dilation3  # type: ignore[return-value]
    if padding != "same":
        raise ValueError(f"Invalid padding string '{padding}', should be one of {{'valid', 'same'}}")
    if any(s != 1 for s in stride3):
        raise ValueError("padding='same' is not supported for strided convolutions")
    sides: list[int] = []
    for d in range(3):
        total = dilation3[d] * (kernel_size[d] - 1)
        sides += [total // 2, total - total // 2]
    return stride3, tuple(sides), dilation3  # type: ignore[return-value]


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


class TiedConv3dArgs(NamedTuple):
    """``torch.ops.fusedtie.tied_conv3d``'s arguments after the tensors, in its schema's order."""

    transform: str
    alpha: float
    bias_transform: str
    bias_alpha: float
    stride: tuple[int, int, int]
    padding: tuple[int, int, int, int, int, int]  # (front, back, top, bottom, left, right)
    dilation: tuple[int, int, int]
    groups: int

    def derived(self) -> TiedConv3dArgs:
        """The same call on tensors that are already f(W) and g(b) (``fusedtie.cached()``'s path)."""
        return self._replace(transform="identity", alpha=1.0, bias_transform="identity", bias_alpha=1.0)


# A Linear's arguments as those of a 1x1 convolution on (N, C, 1, 1) views (tied_linear), and of
# its transpose (the tied decoder), with the identity in place of the transforms.
LINEAR_CONV2D_ARGS = TiedConv2dArgs("identity", 1.0, "identity", 1.0, (1, 1), (0, 0, 0, 0), (1, 1), 1)
LINEAR_CONV_TRANSPOSE2D_ARGS = TiedConvTranspose2dArgs("identity", 1.0, (1, 1), (0, 0), (0, 0), (1, 1), 1)
