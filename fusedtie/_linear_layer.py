"""``FusedTiedLinear``: a Linear layer whose weight is f(source.weight), owning no weight; published as
fusedtie.nn.FusedTiedLinear. Its call is ``tied_linear``'s (fusedtie/ops.py), the tie itself
fusedtie/_tied_layer.py's."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ._op_args import LINEAR_CONV2D_ARGS, LINEAR_CONV_TRANSPOSE2D_ARGS, TransformLike
from ._tied_layer import _TiedLayer
from .cache import is_caching
from .cache import lookup as cache_lookup
from .ops import apply_transform, run_tied_linear
from .transforms import Transform

_BIAS_MODES = ("same", "transform", None)


class FusedTiedLinear(_TiedLayer):
    r"""A Linear layer whose weight is ``f(source.weight)``: the tie as one fused operator.

    With ``transpose=False`` a drop-in for ``nn.Linear`` computing ``F.linear(x, f(W), g(b))``, W
    and b the source's parameters. With ``transpose=True`` the tied decoder ``x f(W) + b``: it maps
    the source's ``out_features`` back to its ``in_features`` and has a bias of its own (as
    ``FusedTiedConvTranspose2d`` has). Both run ``tied_linear``.

    The semantics are ``FusedTiedConv2d``'s: the layer owns no weight (``parameters()`` of a network
    holding both layers yields the source's tensors once, its ``state_dict()`` has only the
    source's keys, plus the decoder's own bias); used alone it carries its source (as the submodule
    ``source``), moves it with ``.to()`` and saves it under ``source.*``; deepcopy,
    ``torch.save``/``load``, ``fusedtie.cached()`` and ``fusedtie.bake`` (to an ``nn.Linear``) keep
    or bake the tie. ``weight`` reads as ``nn.Linear``'s would, ``(out_features, in_features)``: f(W),
    or f(W)ᵀ for the decoder. It is not an ``nn.Linear`` subclass, so init loops reach the source only.

    Args:
        source: the ``nn.Linear`` that owns the weight (a parametrized one is read through its
            parametrization on every call); not another fusedtie layer.
        transform: f: a name from ``available_transforms()`` or a ``Transform``; ``"identity"`` (the
            default) shares the weight as it is (Wᵀ for the classic tied autoencoder's decoder).
        bias: with ``transpose=False``, ``"same"`` (the source's bias as it is; none if the source
            has none), ``"transform"`` (f(source.bias)) or ``None``/``False`` (no bias). With
            ``transpose=True``, whether the decoder has a bias of its own: ``True`` (or the default
            ``"same"``, read as True, as ``nn.Linear`` has a bias by default) or ``False``/``None``.
        transpose: False for the tied layer, True for the tied decoder.
        in_features: optional; if given, it must equal what the tie implies, so a tie that cannot
            work fails here and says why.
        out_features: optional; checked as ``in_features``.

    Raises:
        TypeError: a source that is not an ``nn.Linear``, or is a fusedtie layer (ties do not
            chain); a ``transpose`` that is not a bool.
        ValueError: an unknown transform or bias mode, ``bias="transform"`` on a source without a
            bias or with ``transpose=True``, a lazy source not yet initialised, a source with no
            features, or ``in_features``/``out_features`` that the tie cannot give.

    Examples:
        >>> encoder = nn.Linear(784, 64)
        >>> decoder = fusedtie.FusedTiedLinear(encoder, transpose=True)  # weight = encoder.weight.T
        >>> x = torch.randn(8, 784)
        >>> decoder(torch.relu(encoder(x))).shape
        torch.Size([8, 784])
        >>> [name for name, _ in nn.Sequential(encoder, decoder).named_parameters()]
        ['0.weight', '0.bias', '1.bias']
        >>> positive = fusedtie.FusedTiedLinear(nn.Linear(64, 64), "softplus")  # weights > 0
    """

    __module__ = "fusedtie.nn"  # where pickles (torch.save of a whole model) find the class
    _PICKLED_OP_ARGS = False  # a new layer: its pickles hold no argument objects (_TiedLayer.__getstate__)

    _SOURCE_TYPE = nn.Linear
    _DERIVED_ATTRIBUTES = frozenset({"weight"})  # and "bias" for the tied layer (set in __init__)
    _FIXED_AT_CONSTRUCTION = frozenset({"source", "transform", "bias_mode", "transpose", "in_features", "out_features"})

    def __init__(
        self,
        source: nn.Linear,
        transform: TransformLike = "identity",
        bias: Union[str, None, bool] = "same",
        *,
        transpose: bool = False,
        in_features: Optional[int] = None,
        out_features: Optional[int] = None,
    ) -> None:
        self._check_source(source)
        super().__init__()
        t = Transform.parse(transform)
        if not isinstance(transpose, bool):
            raise TypeError(f"transpose must be True or False, got {transpose!r}")
        if source.weight.numel() == 0:
            raise ValueError(f"cannot tie to a source with no features: its weight is {list(source.weight.shape)}")
        source_out, source_in = source.weight.shape
        implied_in, implied_out = (source_out, source_in) if transpose else (source_in, source_out)
        bias_mode = self._bias_mode(bias, transpose, source)
        wrong = [
            f"{name}={asked!r} (the tie gives {implied!r})"
            for name, asked, implied in (
                ("in_features", in_features, implied_in),
                ("out_features", out_features, implied_out),
            )
            if asked is not None and asked != implied
        ]
        if wrong:
            role = "decoder (transpose=True) maps" if transpose else "layer maps"
            raise ValueError(
                f"cannot tie: the source's weight is {list(source.weight.shape)} (out_features, in_features), "
                f"so the tied {role} {implied_in} to {implied_out} features; asked for " + ", ".join(wrong)
            )

        object.__setattr__(self, "_frozen", False)
        self.transform = t
        self.transpose = transpose
        self.bias_mode = bias_mode
        self.in_features = implied_in
        self.out_features = implied_out
        if bias_mode == "own":
            self.bias = nn.Parameter(torch.empty(implied_out, dtype=source.weight.dtype, device=source.weight.device))
            self._init_bias()
        elif transpose:
            self.register_parameter("bias", None)
        if not transpose:
            # The tied layer's bias is derived from the source (read through __getattr__), the
            # decoder's is its own parameter: the tie's refusal to assign covers it only here.
            object.__setattr__(self, "_DERIVED_ATTRIBUTES", frozenset({"weight", "bias"}))
        self._attach_source(source)

    @staticmethod
    def _bias_mode(bias, transpose: bool, source: nn.Linear) -> Optional[str]:
        """The layer's bias mode: "same", "transform" or None for a tied layer, "own" or None for a decoder."""
        if bias is False:
            bias = None
        if transpose:
            if bias not in ("same", True, None):
                raise ValueError(
                    "with transpose=True the decoder's bias is its own: bias must be True (or 'same', read "
                    f"as True) or False/None, got {bias!r}"
                )
            return None if bias is None else "own"
        if bias not in _BIAS_MODES:
            raise ValueError(f"bias must be 'same', 'transform' or None, got {bias!r}")
        if bias == "transform" and source.bias is None:
            raise ValueError(
                "bias='transform' applies the transform to the source's bias, but the source has no "
                "bias (it was built with bias=False); use bias=None"
            )
        return bias

    def _init_bias(self) -> None:
        # nn.Linear's rule: uniform in +-1/sqrt(in_features).
        bound = 1 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.bias.uniform_(-bound, bound)

    def _build_op_args(self) -> None:
        template = LINEAR_CONV_TRANSPOSE2D_ARGS if self.transpose else LINEAR_CONV2D_ARGS
        args = template._replace(transform=self.transform.name, alpha=self.transform.op_alpha)
        if self.bias_mode == "transform":
            args = args._replace(bias_transform=self.transform.name, bias_alpha=self.transform.op_alpha)
        self._op_args = args
        self._op_args_derived = args.derived()

    # --- the derived tensors ----------------------------------------------------------------------

    @property
    def weight(self) -> Tensor:
        """f(source.weight) as ``nn.Linear``'s weight would be, ``(out_features, in_features)``: f(W),
        or f(W)ᵀ for the decoder. Computed on each read, differentiable with respect to the source;
        read-only (the source owns the parameter)."""
        derived = apply_transform(self.source.weight, self.transform)
        return derived.t() if self.transpose else derived

    def __getattr__(self, name: str):
        if name == "bias" and not self.transpose:
            return self._derived_bias()
        return super().__getattr__(name)

    def _derived_bias(self) -> Optional[Tensor]:
        """The tied layer's bias: the source's itself ("same"), f(source.bias) ("transform"), or None."""
        source_bias = self.source.bias
        if self.bias_mode is None or source_bias is None:
            return None
        return source_bias if self.bias_mode == "same" else apply_transform(source_bias, self.transform)

    def reset_parameters(self) -> None:
        """Re-initialises the decoder's own bias (as ``nn.Linear`` does), and only it; refused for a
        tied layer, which owns no parameters (reset the source: ``layer.source.reset_parameters()``).

        Raises:
            RuntimeError: with ``transpose=False``, always, saying so.
        """
        if not self.transpose:
            raise RuntimeError(
                "FusedTiedLinear owns no parameters: its weight is f(source.weight). Reset the source "
                "layer instead (layer.source.reset_parameters())."
            )
        if self.bias is not None:
            self._init_bias()

    def _source_tensors(self) -> tuple[Tensor, Optional[Tensor]]:
        """The source's weight and the bias the call uses (the source's, or the decoder's own)."""
        weight = self._source_weight()
        if self.transpose:
            return weight, self._parameters["bias"]
        return weight, (None if self.bias_mode is None else self._source_bias())

    def forward(self, input: Tensor) -> Tensor:
        """``F.linear(input, f(W), g(b))``, or the decoder's ``input @ f(W) + b``: one operator call.

        Args:
            input: ``(*, in_features)``.

        Returns:
            ``(*, out_features)``, differentiable with respect to ``input`` and the parameters.

        Raises:
            ValueError: input whose last dimension is not ``in_features`` (the message names both).
        """
        weight, bias = self._source_tensors()
        self._check_not_sharded(weight, input)
        if is_caching():
            derived = cache_lookup(self, weight, bias, self._derive)
            if derived is not None:
                return run_tied_linear(input, derived[0], derived[1], self._op_args_derived)
        return run_tied_linear(input, weight, bias, self._op_args)

    def _derive(self, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """(f(W), g(b)) as tensors, for the cache of :func:`fusedtie.cached`."""
        if self.bias_mode == "transform" and bias is not None:
            bias = apply_transform(bias, self.transform)
        return apply_transform(weight, self.transform), bias

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with f(W) (f(W)ᵀ for the decoder) and the bias baked in (untied, for
        export and deployment): this layer's training flag, the source's dtype and device,
        ``requires_grad`` as the sources'. A snapshot now; ``fusedtie.bake`` does this for a whole model.

        Returns:
            A new ``nn.Linear(in_features, out_features)`` owning copies of the weight and bias.

        Examples:
            >>> encoder = nn.Linear(16, 4)
            >>> fusedtie.FusedTiedLinear(encoder, "abs", transpose=True).to_linear()
            Linear(in_features=4, out_features=16, bias=True)
        """
        return self._untied()

    def _untied(self) -> nn.Linear:
        with torch.no_grad():
            source_weight, source_bias = self._source_tensors()
            weight, bias = self._derive(source_weight, source_bias)
        linear = nn.Linear(
            self.in_features, self.out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype
        )
        return self._filled(linear, weight.t() if self.transpose else weight, source_weight, bias, source_bias)

    def extra_repr(self) -> str:
        bias = str(self.bias_mode == "own") if self.transpose else repr(self.bias_mode)
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, transform={self.transform}, bias={bias}"
        )
        return text + (", transpose=True" if self.transpose else "")
