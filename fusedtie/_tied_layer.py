"""``_TiedLayer``: what every layer tied to a conv source (an ``nn.Conv2d``, or an ``nn.Conv1d``)
shares (the source as submodule, state_dict without duplicate keys, checkpoints of either layout,
cycle checks, geometry fixed at construction, pickling). The layers are fusedtie/_conv2d_layer.py's,
fusedtie/_conv1d_layer.py's (both on fusedtie/_conv_layer.py) and fusedtie/_conv_transpose2d_layer.py's,
published as fusedtie.nn."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ._fsdp import check_source_not_sharded
from ._state_dict import derived_loaded, install_source_hooks, slot_loading, slot_saving

_SLOT = "source."  # the state_dict prefix of the source inside a tied layer


class _TiedLayer(nn.Module):
    """What every layer tied to a conv source (``_SOURCE_TYPE``, an ``nn.Conv2d`` unless a subclass
    says otherwise) shares.

    The source is the registered submodule ``source`` (so ``.to()``, deepcopy, ``torch.save`` and
    ``parameters()`` see one set of tensors); ``state_dict()`` writes it once (see the bookkeeping
    below); the attributes in ``_DERIVED_ATTRIBUTES`` read from the source and cannot be assigned;
    those in ``_FIXED_AT_CONSTRUCTION`` are normalised once in ``__init__`` and cannot change.
    A subclass calls ``_check_source`` before ``nn.Module.__init__`` and ``_attach_source`` last.
    """

    _SOURCE_TYPE: type = nn.Conv2d  # the class a source must be (and a layer's plain counterpart's)
    _DERIVED_ATTRIBUTES: frozenset = frozenset()
    _FIXED_AT_CONSTRUCTION: frozenset = frozenset()

    @classmethod
    def _check_source(cls, source) -> None:
        kind = f"nn.{cls._SOURCE_TYPE.__name__}"
        if isinstance(source, _TiedLayer):
            article = "another" if type(source) is cls else "a"
            raise TypeError(
                f"the source of a {cls.__name__} must be an {kind} that owns its parameters, got "
                f"{article} {type(source).__name__}; tie to its source instead (ties cannot chain or form cycles)"
            )
        if not isinstance(source, cls._SOURCE_TYPE):
            hint = ""
            if isinstance(source, nn.modules.conv._ConvTransposeNd):
                hint = " (the forward convolution whose weight is tied, not a transposed one)"
            raise TypeError(f"{cls.__name__} ties to an {kind} source{hint}, got {type(source).__name__}")
        if isinstance(source.weight, nn.parameter.UninitializedParameter):
            raise ValueError(
                "the source is a lazy conv whose weight is not initialised yet; run one forward "
                "pass through it before tying"
            )

    def _attach_source(self, source: nn.Module) -> None:
        """Registers the source and the state_dict hooks, builds the operator's arguments and fixes
        the geometry (call it last)."""
        self.source = source
        install_source_hooks(source)
        self.register_load_state_dict_post_hook(derived_loaded)
        self._build_op_args()
        object.__setattr__(self, "_frozen", True)

    def _build_op_args(self) -> None:
        """Sets ``_op_args`` (the operator's arguments besides the tensors, a named tuple of
        fusedtie/_op_args.py) and ``_op_args_derived`` (the same for tensors that are already f(W),
        the path of ``fusedtie.cached()``) from the layer's fixed geometry."""
        raise NotImplementedError

    # --- pickling -------------------------------------------------------------------------------------
    #
    # The argument objects are rebuilt from the geometry when a layer is unpickled or deep-copied,
    # and pickles hold them as earlier versions did (see _PICKLED_OP_ARGS): so a pickle names no
    # class of fusedtie's internals, and whole-model checkpoints load across versions either way.

    _PICKLED_OP_ARGS = True  # stored as plain tuples (True) or not at all (False)

    def __getstate__(self):
        state = super().__getstate__()
        for name in ("_op_args", "_op_args_derived"):
            if self._PICKLED_OP_ARGS:
                state[name] = tuple(state[name])
            else:
                del state[name]
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._build_op_args()

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

    def _source_bias(self) -> Optional[Tensor]:
        """The source's bias as it is now (None if it has none), read as ``_source_weight`` reads."""
        source = self._modules["source"]
        return source._parameters["bias"] if "bias" in source._parameters else source.bias

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
    #
    # Overrides rather than hooks: a state_dict pre-hook is not given the destination, which
    # identifies the call's bookkeeping, and a load pre-hook registered on each layer would be
    # missing from layers unpickled from earlier versions (see fusedtie/_state_dict.py).

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        self._check_no_cycle("state_dict()")
        if destination is not None:
            slot_saving(destination, prefix + _SLOT)
        return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        self._check_no_cycle("load_state_dict()")
        slot_loading(self, self.source, state_dict, prefix + _SLOT, missing_keys)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _geometry_repr(self, bias: str, *optional: tuple) -> str:
        """extra_repr as nn.Conv2d's (nn.Conv1d's): the fixed fields, then each (name, value, default) whose value
        differs from its default."""
        fixed = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, transform={self.transform}, bias={bias}"
        )
        return fixed + "".join(f", {name}={value!r}" for name, value, default in optional if value != default)
