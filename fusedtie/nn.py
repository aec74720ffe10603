"""Layers tied to an nn.Conv2d source: FusedTiedConv2d (weight f(source.weight), owning no
parameters) and FusedTiedConvTranspose2d (the decoder of a tied autoencoder: conv_transpose2d with
f(source.weight), owning only its bias). The tie machinery they share (the source as submodule,
state_dict without duplicate keys, checkpoints of either layout, cycle checks, geometry fixed at
construction) is _TiedLayer's."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._fsdp import check_source_not_sharded
from ._state_dict import derived_loaded, install_source_hooks, load_book, save_book
from .cache import is_caching
from .cache import lookup as cache_lookup
from .ops import (
    TransformLike,
    _check_output_padding,
    _pair,
    apply_transform,
    normalize_padding,
    run_tied_conv2d,
    run_tied_conv_transpose2d,
)
from .transforms import Transform

_BIAS_MODES = ("same", "transform", None)
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_SLOT = "source."  # the state_dict prefix of the source inside a tied layer


class _TiedLayer(nn.Module):
    """What every layer tied to an ``nn.Conv2d`` source shares.

    The source is the registered submodule ``source`` (so ``.to()``, deepcopy, ``torch.save`` and
    ``parameters()`` see one set of tensors); ``state_dict()`` writes it once (see the bookkeeping
    below); the attributes in ``_DERIVED_ATTRIBUTES`` read from the source and cannot be assigned;
    those in ``_FIXED_AT_CONSTRUCTION`` are normalised once in ``__init__`` and cannot change.
    A subclass calls ``_check_source`` before ``nn.Module.__init__`` and ``_attach_source`` last.
    """

    _DERIVED_ATTRIBUTES: frozenset = frozenset()
    _FIXED_AT_CONSTRUCTION: frozenset = frozenset()

    @classmethod
    def _check_source(cls, source) -> None:
        if isinstance(source, _TiedLayer):
            article = "another" if type(source) is cls else "a"
            raise TypeError(
                f"the source of a {cls.__name__} must be an nn.Conv2d that owns its parameters, got "
                f"{article} {type(source).__name__}; tie to its source instead (ties cannot chain or form cycles)"
            )
        if not isinstance(source, nn.Conv2d):
            hint = ""
            if isinstance(source, nn.modules.conv._ConvTransposeNd):
                hint = " (the forward convolution whose weight is tied, not a transposed one)"
            raise TypeError(f"{cls.__name__} ties to an nn.Conv2d source{hint}, got {type(source).__name__}")
        if isinstance(source.weight, nn.parameter.UninitializedParameter):
            raise ValueError(
                "the source is a lazy conv whose weight is not initialised yet; run one forward "
                "pass through it before tying"
            )

    def _attach_source(self, source: nn.Conv2d) -> None:
        """Registers the source and the state_dict hooks, and fixes the geometry (call it last)."""
        self.source = source
        install_source_hooks(source)
        self.register_load_state_dict_post_hook(derived_loaded)
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name, value):
        cls = type(self).__name__
        if name in self._DERIVED_ATTRIBUTES:
            raise AttributeError(
                f"{cls}.{name} is derived from its source and cannot be assigned; "
                f"assign the source's instead (layer.source.{name})"
            )
        if getattr(self, "_frozen", False) and name in self._FIXED_AT_CONSTRUCTION:
            # The operator's arguments are normalised once in __init__; a later change would be
            # silently ignored, so it is refused.
            raise AttributeError(f"{cls}.{name} is fixed at construction; build a new {cls} instead")
        super().__setattr__(name, value)

    def _source_weight(self) -> Tensor:
        """The source's weight as it is now: read from the module's dictionary when it is a plain
        parameter (nn.Module attribute access costs 1-2 us), else by attribute (a parametrized one)."""
        weight = self._modules["source"]._parameters.get("weight")
        return self._modules["source"].weight if weight is None else weight

    def _check_not_sharded(self, weight: Tensor, input: Tensor) -> None:
        """A clear error when FSDP2 hands this layer a shard of its source's weight (fusedtie/_fsdp.py)."""
        if type(weight) is not nn.Parameter:  # plain parameters (the common case) cannot be shards
            check_source_not_sharded(self, self._modules["source"], weight, input)

    def _filled(
        self,
        layer: nn.Module,
        weight: Tensor,
        source_weight: Tensor,
        bias: Optional[Tensor],
        source_bias: Optional[Tensor],
    ) -> nn.Module:
        """``layer`` (a plain conv just built with this layer's geometry) holding copies of ``weight``
        and ``bias``, requiring grad as their sources do, in this layer's training mode."""
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.weight.requires_grad_(source_weight.requires_grad)
            if bias is not None:
                layer.bias.copy_(bias)
                layer.bias.requires_grad_(source_bias.requires_grad)
        return layer.train(self.training)

    def _untied(self) -> nn.Module:
        """The plain PyTorch layer with f(W) baked in (what :func:`fusedtie.bake` puts in its place)."""
        raise NotImplementedError

    # --- a source that holds its own tied layer ------------------------------------------------------
    #
    # A conv that registers a tie to itself as its submodule (``self.mirror = FusedTiedConv2d(self)``
    # in a Conv2d subclass) makes the module tree a cycle: source -> mirror -> source. nn.Module's
    # recursive methods would recurse until Python's limit; the entry points below, which nn.Module
    # reaches on this layer before it recurses into the source, say so instead.

    def _name_inside_source(self) -> Optional[str]:
        """The path of this layer inside its own source, if the source holds it (a cycle)."""
        for name, module in self._modules["source"].named_modules():
            if module is self:
                return name
        return None

    def _check_no_cycle(self, action: str) -> None:
        name = self._name_inside_source()
        if name is not None:
            source = self._modules["source"]
            raise RuntimeError(
                f"cannot {action}: this {type(self).__name__} is registered inside its own source "
                f"({type(source).__name__}, as its submodule '{name}'), so the module tree is a cycle "
                f"(source -> {name} -> source) that nn.Module's recursive methods cannot walk; "
                f"register the tied layer beside its source (on a common parent), not inside it"
            )

    def train(self, mode: bool = True):
        self._check_no_cycle("train()/eval()")
        return super().train(mode)

    def apply(self, fn):
        self._check_no_cycle("apply()")
        return super().apply(fn)

    def _apply(self, fn, recurse=True):
        self._check_no_cycle("convert or move the module (to(), double(), to_empty(), ...)")
        return super()._apply(fn, recurse)

    def __repr__(self) -> str:
        name = self._name_inside_source()
        if name is not None:  # repr should describe, not raise
            return (
                f"{self._get_name()}({self.extra_repr()}, source=<the "
                f"{type(self._modules['source']).__name__} that holds this layer as '{name}': a cycle>)"
            )
        return super().__repr__()

    # --- state_dict without duplicate keys ----------------------------------------------------------

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        self._check_no_cycle("state_dict()")
        # Called by a parent, the source may also be saved under its own name elsewhere in the same
        # state_dict; the source's hook then keeps that entry and drops ours (see _state_dict._source_saved).
        if destination is not None:
            book = save_book(destination)
            if book is not None:
                book.slot_prefixes.add(prefix + _SLOT)
        return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        self._check_no_cycle("load_state_dict()")
        slot = prefix + _SLOT
        book = load_book(missing_keys)
        book.slots.add(slot)
        if not any(key.startswith(slot) for key in state_dict):
            # The checkpoint stores the source under its own name (or nowhere). Let the source's
            # visit through this layer load its current values onto itself, and report the keys
            # missing only if no other visit loads the source in this call (see derived_loaded).
            book.placeholder_slots.add(slot)
            own = self.source.state_dict(keep_vars=True)
            for key, value in own.items():
                state_dict[slot + key] = value
            book.placeholders[id(self)] = (id(self.source), [slot + key for key in own])
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _geometry_repr(self, bias: str, *optional: tuple) -> str:
        """extra_repr as nn.Conv2d's: the fixed fields, then each (name, value, default) whose value
        differs from its default."""
        fixed = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, transform={self.transform}, bias={bias}"
        )
        return fixed + "".join(f", {name}={value!r}" for name, value, default in optional if value != default)


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
        if padding_mode == "zeros":
            op_padding = (top, bottom, left, right)
        else:
            # nn.Conv2d's order: F.pad's (left, right, top, bottom), then a convolution without padding
            self._reversed_padding_repeated_twice = (left, right, top, bottom)
            op_padding = (0, 0, 0, 0)
        bias_transform = t if bias == "transform" else Transform("identity")
        # Everything the operator needs besides the tensors, normalised once.
        self._op_args = (
            t.name,
            t.op_alpha,
            bias_transform.name,
            bias_transform.op_alpha,
            self.stride,
            op_padding,
            self.dilation,
            self.groups,
        )
        # The same call on tensors that are already f(W) and g(b) (fusedtie.cached()'s path).
        self._op_args_derived = ("identity", 1.0, "identity", 1.0) + self._op_args[4:]
        self._attach_source(source)

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
            if input.dim() not in (3, 4):  # before F.pad, whose error for other ranks is unclear
                raise ValueError(
                    "Expected 3D (unbatched) or 4D (batched) input to FusedTiedConv2d, but got input of "
                    f"size: {list(input.shape)}"
                )
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
        _check_output_padding(output_padding, stride, dilation)

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

    def _op_args(self, output_padding: tuple[int, int], transform: Transform) -> tuple:
        return (
            transform.name,
            transform.op_alpha,
            self.stride,
            self.padding,
            output_padding,
            self.dilation,
            self.groups,
        )

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
        if output_size is None:
            output_padding = self.output_padding
        else:
            # nn.ConvTranspose2d's own computation (and messages), on this layer's geometry.
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
        if is_caching():
            derived = cache_lookup(self, weight, bias, self._derive)
            if derived is not None:
                return run_tied_conv_transpose2d(
                    input, derived[0], derived[1], self._op_args(output_padding, _IDENTITY)
                )
        return run_tied_conv_transpose2d(input, weight, bias, self._op_args(output_padding, self.transform))

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


_IDENTITY = Transform("identity")


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
