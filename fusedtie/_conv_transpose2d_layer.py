"""``FusedTiedConvTranspose2d``: the decoder of a tied autoencoder, a transposed conv whose weight
is f(source.weight), owning only its bias; published as fusedtie.nn.FusedTiedConvTranspose2d. The
tie itself is fusedtie/_tied_layer.py's."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ._checks import check_output_padding
from ._op_args import TiedConvTranspose2dArgs, TransformLike, _pair, normalize_padding
from ._tied_layer import _TiedLayer
from .cache import is_caching
from .cache import lookup as cache_lookup
from .ops import apply_transform, input_dim, run_tied_conv_transpose2d
from .transforms import Transform


class FusedTiedConvTranspose2d(_TiedLayer):
    r"""A transposed 2-D convolution whose weight is ``f(source.weight)``: a tied decoder.

    Computes ``F.conv_transpose2d(x, f(W), b, stride, padding, output_padding, groups, dilation)``
    with W the weight of an encoder ``nn.Conv2d`` (``source``), so that ``decoder(encoder(x))`` has
    x's shape for matching geometry: it maps the source's ``out_channels`` back to its
    ``in_channels``.

    The tie is FusedTiedConv2d's: the layer owns no weight, ``parameters()`` of a network holding
    both layers yields the source's weight once (plus this layer's bias), ``state_dict()`` has the
    source's keys only under the source's own name (``source.*`` when the layer is used alone),
    and deepcopy, ``torch.save``/``load``, ``.to()`` and ``fusedtie.cached()`` keep the tie.

    Args:
        source: the ``nn.Conv2d`` (the encoder layer) that owns the weight; not a transposed conv,
            nor a fusedtie layer.
        transform: f: a name from ``available_transforms()`` or a ``Transform``; ``"identity"``
            (the default) is the classic tied autoencoder, W^T as the decoder.
        bias: whether the layer has a bias of its own (``out_channels`` values, initialised as
            ``nn.ConvTranspose2d``'s). It is this layer's parameter, not derived from the source.
        stride: defaults to the source's.
        padding: an int or a pair; defaults to the source's (``padding="same"`` of an odd kernel
            becomes its symmetric padding, ``"valid"`` 0; an asymmetric "same" must be given
            explicitly).
        output_padding: the extra rows/columns on the bottom/right, as ``nn.ConvTranspose2d``'s (for
            a stride-2 encoder with an even input size, ``output_padding=1`` restores the size), or
            give ``output_size`` to ``forward``.
        dilation: defaults to the source's.
        groups: defaults to the source's.
        padding_mode: only ``"zeros"``, as ``nn.ConvTranspose2d`` (the source's is not inherited).

    Raises:
        TypeError: a source that is not an ``nn.Conv2d`` (or is a fusedtie layer), or a ``bias``
            that is not a bool.
        ValueError: an unknown transform, a ``padding_mode`` other than ``"zeros"``, groups that do
            not divide the source's output channels, or bad geometry.

    Examples:
        >>> encoder = nn.Conv2d(3, 16, 4, stride=2, padding=1)
        >>> decoder = fusedtie.FusedTiedConvTranspose2d(encoder)  # weight = encoder.weight
        >>> x = torch.randn(8, 3, 32, 32)
        >>> decoder(torch.relu(encoder(x))).shape
        torch.Size([8, 3, 32, 32])
        >>> [name for name, _ in nn.Sequential(encoder, decoder).named_parameters()]
        ['0.weight', '0.bias', '1.bias']
    """

    __module__ = "fusedtie.nn"  # where pickles (torch.save of a whole model) find the class
    _PICKLED_OP_ARGS = False  # earlier versions stored none (see _TiedLayer.__getstate__)

    _DERIVED_ATTRIBUTES = frozenset({"weight"})
    _FIXED_AT_CONSTRUCTION = frozenset(
        {
            "source",
            "transform",
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "output_padding",
            "dilation",
            "groups",
            "padding_mode",
        }
    )

    def __init__(
        self,
        source: nn.Conv2d,
        transform: TransformLike = "identity",
        bias: bool = True,
        *,
        stride=None,
        padding=None,
        output_padding=0,
        dilation=None,
        groups: Optional[int] = None,
        padding_mode: str = "zeros",
    ) -> None:
        self._check_source(source)
        super().__init__()
        t = Transform.parse(transform)
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be True or False (whether the layer has a bias of its own), got {bias!r}")
        if padding_mode != "zeros":
            raise ValueError(
                f'Only "zeros" padding mode is supported for FusedTiedConvTranspose2d (as for '
                f"nn.ConvTranspose2d), got {padding_mode!r}"
            )
        groups = source.groups if groups is None else groups
        if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
            raise ValueError(f"groups must be a positive integer, got {groups!r}")
        # The source's (out_channels, in_channels/groups, kH, kW) is a transposed convolution's
        # (in_channels, out_channels/groups, kH, kW).
        w_in, w_out_per_group, kh, kw = source.weight.shape
        if w_in % groups != 0:
            raise ValueError(
                f"cannot use groups={groups}: the source weight {list(source.weight.shape)} gives "
                f"{w_in} input channels, and in_channels must be divisible by groups"
            )
        stride = _pair(source.stride if stride is None else stride, "stride")
        dilation = _pair(source.dilation if dilation is None else dilation, "dilation")
        for name, value in (("stride", stride), ("dilation", dilation)):
            if min(value) <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        padding = _symmetric_padding(source.padding if padding is None else padding, (kh, kw), dilation)
        output_padding = _pair(output_padding, "output_padding")
        check_output_padding(output_padding, stride, dilation)

        object.__setattr__(self, "_frozen", False)
        self.transform = t
        self.in_channels = w_in
        self.out_channels = w_out_per_group * groups
        self.kernel_size = (kh, kw)
        self.stride = stride
        self.padding = padding
        self.output_padding = output_padding
        self.dilation = dilation
        self.groups = groups
        self.padding_mode = padding_mode
        if bias:
            self.bias = nn.Parameter(
                torch.empty(self.out_channels, dtype=source.weight.dtype, device=source.weight.device)
            )
            self._init_bias()
        else:
            self.register_parameter("bias", None)
        self._attach_source(source)

    @property
    def weight(self) -> Tensor:
        """f(source.weight), computed on each read and differentiable with respect to the source.

        Read-only: assigning it raises ``AttributeError`` (the source owns the parameter).
        """
        return apply_transform(self.source.weight, self.transform)

    def _init_bias(self) -> None:
        # nn.ConvTranspose2d's rule: uniform in +-1/sqrt(fan_in), fan_in = weight.size(1) * kH * kW.
        fan_in = (self.out_channels // self.groups) * self.kernel_size[0] * self.kernel_size[1]
        bound = 1 / fan_in**0.5 if fan_in > 0 else 0.0
        with torch.no_grad():
            self.bias.uniform_(-bound, bound)

    def reset_parameters(self) -> None:
        """Re-initialises the layer's own bias (as ``nn.ConvTranspose2d`` does), and only it.

        The weight is the source's, reset through the source (``layer.source.reset_parameters()``).
        """
        if self.bias is not None:
            self._init_bias()

    def _build_op_args(self) -> None:
        # Everything the operator needs besides the tensors, normalised once; a call with an
        # output_size replaces the output padding.
        self._op_args = TiedConvTranspose2dArgs(
            self.transform.name,
            self.transform.op_alpha,
            self.stride,
            self.padding,
            self.output_padding,
            self.dilation,
            self.groups,
        )
        self._op_args_derived = self._op_args.derived()

    def forward(self, input: Tensor, output_size: Optional[list[int]] = None) -> Tensor:
        """The transposed convolution with f(source.weight) and the layer's own bias: one operator call.

        Args:
            input: ``(N, in_channels, H, W)``, or unbatched ``(in_channels, H, W)``, where
                ``in_channels`` is the source's ``out_channels``.
            output_size: optional; the output's spatial size (``(H_out, W_out)``, or a full shape),
                from which the output padding is computed exactly as ``nn.ConvTranspose2d`` does
                (overriding ``output_padding`` for this call).

        Returns:
            ``(N, out_channels, H_out, W_out)`` (without N for unbatched input), differentiable with
                respect to ``input``, the source's weight and the bias.

        Raises:
            ValueError: input whose channel count is not ``in_channels``, or an ``output_size`` that
                no output padding can give.

        Examples:
            >>> encoder = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            >>> decoder = fusedtie.FusedTiedConvTranspose2d(encoder)
            >>> x = torch.randn(1, 3, 32, 32)
            >>> decoder(encoder(x)).shape
            torch.Size([1, 3, 31, 31])
            >>> decoder(encoder(x), output_size=x.shape[-2:]).shape
            torch.Size([1, 3, 32, 32])
        """
        output_padding = None  # the layer's own, in _op_args
        if output_size is not None:
            # nn.ConvTranspose2d's own computation (and messages), on this layer's geometry; the rank
            # first, where nn.ConvTranspose2d's computation raises an IndexError.
            input_dim(input, None, "FusedTiedConvTranspose2d")
            output_padding = tuple(
                nn.modules.conv._ConvTransposeNd._output_padding(
                    self,
                    input,
                    output_size,
                    list(self.stride),
                    list(self.padding),
                    list(self.kernel_size),
                    2,
                    list(self.dilation),
                )
            )
        weight = self._source_weight()
        self._check_not_sharded(weight, input)
        bias = self._parameters["bias"]
        args = self._op_args
        if is_caching():
            derived = cache_lookup(self, weight, bias, self._derive)
            if derived is not None:
                weight, bias, args = derived[0], derived[1], self._op_args_derived
        if output_padding is not None:
            args = args._replace(output_padding=output_padding)
        return run_tied_conv_transpose2d(input, weight, bias, args)

    def _derive(self, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """(f(W), b) for the cache of :func:`fusedtie.cached`; the bias is the layer's own."""
        return apply_transform(weight, self.transform), bias

    def to_conv_transpose2d(self) -> nn.ConvTranspose2d:
        """A plain ``nn.ConvTranspose2d`` with f(W) baked in and a copy of this layer's bias
        (untied, for export and deployment): this layer's geometry and training flag, the source's
        dtype and device, ``requires_grad`` as the source weight's and the bias's. A snapshot now;
        ``fusedtie.bake`` does this for a whole model.

        Returns:
            A new ``nn.ConvTranspose2d`` owning copies of f(W) and of the bias.

        Examples:
            >>> encoder = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            >>> decoder = fusedtie.FusedTiedConvTranspose2d(encoder, output_padding=1)
            >>> decoder.to_conv_transpose2d()
            ConvTranspose2d(8, 3, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), output_padding=(1, 1))
        """
        with torch.no_grad():
            source_weight = self._source_weight()
            weight = apply_transform(source_weight, self.transform)
        bias = self.bias
        conv = nn.ConvTranspose2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            output_padding=self.output_padding,
            groups=self.groups,
            bias=bias is not None,
            dilation=self.dilation,
            device=weight.device,
            dtype=weight.dtype,
        )
        return self._filled(conv, weight, source_weight, bias, bias)

    def _untied(self) -> nn.ConvTranspose2d:
        return self.to_conv_transpose2d()

    def extra_repr(self) -> str:
        return self._geometry_repr(
            str(self.bias is not None),
            ("padding", self.padding, (0, 0)),
            ("output_padding", self.output_padding, (0, 0)),
            ("dilation", self.dilation, (1, 1)),
            ("groups", self.groups, 1),
        )


def _symmetric_padding(padding, kernel_size: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int]:
    """A transposed convolution's (symmetric) padding from an int, a pair, or a source's string."""
    if isinstance(padding, str):
        top, bottom, left, right = normalize_padding(padding, kernel_size, (1, 1), dilation)
        if (top, left) != (bottom, right):
            raise ValueError(
                f"padding={padding!r} pads the {kernel_size[0]}x{kernel_size[1]} kernel asymmetrically "
                f"(top, bottom, left, right = {top}, {bottom}, {left}, {right}), which a transposed "
                "convolution cannot express; give padding= explicitly"
            )
        return (top, left)
    pair = _pair(padding, "padding")
    if min(pair) < 0:
        raise ValueError(f"negative padding is not supported, got {padding!r}")
    return pair
