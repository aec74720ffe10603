"""``FusedTiedConv3d``: a 3-d conv layer whose weight is f(source.weight), owning no parameters;
published as fusedtie.nn.FusedTiedConv3d. Its body is fusedtie/_conv_layer.py's (shared with
FusedTiedConv2d and FusedTiedConv1d), its call ``tied_conv3d``'s; the tie itself is
fusedtie/_tied_layer.py's."""

from __future__ import annotations

from typing import Optional, Union

from torch import nn

from ._conv_layer import _FusedTiedConvNd
from ._op_args import TiedConv3dArgs, TransformLike, _triple, as_3d_geometry
from .ops import run_tied_conv3d


class FusedTiedConv3d(_FusedTiedConvNd):
    r"""A 3-D convolution whose weight is ``f(source.weight)``: the tie as one fused operator.

    A drop-in for ``nn.Conv3d`` computing ``F.conv3d(x, f(W), g(b), ...)`` with W and b the
    source's parameters, through ``tied_conv3d`` (on the CPU and on CUDA: f(W) in one pass, the
    library's convolution, the chain rule in place). The semantics are ``FusedTiedConv2d``'s: the
    layer owns no parameters (``parameters()`` of a network holding both layers yields the source's
    tensors once, its ``state_dict()`` has only the source's keys); used alone it carries its source
    (as the submodule ``source``), moves it with ``.to()`` and saves it under ``source.*``; deepcopy,
    ``torch.save``/``load``, ``fusedtie.cached()`` and ``fusedtie.bake`` keep or bake the tie;
    geometry and transform are fixed at construction. It is not an ``nn.Conv3d`` subclass, so init
    loops reach the source only.

    Args:
        source: the ``nn.Conv3d`` that owns the parameters (a parametrized one is read through its
            parametrization on every call). Not a transposed conv, nor another fusedtie layer.
        transform: f: a name from ``available_transforms()`` or a ``Transform``; ``"identity"`` (the
            default) shares the weight as it is.
        bias: ``"same"``: the source's bias as it is (none if the source has none);
            ``"transform"``: f(source.bias); ``None`` (or ``False``): no bias.
        stride: an int or a sequence of one or three ints; defaults to the source's.
        padding: an int, a sequence of one or three ints, ``"same"`` or ``"valid"``; defaults to the
            source's.
        dilation: an int or a sequence of one or three ints; defaults to the source's.
        groups: defaults to the source's; another value changes ``in_channels`` to
            ``source.weight.shape[1] * groups``.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``; defaults to the
            source's.
        in_channels: optional; if given, it must equal what the tie implies, so a tie that cannot
            work fails here and says why.
        out_channels: optional; checked as ``in_channels``.
        kernel_size: optional; checked as ``in_channels``.

    Raises:
        TypeError: a source that is not an ``nn.Conv3d``, or is a fusedtie layer (ties do not chain).
        ValueError: an unknown transform or bias mode, ``bias="transform"`` on a source without a
            bias, a lazy source not yet initialised, groups that do not divide the source's output
            channels, bad geometry, or ``in_channels``/``out_channels``/``kernel_size`` that the tie
            cannot give.

    Examples:
        >>> conv_1 = nn.Conv3d(4, 4, 3, padding=1)
        >>> conv_2 = fusedtie.FusedTiedConv3d(conv_1, "tanh")  # weight = tanh(conv_1.weight)
        >>> net = nn.Sequential(conv_1, conv_2)
        >>> list(net.state_dict())
        ['0.weight', '0.bias']
        >>> net(torch.randn(2, 4, 8, 16, 16)).shape
        torch.Size([2, 4, 8, 16, 16])
    """

    __module__ = "fusedtie.nn"  # where pickles (torch.save of a whole model) find the class
    _PICKLED_OP_ARGS = False  # a new layer: its pickles hold no argument objects (_TiedLayer.__getstate__)

    _SOURCE_TYPE = nn.Conv3d
    _RANK = 3
    _WEIGHT_LAYOUT = "(out_channels, in_channels/groups, kD, kH, kW)"
    _as_tuple = staticmethod(_triple)
    _run = staticmethod(run_tied_conv3d)
    _geometry = staticmethod(as_3d_geometry)
    _ARGS = TiedConv3dArgs

    def __init__(
        self,
        source: nn.Conv3d,
        transform: TransformLike = "identity",
        bias: Union[str, None, bool] = "same",
        *,
        stride=None,
        padding=None,
        dilation=None,
        groups: Optional[int] = None,
        padding_mode: Optional[str] = None,
        in_channels: Optional[int] = None,
        out_channels: Optional[int] = None,
        kernel_size=None,
    ) -> None:
        super().__init__(
            source,
            transform,
            bias,
            stride,
            padding,
            dilation,
            groups,
            padding_mode,
            in_channels,
            out_channels,
            kernel_size,
        )

    def to_conv3d(self) -> nn.Conv3d:
        """A plain ``nn.Conv3d`` with f(W) and g(b) baked in (untied, for export and deployment).

        The conv has this layer's geometry (``padding_mode`` included) and training flag, the
        source's dtype and device, and its parameters require grad as the source's do. The values
        are a snapshot of f(W) and g(b) now. ``fusedtie.bake`` does this for a whole model.

        Returns:
            A new ``nn.Conv3d`` owning copies of f(W) and g(b); training it leaves the source alone.

        Examples:
            >>> conv_1 = nn.Conv3d(3, 8, 3)
            >>> plain = fusedtie.FusedTiedConv3d(conv_1, "tanh").to_conv3d()
            >>> type(plain).__name__, torch.allclose(plain.weight, torch.tanh(conv_1.weight))
            ('Conv3d', True)
        """
        return self._untied()
