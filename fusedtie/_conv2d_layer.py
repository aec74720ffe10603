"""``FusedTiedConv2d``: a conv layer whose weight is f(source.weight), owning no parameters;
published as fusedtie.nn.FusedTiedConv2d. The tie itself is fusedtie/_tied_layer.py's."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_padded_size
from ._op_args import TiedConv2dArgs, TransformLike, _pair, normalize_padding
from ._tied_layer import _TiedLayer
from .cache import is_caching
from .cache import lookup as cache_lookup
from .ops import apply_transform, input_dim, run_tied_conv2d
from .transforms import Transform

_BIAS_MODES = ("same", "transform", None)
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_IDENTITY = Transform("identity")


class FusedTiedConv2d(_TiedLayer):
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

    _DERIVED_ATTRIBUTES = frozenset({"weight", "bias"})
    _FIXED_AT_CONSTRUCTION = frozenset(
        {
            "source",
            "transform",
            "bias_mode",
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "groups",
            "padding_mode",
        }
    )

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
        self._check_source(source)
        super().__init__()
        t = Transform.parse(transform)
        if bias is False:
            bias = None
        if bias not in _BIAS_MODES:
            raise ValueError(f"bias must be 'same', 'transform' or None, got {bias!r}")
        if bias == "transform" and source.bias is None:
            raise ValueError(
                "bias='transform' applies the transform to the source's bias, but the source has no "
                "bias (it was built with bias=False); use bias=None"
            )
        padding_mode = source.padding_mode if padding_mode is None else padding_mode
        if padding_mode not in _PADDING_MODES:
            raise ValueError(
                f"padding_mode must be one of {', '.join(map(repr, _PADDING_MODES))}, got {padding_mode!r}"
            )
        groups = source.groups if groups is None else groups
        if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
            raise ValueError(f"groups must be a positive integer, got {groups!r}")
        w_out, w_in_per_group, kh, kw = source.weight.shape
        if w_out % groups != 0:
            raise ValueError(
                f"cannot use groups={groups}: the source weight {list(source.weight.shape)} has "
                f"{w_out} output channels, and out_channels must be divisible by groups"
            )
        implied = {
            "in_channels": w_in_per_group * groups,
            "out_channels": w_out,
            "kernel_size": (kh, kw),
        }
        asked = {"in_channels": in_channels, "out_channels": out_channels, "kernel_size": kernel_size}
        wrong = [
            f"{name}={asked[name]!r} (the tie gives {implied[name]!r})"
            for name in implied
            if asked[name] is not None
            and (tuple(_pair(asked[name], name)) if name == "kernel_size" else asked[name]) != implied[name]
        ]
        if wrong:
            raise ValueError(
                "cannot tie: a FusedTiedConv2d has its source's weight shape "
                f"{list(source.weight.shape)} (out_channels, in_channels/groups, kH, kW), so with "
                f"groups={groups} it maps {implied['in_channels']} to {implied['out_channels']} "
                f"channels with a {kh}x{kw} kernel; asked for " + ", ".join(wrong)
            )

        object.__setattr__(self, "_frozen", False)
        self.transform = t
        self.bias_mode = bias
        self.in_channels = implied["in_channels"]
        self.out_channels = implied["out_channels"]
        self.kernel_size = (kh, kw)
        self.stride = _pair(source.stride if stride is None else stride, "stride")
        self.dilation = _pair(source.dilation if dilation is None else dilation, "dilation")
        self.groups = groups
        padding = source.padding if padding is None else padding
        self.padding = padding if isinstance(padding, str) else _pair(padding, "padding")
        self.padding_mode = padding_mode
        for name in ("stride", "dilation"):
            if min(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        top, bottom, left, right = normalize_padding(self.padding, (kh, kw), self.stride, self.dilation)
        if padding_mode != "zeros":
            # nn.Conv2d's order: F.pad's (left, right, top, bottom), then a convolution without padding
            self._reversed_padding_repeated_twice = (left, right, top, bottom)
        self._attach_source(source)

    def _build_op_args(self) -> None:
        # Everything the operator needs besides the tensors, normalised once.
        padding = (0, 0, 0, 0)  # padding_mode other than "zeros": forward pads with F.pad
        if self.padding_mode == "zeros":
            padding = normalize_padding(self.padding, self.kernel_size, self.stride, self.dilation)
        bias_transform = self.transform if self.bias_mode == "transform" else _IDENTITY
        self._op_args = TiedConv2dArgs(
            self.transform.name,
            self.transform.op_alpha,
            bias_transform.name,
            bias_transform.op_alpha,
            self.stride,
            padding,
            self.dilation,
            self.groups,
        )
        self._op_args_derived = self._op_args.derived()

    # --- the derived tensors ----------------------------------------------------------------------

    @property
    def weight(self) -> Tensor:
        """f(source.weight), computed on each read and differentiable with respect to the source.

        Read-only: assigning it raises ``AttributeError`` (the source owns the parameter).
        """
        return apply_transform(self.source.weight, self.transform)

    @property
    def bias(self) -> Optional[Tensor]:
        """The derived bias: the source's bias itself (``bias="same"``), f(source.bias)
        (``bias="transform"``), or None. Read-only, as ``weight``."""
        source_bias = self.source.bias
        if self.bias_mode is None or source_bias is None:
            return None
        return source_bias if self.bias_mode == "same" else apply_transform(source_bias, self.transform)

    def reset_parameters(self) -> None:
        """Refused: the layer owns no parameters; reset the source (``layer.source.reset_parameters()``).

        Raises:
            RuntimeError: always, saying so.
        """
        raise RuntimeError(
            "FusedTiedConv2d owns no parameters: its weight is f(source.weight). Reset the source "
            "layer instead (layer.source.reset_parameters())."
        )

    def _source_tensors(self) -> tuple[Tensor, Optional[Tensor]]:
        """The source's weight and (unless bias=None) bias, as they are now.

        Read from the modules' dictionaries when they are plain parameters: nn.Module attribute
        access costs about 1-2 us a lookup, three of them a call, which is a tenth of the layer's
        fixed cost. A parametrized (or otherwise computed) weight falls back to attribute access.
        """
        weight = self._source_weight()
        if self.bias_mode is None:
            return weight, None
        source = self._modules["source"]
        bias = source._parameters["bias"] if "bias" in source._parameters else source.bias
        return weight, bias

    def forward(self, input: Tensor) -> Tensor:
        """The convolution with f(source.weight) and the derived bias: one operator call.

        Inside ``fusedtie.cached()``, a call that records no autograd graph reuses f(W) computed at
        the layer's first such call.

        Args:
            input: ``(N, in_channels, H, W)``, or unbatched ``(in_channels, H, W)``.

        Returns:
            ``(N, out_channels, H_out, W_out)`` (without N for unbatched input), differentiable with
                respect to ``input`` and the source's parameters.

        Raises:
            ValueError: input whose channel count is not ``in_channels`` (the message names the count
                expected), of another rank, or smaller than the kernel.

        Examples:
            >>> conv_1 = nn.Conv2d(3, 8, 3, padding=1)
            >>> conv_2 = fusedtie.FusedTiedConv2d(conv_1, "tanh", bias="transform", in_channels=3)
            >>> x = torch.randn(2, 3, 16, 16)
            >>> y = conv_2(x)
            >>> g_w, g_b = torch.tanh(conv_1.weight), torch.tanh(conv_1.bias)
            >>> torch.allclose(y, F.conv2d(x, g_w, g_b, padding=1), atol=1e-5)
            True
            >>> y.sum().backward()  # the gradient reaches conv_1.weight and conv_1.bias
            >>> conv_1.weight.grad.shape
            torch.Size([8, 3, 3, 3])
        """
        if self.padding_mode != "zeros":
            input_dim(input, None, "FusedTiedConv2d")  # before F.pad, whose error for other ranks is unclear
            check_padded_size(input, self._reversed_padding_repeated_twice, "FusedTiedConv2d", self.padding_mode)
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        weight, bias = self._source_tensors()
        self._check_not_sharded(weight, input)
        if is_caching():
            derived = cache_lookup(self, weight, bias, self._derive)
            if derived is not None:
                return run_tied_conv2d(input, derived[0], derived[1], self._op_args_derived)
        return run_tied_conv2d(input, weight, bias, self._op_args)

    def _derive(self, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """(f(W), g(b)) as tensors, for the cache of :func:`fusedtie.cached`."""
        if self.bias_mode == "transform" and bias is not None:
            bias = apply_transform(bias, self.transform)
        return apply_transform(weight, self.transform), bias

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
        with torch.no_grad():
            source_weight, source_bias = self._source_tensors()
            weight, bias = self._derive(source_weight, source_bias)
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=bias is not None,
            padding_mode=self.padding_mode,
            device=weight.device,
            dtype=weight.dtype,
        )
        return self._filled(conv, weight, source_weight, bias, source_bias)

    def _untied(self) -> nn.Conv2d:
        return self.to_conv2d()

    def extra_repr(self) -> str:
        return self._geometry_repr(
            repr(self.bias_mode),
            ("padding", self.padding, (0, 0)),
            ("dilation", self.dilation, (1, 1)),
            ("groups", self.groups, 1),
            ("padding_mode", self.padding_mode, "zeros"),
        )
