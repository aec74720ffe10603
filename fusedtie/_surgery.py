"""``fusedtie.tie_(model, ties)``: model surgery. Each named target layer of a model is replaced, in
place, by the tied layer of its kind reading a named source layer's weight; every tie is checked and
built before the first is swapped in (all or nothing). ``fusedtie.bake`` (fusedtie/bake.py) is the
way back."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import NamedTuple, Union

import torch
from torch import nn

from . import nn as tied_nn
from ._op_args import TransformLike
from ._state_dict import remove_source_hooks
from ._tied_layer import _TiedLayer
from .bake import _CALL_HOOK_ATTRIBUTES


class _Kind(NamedTuple):
    """One (target, source) pair tie_ knows, and the layer that ties it."""

    target: type  # the target's class (isinstance)
    source: type  # the source's class (isinstance)
    layer: str  # the tied layer's name in fusedtie.nn, resolved on use (a layer may be absent)
    build: str  # how its constructor takes the target's geometry: "conv", "conv_transpose", "linear"


# Looked up in order; the first row whose target and source classes match wins. A new layer is one
# row here (its "build" names the constructor keywords it shares with an existing one).
_KINDS = (
    _Kind(nn.Conv1d, nn.Conv1d, "FusedTiedConv1d", "conv"),
    _Kind(nn.Conv2d, nn.Conv2d, "FusedTiedConv2d", "conv"),
    _Kind(nn.Conv3d, nn.Conv3d, "FusedTiedConv3d", "conv"),
    _Kind(nn.ConvTranspose2d, nn.Conv2d, "FusedTiedConvTranspose2d", "conv_transpose"),
    _Kind(nn.Linear, nn.Linear, "FusedTiedLinear", "linear"),
)

_BIAS_MODES = ("same", "transform", None)

Option = Union[TransformLike, Mapping]


def _kind_name(module_or_class) -> str:
    cls = module_or_class if isinstance(module_or_class, type) else type(module_or_class)
    return f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else cls.__name__


class _Tie(NamedTuple):
    target_name: str
    source_name: str
    target: nn.Module
    source: nn.Module


def tie_(
    model: nn.Module,
    ties: Mapping[str, str],
    *,
    transform: Option = "identity",
    bias: Union[str, None, bool, Mapping] = "same",
    transpose: Union[None, bool, Mapping] = None,
) -> nn.Module:
    r"""Replaces layers of ``model`` in place by layers tied to other layers of it (model surgery).

    ``ties`` maps target names to source names, as ``model.named_modules()`` spells them
    (``{"decoder.0": "encoder.2"}``). Each target is replaced by the tied layer its pair calls for,
    reading f(source.weight):

    - ``nn.Conv1d`` from an ``nn.Conv1d``: ``FusedTiedConv1d``;
    - ``nn.Conv2d`` from an ``nn.Conv2d``: ``FusedTiedConv2d``;
    - ``nn.Conv3d`` from an ``nn.Conv3d``: ``FusedTiedConv3d`` (where fusedtie has it);
    - ``nn.ConvTranspose2d`` from an ``nn.Conv2d``: ``FusedTiedConvTranspose2d``, the tied decoder;
    - ``nn.Linear`` from an ``nn.Linear``: ``FusedTiedLinear``, with ``transpose=False`` when the
      target's weight has the source's shape and ``transpose=True`` (the decoder ``x f(W) + b``)
      when it has the transposed shape; a square weight gives ``False`` unless ``transpose`` asks.

    Subclasses count as their base class (their own ``forward`` goes with the target). The target's
    weight must have exactly the shape the tied layer reads from the source, and the same dtype and
    device. The tied layer takes the target's geometry (stride, padding, dilation, groups,
    padding_mode, output_padding; in/out channels or features, kernel size), so the model computes
    the same shapes as before, and the target's training flag and forward/backward hooks.

    The bias keeps the target's presence: a target without a bias gives a tied layer without one.
    For a target with a bias, ``bias`` says what it becomes:

    - ``"same"`` (the default): a forward tie (conv, or linear with ``transpose=False``) uses the
      source's bias as it is. Such a layer owns no parameters, so the target's own bias values cannot
      be kept: they go with the target, and a source without a bias is an error (give the source
      one, or pass ``None``). A decoder (``FusedTiedConvTranspose2d``, or ``FusedTiedLinear`` with
      ``transpose=True``) keeps the target's own bias parameter as its bias: the same tensor, so its
      values and an optimizer's reference to it survive.
    - ``"transform"``: f(source.bias), for forward ties only (a decoder's bias is its own).
    - ``None`` (or ``False``): no bias.

    ``transform``, ``bias`` and ``transpose`` each take one value for every tie, or a dict from
    target names to values; a target missing from the dict gets the default (``"identity"``,
    ``"same"``, ``None``: by shape), a key that is not a target is an error. ``transpose`` applies
    to ``nn.Linear`` targets (a dict entry for another target is an error). The default transform
    is ``"identity"`` (weight sharing), not ``FusedTiedConv2d``'s ``"square"``.

    Checks first, changes after: every name must exist, no target may be the model itself, its own
    source, another tie's source (ties do not chain), a fusedtie layer, or the source of a fusedtie
    layer already in the model; no source may be a fusedtie layer; each pair must be in the table,
    with matching weight shape, dtype and device; and every tied layer is built. Only when all of
    that passes are the targets swapped in, so on any error the model is unchanged. A target
    registered under several names (in two containers) is replaced under every one of them by one
    tied layer; naming it twice in ``ties`` is an error. Replacing works in ``nn.Sequential``,
    ``nn.ModuleList``, ``nn.ModuleDict`` and any nested module (the parent's registered child is
    swapped); a reference held outside the module tree (a plain attribute, a list) still sees the
    old layer. Build optimizers after ``tie_``: the targets' weights leave the model.

    Args:
        model: the module to change in place.
        ties: target name -> source name.
        transform: f, one for all ties or a dict per target name.
        bias: ``"same"``, ``"transform"`` or ``None``, as above; one value or a dict per target.
        transpose: for ``nn.Linear`` targets: ``None`` (by shape), ``True`` or ``False``; one value
            or a dict per target.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` not an ``nn.Module``, ``ties`` not a mapping of names, or a pair of
            kinds the table does not have (the message lists the pairs it has), or a fusedtie layer
            as a target or source.
        ValueError: a name that is not in the model (the message names the side of ``ties`` and
            close matches), a chain, a target that is its own source or named twice, a weight
            shape, dtype or device mismatch (the message gives both shapes), a bias that cannot be
            kept, a bad option or option key, or anything the tied layer's constructor refuses.

    Examples:
        >>> encoder = nn.Sequential(nn.Linear(64, 16), nn.ReLU())
        >>> decoder = nn.Sequential(nn.Linear(16, 64))
        >>> model = nn.Sequential(encoder, decoder)
        >>> fusedtie.tie_(model, {"1.0": "0.0"}) is model  # the decoder reads encoder.weight transposed
        True
        >>> model[1][0]
        FusedTiedLinear(
          in_features=16, out_features=64, transform=identity, bias=True, transpose=True
          (source): Linear(in_features=64, out_features=16, bias=True)
        )
        >>> list(model.state_dict())
        ['0.0.weight', '0.0.bias', '1.0.bias']
        >>> plain = fusedtie.bake(model)  # the way back: plain nn.Linear layers holding f(W)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedtie.tie_ takes an nn.Module, got {type(model).__name__}")
    if not isinstance(ties, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ties.items()):
        raise TypeError("ties must map target names to source names (strings), as model.named_modules() gives them")
    options = {
        "transform": _per_target("transform", transform, ties),
        "bias": _per_target("bias", bias, ties),
        "transpose": _per_target("transpose", transpose, ties),
    }

    resolved = _resolve(model, ties)
    _check_graph(model, resolved)
    built = []  # (tie, tied layer)
    hooked_before = {id(t.source): getattr(t.source, "_fusedtie_hooks", False) for t in resolved}
    try:
        for tie in resolved:
            opts = {name: option.get(tie.target_name, default) for name, (option, default) in options.items()}
            built.append((tie, _build(tie, **opts)))
    except BaseException:
        # A layer's construction installs state_dict hooks on its source; the model is left as it was.
        for tie, _ in built:
            if not hooked_before[id(tie.source)]:
                remove_source_hooks(tie.source)
        raise

    for tie, layer in built:
        _take_over(tie.target, layer)
        for parent in model.modules():
            for name, child in list(parent._modules.items()):
                if child is tie.target:
                    parent._modules[name] = layer
    return model


_DEFAULTS = {"transform": "identity", "bias": "same", "transpose": None}


def _per_target(name: str, value, ties: Mapping[str, str]) -> tuple[dict, object]:
    """(the values per target name given, the value for the others)."""
    if isinstance(value, Mapping):
        stray = [key for key in value if key not in ties]
        if stray:
            raise ValueError(
                f"{name}= names {', '.join(map(repr, stray))}, which "
                f"{'is not a target' if len(stray) == 1 else 'are not targets'} of these ties "
                f"(targets: {', '.join(map(repr, ties))})"
            )
        per_target, default = dict(value), _DEFAULTS[name]
    else:
        per_target, default = {}, value
    for key, v in [*per_target.items(), (None, default)]:
        where = f" for {key!r}" if key is not None else ""
        if name == "bias" and v not in (*_BIAS_MODES, False):
            raise ValueError(f"bias{where} must be 'same', 'transform' or None, got {v!r}")
        if name == "transpose" and v not in (None, True, False):
            raise ValueError(f"transpose{where} must be None (by shape), True or False, got {v!r}")
    return per_target, default


def _lookup(model: nn.Module, name: str, side: str, tie: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        pass
    names = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    if close:
        hint = f"; close matches: {', '.join(map(repr, close))}"
    else:
        layers = [n for n, m in model.named_modules() if n and isinstance(m, tuple(k.target for k in _KINDS))]
        shown = ", ".join(map(repr, layers[:8])) + (", ..." if len(layers) > 8 else "")
        hint = f"; its conv and linear layers: {shown}" if layers else ""
    raise ValueError(f"the model has no module {name!r} (the {side} of the tie {tie}){hint}")


def _resolve(model: nn.Module, ties: Mapping[str, str]) -> list[_Tie]:
    """The named modules, every name first (so a misspelling is reported before anything else)."""
    resolved = []
    for target_name, source_name in ties.items():
        tie = f"{target_name!r} -> {source_name!r}"
        target = _lookup(model, target_name, "target", tie)
        source = _lookup(model, source_name, "source", tie)
        resolved.append(_Tie(target_name, source_name, target, source))
    return resolved


def _check_graph(model: nn.Module, resolved: list[_Tie]) -> None:
    """Every tie reads a source that stays in the model as it is, and replaces a layer of its own."""
    targets = {}  # id(target) -> its name in ties
    for tie in resolved:
        first = targets.setdefault(id(tie.target), tie.target_name)
        if first != tie.target_name:
            raise ValueError(
                f"{first!r} and {tie.target_name!r} are one module registered under two names; name it once "
                f"(tie_ replaces it under every name it has)"
            )
    existing_sources = {}  # id(source of a fusedtie layer in the model) -> that layer's name
    for name, module in model.named_modules():
        if isinstance(module, _TiedLayer):
            existing_sources.setdefault(id(module.source), name)
    for tie in resolved:
        prefix = f"cannot tie {tie.target_name!r} to {tie.source_name!r}"
        if tie.target_name == "":
            raise ValueError(f"{prefix}: the target is the model itself, which tie_ cannot replace in place")
        if tie.target is tie.source:
            raise ValueError(f"{prefix}: the target is its own source")
        for role, module in (("target", tie.target), ("source", tie.source)):
            if isinstance(module, _TiedLayer):
                what = (
                    "is already tied (fusedtie.bake unties a model)"
                    if role == "target"
                    else "does not own its weight; tie to its source instead (ties do not chain)"
                )
                raise TypeError(f"{prefix}: the {role} is a {type(module).__name__}, which {what}")
        if id(tie.source) in targets:
            raise ValueError(
                f"{prefix}: the source is itself the target of the tie {targets[id(tie.source)]!r}, and ties do "
                f"not chain; tie both to the layer that owns the weight"
            )
        if id(tie.target) in existing_sources:
            raise ValueError(
                f"{prefix}: the target is the source of the fusedtie layer {existing_sources[id(tie.target)]!r}, "
                f"which would go on reading it after it left the model"
            )


def _kind(tie: _Tie, prefix: str) -> _Kind:
    for kind in _KINDS:
        if isinstance(tie.target, kind.target) and isinstance(tie.source, kind.source):
            layer = getattr(tied_nn, kind.layer, None)
            if layer is None:
                raise TypeError(
                    f"{prefix}: tying an {_kind_name(kind.target)} needs fusedtie.nn.{kind.layer}, which this "
                    f"version of fusedtie does not have"
                )
            return kind
    pairs = ", ".join(
        f"{_kind_name(k.target)} to {_kind_name(k.source)}" for k in _KINDS if getattr(tied_nn, k.layer, None)
    )
    raise TypeError(
        f"{prefix}: no tied layer replaces an {_kind_name(tie.target)} with the weight of an "
        f"{_kind_name(tie.source)}; tie_ ties {pairs}"
    )


def _weight(module: nn.Module, role: str, prefix: str):
    weight = module.weight
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"{prefix}: the {role} is a lazy {_kind_name(module)} whose weight is not initialised yet; run one "
            "forward pass through the model before tying"
        )
    return weight


def _build(tie: _Tie, transform, bias, transpose) -> nn.Module:
    """The tied layer that replaces ``tie.target``, checked against it."""
    prefix = f"cannot tie {tie.target_name!r} to {tie.source_name!r}"
    kind = _kind(tie, prefix)
    target, source = tie.target, tie.source
    target_weight, source_weight = _weight(target, "target", prefix), _weight(source, "source", prefix)
    if transpose is not None and kind.build != "linear":
        raise ValueError(f"{prefix}: transpose= applies to nn.Linear targets, not to an {_kind_name(target)}")

    expected = list(source_weight.shape)
    got = list(target_weight.shape)
    mismatch = (
        f"{prefix}: target weight {got} ({_kind_name(target)}) does not match source weight {expected} "
        f"({_kind_name(source)})"
    )
    if kind.build == "linear":
        transposed = expected[::-1]
        if transpose is None:
            if got not in (expected, transposed):
                raise ValueError(f"{mismatch} nor its transpose {transposed}")
            transpose = got != expected
        elif got != (transposed if transpose else expected):
            want = f"the transposed source weight {transposed}" if transpose else f"the source weight {expected}"
            raise ValueError(f"{prefix}: with transpose={transpose}, the target weight {got} must be {want}")
    elif got != expected:
        raise ValueError(mismatch)
    for what in ("dtype", "device"):
        mine, theirs = getattr(target_weight, what), getattr(source_weight, what)
        if mine != theirs:
            raise ValueError(f"{prefix}: the target weight's {what} is {mine}, the source weight's {theirs}")

    decoder = kind.build == "conv_transpose" or (kind.build == "linear" and transpose)
    target_bias = target.bias
    if bias is False:
        bias = None
    if target_bias is None:
        bias = None  # the tied layer has a bias where the target had one
    elif decoder and bias == "transform":
        raise ValueError(
            f"{prefix}: bias='transform' derives a bias from the source's, but the tied layer is a decoder "
            "with a bias of its own (the target's, with bias='same'); use 'same' or None"
        )
    elif not decoder and bias is not None and source.bias is None:
        raise ValueError(
            f"{prefix}: the target has a bias and its source has none, and the tied {kind.layer} owns no "
            f"parameters that could keep the target's; give the source a bias, or drop this one with "
            f"bias={{{tie.target_name!r}: None}}"
        )

    layer_class = getattr(tied_nn, kind.layer)
    try:
        if kind.build == "conv":
            layer = layer_class(
                source,
                transform,
                bias,
                stride=target.stride,
                padding=target.padding,
                dilation=target.dilation,
                groups=target.groups,
                padding_mode=target.padding_mode,
                in_channels=target.in_channels,
                out_channels=target.out_channels,
                kernel_size=target.kernel_size,
            )
        elif kind.build == "conv_transpose":
            layer = layer_class(
                source,
                transform,
                bias is not None,
                stride=target.stride,
                padding=target.padding,
                output_padding=target.output_padding,
                dilation=target.dilation,
                groups=target.groups,
                padding_mode=target.padding_mode,
            )
        else:
            layer = layer_class(
                source,
                transform,
                (bias is not None) if transpose else bias,
                transpose=transpose,
                in_features=target.in_features,
                out_features=target.out_features,
            )
    except (TypeError, ValueError) as error:
        raise type(error)(f"{prefix}: {error}") from error
    if decoder and bias is not None:
        _keep_bias(layer, target)
    return layer


def _keep_bias(layer: nn.Module, target: nn.Module) -> None:
    """The decoder's own bias becomes the target's: its very parameter where it is one."""
    own = target._parameters.get("bias")
    if isinstance(own, nn.Parameter):
        layer.bias = own
    else:  # computed (a parametrization): its values
        with torch.no_grad():
            layer.bias.copy_(target.bias)


def _take_over(target: nn.Module, layer: nn.Module) -> None:
    """What the tied layer inherits from the target besides its geometry: the training flag and
    the hooks around its call (as fusedtie.bake moves them the other way)."""
    layer.training = target.training
    for name in _CALL_HOOK_ATTRIBUTES:
        hooks = target.__dict__.get(name)
        if hooks:
            layer.__dict__[name] = hooks
