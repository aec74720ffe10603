"""``FusedTiedConv2d``: a conv layer whose weight is f(source.weight), owning no parameters;
published as fusedtie.nn.FusedTiedConv2d. Its body is fusedtie/_conv_layer.py's (shared with
FusedTiedConv1d); the tie itself is fusedtie/_tied_layer.py's."""

from __future__ import annotations

from typing import Optional, Union

from torch import nn

from ._conv_layer import _FusedTiedConvNd
from ._op_args import TransformLike, _pair
from .ops import run_tied_conv2d


class FusedTiedConv2d(_FusedTiedConvNd):
    r"""A 2-D convolution whose weight is ``f(source.weight)``: the tie as one fused operator.

    A drop-in for ``nn.Conv2d`` computing ``F.conv2d(x, f(W), g(b), ...)`` with W and b the
    source's parameters, through ``tied_conv2d``. The layer owns no parameters: ``parameters()`` of
    a network holding both layers yields the source's tensors once, and its ``state_dict()`` has
    only the source's keys. Used alone, the layer carries its source (as the submodule ``source``),
    moves it with ``.to()`` and saves it under ``source.*``; deepcopy, ``torch.save``/``load`` and
    ``fusedtie.cached()`` keep the tie. Geometry and transform are fixed at construction (assigning
    ``layer.stride`` later raises rather than being silently ignored). It is deliberately not an
    ``nn.Conv2d`` subclass, so init loops (``if isinstance(m, nn.Conv2d): init(m.weight)``) reach
    the source, never a derived temporary.

    Args:
        source: the ``nn.Conv2d`` that owns the parameters (a parametrized one is read through its
            parametrization on every call). Not a transposed conv, nor another fusedtie layer.
        transform: f: a name from ``available_transforms()`` or a ``Transform``
            (``Transform("scale", alpha=0.5)``).
        bias: ``"same"``: the source's bias as it is (none if the source has none);
            ``"transform"``: f(source.bias), the forum's ``bias ** 2``; ``None`` (or ``False``): no
            bias.
        stride: defaults to the source's.
        padding: an int, a pair, ``"same"`` or ``"valid"``; defaults to the source's.
        dilation: defaults to the source's.
        groups: defaults to the source's; another value changes ``in_channels`` to
            ``source.weight.shape[1] * groups``.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``; defaults to the
            source's.
        in_channels: optional; if given, it must equal what the tie implies, so a tie that cannot
            work fails here and says why.
        out_channels: optional; checked as ``in_channels``.
        kernel_size: optional; checked as ``in_channels``.

    Raises:
        TypeError: a source that is not an ``nn.Conv2d``, or is a fusedtie layer (ties do not chain).
        ValueError: an unknown transform or bias mode, ``bias="transform"`` on a source without a
            bias, a lazy source not yet initialised, groups that do not divide the source's output
            channels, bad geometry, or ``in_channels``/``out_channels``/``kernel_size`` that the tie
            cannot give.

    Examples:
        >>> conv_1 = nn.Conv2d(16, 16, 3, padding=1)
        >>> conv_2 = fusedtie.FusedTiedConv2d(conv_1, "square")  # weight = conv_1.weight ** 2
        >>> net = nn.Sequential(conv_1, conv_2)
        >>> list(net.state_dict())
        ['0.weight', '0.bias']
        >>> net(torch.randn(1, 16, 32, 32)).shape
        torch.Size([1, 16, 32, 32])
    """

    __module__ = "fusedtie.nn"  # where pickles (torch.save of a whole model) find the class

    _SOURCE_TYPE = nn.Conv2d
    _RANK = 2
    _WEIGHT_LAYOUT = "(out_channels, in_channels/groups, kH, kW)"
    _as_tuple = staticmethod(_pair)
    _run = staticmethod(run_tied_conv2d)

    def __init__(
        self,
        source: nn.Conv2d,
        transform: TransformLike = "square",
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

    def to_conv2d(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with f(W) and g(b) baked in (untied, for export and deployment).

        The conv has this layer's geometry (``padding_mode`` included) and training flag, the
        source's dtype and device, and its parameters require grad as the source's do. The values
        are a snapshot of f(W) and g(b) now. ``fusedtie.bake`` does this for a whole model.

        Returns:
            A new ``nn.Conv2d`` owning copies of f(W) and g(b); training it leaves the source alone.

        Examples:
            >>> conv_1 = nn.Conv2d(3, 8, 3)
            >>> plain = fusedtie.FusedTiedConv2d(conv_1, "tanh").to_conv2d()
            >>> type(plain).__name__, torch.allclose(plain.weight, torch.tanh(conv_1.weight))
            ('Conv2d', True)
        """
        return self._untied()
