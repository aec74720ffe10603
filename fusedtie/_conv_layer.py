"""``_FusedTiedConvNd``: a conv layer whose weight is f(source.weight), owning no parameters, for a
source of any spatial rank. ``FusedTiedConv2d`` (fusedtie/_conv2d_layer.py, rank 2),
``FusedTiedConv1d`` (fusedtie/_conv1d_layer.py, rank 1) and ``FusedTiedConv3d``
(fusedtie/_conv3d_layer.py, rank 3) are this class with their source type, their tuple normaliser,
their call path and their signature and docstrings; the 2-d and 1-d layers run the 2-d operator, the
1-d layer on an H = 1 view (fusedtie/_op_args.py's ``as_2d_geometry``), the 3-d layer the 3-d
operator (``as_3d_geometry``, ``TiedConv3dArgs``). The tie itself is fusedtie/_tied_layer.py's."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_geometry_values, check_padded_size
from ._op_args import TiedConv2dArgs, TransformLike, as_2d_geometry
from ._tied_layer import _TiedLayer
from .cache import is_caching
from .cache import lookup as cache_lookup
from .ops import apply_transform, input_dim
from .transforms import Transform

_BIAS_MODES = ("same", "transform", None)
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_IDENTITY = Transform("identity")


class _FusedTiedConvNd(_TiedLayer):
    """What ``FusedTiedConv2d``, ``FusedTiedConv1d`` and ``FusedTiedConv3d`` share: everything but the class attributes
    below, the signature and the docstrings (see ``FusedTiedConv2d`` for the semantics)."""

    _RANK: int  # the spatial rank: 3, 2 or 1
    _WEIGHT_LAYOUT: str  # the source weight's dimensions, for messages
    _as_tuple: Callable  # _triple, _pair or _single: an int or a sequence as a tuple of _RANK ints
    _run: Callable  # run_tied_conv3d, run_tied_conv2d or run_tied_conv1d (a staticmethod)
    # The operator's (stride, padding, dilation) for the layer's geometry, and its argument tuple:
    # the 2-d operator's (which the 1-d layer runs on an H = 1 view) unless a subclass says otherwise.
    _geometry: Callable = staticmethod(as_2d_geometry)
    _ARGS: type = TiedConv2dArgs

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
        source: nn.Module,
        transform: TransformLike,
        bias: Union[str, None, bool],
        stride,
        padding,
        dilation,
        groups: Optional[int],
        padding_mode: Optional[str],
        in_channels: Optional[int],
        out_channels: Optional[int],
        kernel_size,
    ) -> None:
        self._check_source(source)
        super().__init__()
        cls = type(self).__name__
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
        w_out, w_in_per_group = source.weight.shape[:2]
        kernel = tuple(source.weight.shape[2:])
        if w_out % groups != 0:
            raise ValueError(
                f"cannot use groups={groups}: the source weight {list(source.weight.shape)} has "
                f"{w_out} output channels, and out_channels must be divisible by groups"
            )
        implied = {"in_channels": w_in_per_group * groups, "out_channels": w_out, "kernel_size": kernel}
        asked = {"in_channels": in_channels, "out_channels": out_channels, "kernel_size": kernel_size}
        wrong = [
            f"{name}={asked[name]!r} (the tie gives {implied[name]!r})"
            for name in implied
            if asked[name] is not None
            and (self._as_tuple(asked[name], name) if name == "kernel_size" else asked[name]) != implied[name]
        ]
        if wrong:
            raise ValueError(
                f"cannot tie: a {cls} has its source's weight shape {list(source.weight.shape)} "
                f"{self._WEIGHT_LAYOUT}, so with groups={groups} it maps {implied['in_channels']} to "
                f"{implied['out_channels']} channels with kernel_size={kernel}; asked for " + ", ".join(wrong)
            )

        object.__setattr__(self, "_frozen", False)
        self.transform = t
        self.bias_mode = bias
        self.in_channels = implied["in_channels"]
        self.out_channels = implied["out_channels"]
        self.kernel_size = kernel
        self.stride = self._as_tuple(source.stride if stride is None else stride, "stride")
        self.dilation = self._as_tuple(source.dilation if dilation is None else dilation, "dilation")
        self.groups = groups
        padding = source.padding if padding is None else padding
        self.padding = padding if isinstance(padding, str) else self._as_tuple(padding, "padding")
        self.padding_mode = padding_mode
        check_geometry_values(self.stride, (0,) if isinstance(padding, str) else self.padding, self.dilation)
        _, op_padding, _ = self._geometry(kernel, self.stride, self.padding, self.dilation)
        if padding_mode != "zeros":
            # nn.Conv3d's order (nn.Conv2d's, nn.Conv1d's): F.pad's, the last dimension first
            # ((left, right[, top, bottom[, front, back]])), then a convolution without padding
            pairs = [op_padding[i : i + 2] for i in range(0, len(op_padding), 2)]
            self._reversed_padding_repeated_twice = tuple(p for pair in reversed(pairs) for p in pair)[: 2 * self._RANK]
        self._attach_source(source)

    def _build_op_args(self) -> None:
        # Everything the operator needs besides the tensors, normalised once.
        stride, padding, dilation = self._geometry(self.kernel_size, self.stride, self.padding, self.dilation)
        if self.padding_mode != "zeros":
            padding = (0,) * len(padding)  # forward pads with F.pad
        bias_transform = self.transform if self.bias_mode == "transform" else _IDENTITY
        self._op_args = self._ARGS(
            self.transform.name,
            self.transform.op_alpha,
            bias_transform.name,
            bias_transform.op_alpha,
            stride,
            padding,
            dilation,
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
            f"{type(self).__name__} owns no parameters: its weight is f(source.weight). Reset the source "
            "layer instead (layer.source.reset_parameters())."
        )

    def _source_tensors(self) -> tuple[Tensor, Optional[Tensor]]:
        """The source's weight and (unless bias=None) bias, as they are now.

        Read from the modules' dictionaries when they are plain parameters: nn.Module attribute
        access costs about 1-2 us a lookup, three of them a call, which is a tenth of the layer's
        fixed cost. A parametrized (or otherwise computed) weight falls back to attribute access.
        """
        weight = self._source_weight()
        return weight, (None if self.bias_mode is None else self._source_bias())

    def forward(self, input: Tensor) -> Tensor:
        """The convolution with f(source.weight) and the derived bias: one operator call.

        Inside ``fusedtie.cached()``, a call that records no autograd graph reuses f(W) computed at
        the layer's first such call.

        Args:
            input: ``(N, in_channels, H, W)``, or unbatched ``(in_channels, H, W)``;
                ``(N, in_channels, L)`` or ``(in_channels, L)`` for ``FusedTiedConv1d``;
                ``(N, in_channels, D, H, W)`` or ``(in_channels, D, H, W)`` for ``FusedTiedConv3d``.

        Returns:
            ``(N, out_channels, H_out, W_out)`` (``(N, out_channels, L_out)`` for ``FusedTiedConv1d``,
                ``(N, out_channels, D_out, H_out, W_out)`` for ``FusedTiedConv3d``; without N for
                unbatched input), differentiable with respect to ``input`` and the source's parameters.

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
            # before F.pad, whose error for other ranks is unclear
            input_dim(input, None, type(self).__name__, self._RANK)
            check_padded_size(input, self._reversed_padding_repeated_twice, type(self).__name__, self.padding_mode)
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        weight, bias = self._source_tensors()
        self._check_not_sharded(weight, input)
        if is_caching():
            derived = cache_lookup(self, weight, bias, self._derive)
            if derived is not None:
                return self._run(input, derived[0], derived[1], self._op_args_derived)
        return self._run(input, weight, bias, self._op_args)

    def _derive(self, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """(f(W), g(b)) as tensors, for the cache of :func:`fusedtie.cached`."""
        if self.bias_mode == "transform" and bias is not None:
            bias = apply_transform(bias, self.transform)
        return apply_transform(weight, self.transform), bias

    def _untied(self) -> nn.Module:
        """The plain ``_SOURCE_TYPE`` conv with f(W) and g(b) baked in (``to_conv2d``, ``to_conv1d``,
        ``to_conv3d``)."""
        with torch.no_grad():
            source_weight, source_bias = self._source_tensors()
            weight, bias = self._derive(source_weight, source_bias)
        conv = self._SOURCE_TYPE(
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

    def extra_repr(self) -> str:
        return self._geometry_repr(
            repr(self.bias_mode),
            ("padding", self.padding, (0,) * self._RANK),
            ("dilation", self.dilation, (1,) * self._RANK),
            ("groups", self.groups, 1),
            ("padding_mode", self.padding_mode, "zeros"),
        )
