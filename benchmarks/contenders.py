"""The contenders: each one's module built on a case's source layer (nn.Conv2d, nn.Conv1d or
nn.Linear; for a decoder case, on its DecoderTie), the leaves its training step differentiates and
the scope its calls run in."""

from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

import fusedtie
from cases import CONV, CONV1D, DECODER, FORUM_TRANSFORMS, LINEAR, ShapeCase


@dataclass
class Runner:
    """A contender built for one case: the module to call and the leaves a training step needs."""

    module: nn.Module
    params: list[Tensor]
    # Whether `params` are the source's W and b (so their gradients must equal the reference's).
    # The plain floor differentiates with respect to its own f(W), which is not comparable.
    grads_wrt_source: bool = True
    # A context the calls must run in, entered once for the whole case (benchmarks/README.md, "Scopes").
    scope: Optional[Callable[[], ContextManager]] = None
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def open_scope(self) -> None:
        if self.scope is not None:
            self._stack.enter_context(self.scope())

    def close_scope(self) -> None:
        self._stack.close()
        self._stack = contextlib.ExitStack()


@dataclass(frozen=True)
class DecoderTie:
    """What a decoder case's contenders are built on: the encoder conv that owns W, the decoder's
    bias and the one piece of geometry the encoder does not carry (output_padding).

    The bias is the decoder's own parameter (source.in_channels values), one Parameter shared by
    every contender, as the source's bias is in conv cases, so every contender's leaves are the
    same two tensors (source.weight, bias) and their gradients can be compared.
    """

    source: nn.Conv2d
    bias: nn.Parameter
    output_padding: int

    @property
    def leaves(self) -> list[Tensor]:
        return [self.source.weight, self.bias]


def make_decoder_tie(shape: ShapeCase, source: nn.Conv2d) -> DecoderTie:
    # nn.ConvTranspose2d's bias initialisation: uniform in +-1/sqrt(fan_in), fan_in = its
    # weight.size(1) * kH * kW = (source.in_channels / groups) * kH * kW.
    w = source.weight
    fan_in = w.shape[1] * w.shape[2] * w.shape[3]
    bias = nn.Parameter(torch.empty(source.in_channels, device=w.device, dtype=w.dtype))
    with torch.no_grad():
        bias.uniform_(-(fan_in**-0.5), fan_in**-0.5)
    return DecoderTie(source, bias, shape.output_padding)


@dataclass(frozen=True)
class Contender:
    name: str
    build: Callable[[nn.Module, str, bool], Runner]  # (source, transform, trains); LAYER_OPS's kinds
    # The same contender for a decoder case, (tie, transform, trains); None: not run on decoders.
    build_decoder: Optional[Callable[[DecoderTie, str, bool], Runner]] = None
    modes: tuple[str, ...] = ("inference", "train")
    # Why the contender cannot run in this process (None: it can).
    unavailable: Callable[[], Optional[str]] = lambda: None

    def builder(self, kind: str) -> Optional[Callable[..., Runner]]:
        return self.build_decoder if kind == DECODER else self.build


@dataclass(frozen=True)
class LayerOps:
    """How a kind of layer computes, for every kind whose contenders are built on its source alone
    (all but the decoder): the functional op with the source's geometry and fusedtie's tied layer."""

    # (source, x, weight, bias) -> the source's own op on x with another weight and bias
    functional: Callable[[nn.Module, Tensor, Tensor, Optional[Tensor]], Tensor]
    tied: type[nn.Module]  # fusedtie's layer: tied(source, transform, bias="same")
    # (source, x) -> the tied_conv2d call fusedtie makes of it: (x, W, stride, padding, dilation,
    # groups) as 4-d views and pairs, for fusedtie.cpu_conv_algorithm_for
    conv2d_view: Callable[[nn.Module, Tensor], tuple]


def _conv2d_view(s: nn.Conv2d, x: Tensor) -> tuple:
    return x, s.weight, s.stride, s.padding, s.dilation, s.groups


def _conv1d_view(s: nn.Conv1d, x: Tensor) -> tuple:  # the H = 1 view tied_conv1d runs on
    return x.unsqueeze(-2), s.weight.unsqueeze(-2), (1, *s.stride), (0, *s.padding), (1, *s.dilation), s.groups


def _linear_view(s: nn.Linear, x: Tensor) -> tuple:  # a 1x1 convolution on (N, C, 1, 1)
    return x[:, :, None, None], s.weight[:, :, None, None], 1, 0, 1, 1


# Keyed by the source's class (the one fact per kind that the builders below need).
LAYER_OPS: dict[type[nn.Module], LayerOps] = {
    nn.Conv2d: LayerOps(
        lambda s, x, w, b: F.conv2d(x, w, b, s.stride, s.padding, s.dilation, s.groups),
        fusedtie.FusedTiedConv2d,
        _conv2d_view,
    ),
    nn.Conv1d: LayerOps(
        lambda s, x, w, b: F.conv1d(x, w, b, s.stride, s.padding, s.dilation, s.groups),
        fusedtie.FusedTiedConv1d,
        _conv1d_view,
    ),
    nn.Linear: LayerOps(lambda s, x, w, b: F.linear(x, w, b), fusedtie.FusedTiedLinear, _linear_view),
}


class Forum(nn.Module):
    """The forum recipe, f(W) on every call (F.conv2d(x, f(source.weight), source.bias, ...), or
    F.conv1d's, F.linear's), in a module so its call overhead matches the other contenders'."""

    def __init__(self, source: nn.Module, transform: str) -> None:
        super().__init__()
        self.source = source
        self.f = FORUM_TRANSFORMS[transform]
        self.functional = LAYER_OPS[type(source)].functional

    def forward(self, x: Tensor) -> Tensor:
        s = self.source
        return self.functional(s, x, self.f(s.weight), s.bias)


class TransformParametrization(nn.Module):
    """f as a torch.nn.utils.parametrize parametrization (no right_inverse: f is not invertible)."""

    def __init__(self, transform: str) -> None:
        super().__init__()
        self.f = FORUM_TRANSFORMS[transform]

    def forward(self, w: Tensor) -> Tensor:
        return self.f(w)


def _layer_like(source: nn.Module) -> nn.Module:
    """A layer of the source's class and geometry with parameters of its own (a copy, to overwrite)."""
    return copy.deepcopy(source)


def build_plain(source: nn.Module, transform: str, trains: bool) -> Runner:
    layer = _layer_like(source)
    with torch.no_grad():
        layer.weight.copy_(FORUM_TRANSFORMS[transform](source.weight))
        layer.bias.copy_(source.bias)  # bias="same": g is the identity
    return Runner(layer, [layer.weight, layer.bias], grads_wrt_source=False)


def _tied(source: nn.Module, transform: str) -> nn.Module:
    return LAYER_OPS[type(source)].tied(source, transform, bias="same")


def build_fusedtie(source: nn.Module, transform: str, trains: bool) -> Runner:
    return Runner(_tied(source, transform), [source.weight, source.bias])


def build_fusedtie_cached(source: nn.Module, transform: str, trains: bool) -> Runner:
    # Its own layer (not the `fusedtie` contender's), and a scope over that layer alone: the other
    # tied layer keeps computing f(W) on every call (check_cache_scope makes sure of it).
    layer = _tied(source, transform)
    return Runner(layer, [source.weight, source.bias], scope=lambda: fusedtie.cached(layer))


def fusedtie_cached_unavailable() -> Optional[str]:
    cached = getattr(fusedtie, "cached", None)
    if not callable(cached):
        return "fusedtie.cached does not exist in this build of fusedtie"
    try:
        inspect.signature(cached).bind(nn.Identity())
    except TypeError:
        return "fusedtie.cached takes no modules in this build (its scope would be process-wide)"
    if not callable(getattr(getattr(fusedtie, "cache", None), "_in_scope", None)):
        return "fusedtie.cache._in_scope, which the scope check needs, does not exist in this build"
    return None


def build_forum(source: nn.Module, transform: str, trains: bool) -> Runner:
    return Runner(Forum(source, transform), [source.weight, source.bias])


def build_parametrize(source: nn.Module, transform: str, trains: bool) -> Runner:
    layer = _layer_like(source)
    parametrize.register_parametrization(layer, "weight", TransformParametrization(transform))
    # The tie: the parametrization's input and the bias become the source's own Parameters.
    layer.parametrizations.weight.original = source.weight
    layer.bias = source.bias
    # parametrize.cached() keeps f(W) only inside the scope; in training it cannot be used (the
    # cached f(W) would carry one autograd graph across steps).
    scope = None if trains else parametrize.cached
    return Runner(layer, [source.weight, source.bias], scope=scope)


def _compile_mode(source: nn.Module) -> str:
    return "max-autotune" if source.weight.device.type == "cuda" else "default"


def build_compile(source: nn.Module, transform: str, trains: bool) -> Runner:
    module = torch.compile(Forum(source, transform), mode=_compile_mode(source))
    return Runner(module, [source.weight, source.bias])


# --- the same contenders for a decoder case: conv_transpose2d(h, f(W_source), b) ---------------------


class ForumConvTranspose2d(nn.Module):
    """The forum recipe for a tied decoder: F.conv_transpose2d(h, f(encoder.weight), b, ...).

    The encoder is held in a list, out of this module's parameters and state_dict (the recipe's
    way of reaching another layer's weight); the bias is the decoder's own parameter.
    """

    def __init__(self, tie: DecoderTie, transform: str) -> None:
        super().__init__()
        self.encoder = [tie.source]  # a plain list: nn.Module does not register what it holds
        self.bias = tie.bias
        self.output_padding = tie.output_padding
        self.f = FORUM_TRANSFORMS[transform]

    def forward(self, h: Tensor) -> Tensor:
        s = self.encoder[0]
        return F.conv_transpose2d(
            h, self.f(s.weight), self.bias, s.stride, s.padding, self.output_padding, s.groups, s.dilation
        )


def _conv_transpose_like(tie: DecoderTie) -> nn.ConvTranspose2d:
    s = tie.source
    return nn.ConvTranspose2d(
        s.out_channels,
        s.in_channels,
        s.kernel_size,
        stride=s.stride,
        padding=s.padding,
        output_padding=tie.output_padding,
        groups=s.groups,
        dilation=s.dilation,
        device=s.weight.device,
        dtype=s.weight.dtype,
    )


def build_plain_decoder(tie: DecoderTie, transform: str, trains: bool) -> Runner:
    # Untied: an nn.ConvTranspose2d owning f(W) (precomputed once) and a copy of the bias.
    conv = _conv_transpose_like(tie)
    with torch.no_grad():
        conv.weight.copy_(FORUM_TRANSFORMS[transform](tie.source.weight))
        conv.bias.copy_(tie.bias)
    return Runner(conv, [conv.weight, conv.bias], grads_wrt_source=False)


def _tied_decoder(tie: DecoderTie, transform: str) -> nn.Module:
    layer = fusedtie.FusedTiedConvTranspose2d(tie.source, transform, output_padding=tie.output_padding)
    layer.bias = tie.bias  # the case's shared decoder bias in place of the one it made
    return layer


def build_fusedtie_decoder(tie: DecoderTie, transform: str, trains: bool) -> Runner:
    return Runner(_tied_decoder(tie, transform), tie.leaves)


def build_fusedtie_cached_decoder(tie: DecoderTie, transform: str, trains: bool) -> Runner:
    layer = _tied_decoder(tie, transform)  # its own layer, as for conv cases
    return Runner(layer, tie.leaves, scope=lambda: fusedtie.cached(layer))


def build_forum_decoder(tie: DecoderTie, transform: str, trains: bool) -> Runner:
    return Runner(ForumConvTranspose2d(tie, transform), tie.leaves)


def build_parametrize_decoder(tie: DecoderTie, transform: str, trains: bool) -> Runner:
    # An nn.ConvTranspose2d's weight has the encoder's shape (in, out/groups, kH, kW), so the
    # parametrization's original can be the encoder's own weight, as in build_parametrize.
    conv = _conv_transpose_like(tie)
    parametrize.register_parametrization(conv, "weight", TransformParametrization(transform))
    conv.parametrizations.weight.original = tie.source.weight
    conv.bias = tie.bias
    return Runner(conv, tie.leaves, scope=None if trains else parametrize.cached)


def build_compile_decoder(tie: DecoderTie, transform: str, trains: bool) -> Runner:
    module = torch.compile(ForumConvTranspose2d(tie, transform), mode=_compile_mode(tie.source))
    return Runner(module, tie.leaves)


# The first entry is the baseline of the ratio column. The guard's references are guard.py's.
CACHED = "fusedtie+cache"
CONTENDERS = [
    Contender("plain", build_plain, build_plain_decoder),
    Contender("fusedtie", build_fusedtie, build_fusedtie_decoder),
    Contender(
        CACHED,
        build_fusedtie_cached,
        build_fusedtie_cached_decoder,
        modes=("inference",),
        unavailable=fusedtie_cached_unavailable,
    ),
    Contender("forum", build_forum, build_forum_decoder),
    Contender("parametrize", build_parametrize, build_parametrize_decoder),
    Contender("compile", build_compile, build_compile_decoder),
]
BASELINE = "plain"
# What plain is, per kind of case: the same layer with f(W) computed once and held as the module's
# own weight (no tie at all), for the ratio table's header and the JSON settings.
BASELINE_BY_KIND = {
    CONV: "nn.Conv2d holding f(W), precomputed once",
    DECODER: "nn.ConvTranspose2d holding f(W) of the encoder's W, precomputed once (an untied decoder "
    "with its own weight)",
    LINEAR: "nn.Linear holding f(W), precomputed once",
    CONV1D: "nn.Conv1d holding f(W), precomputed once",
}
COMPILED = "compile"
CONTENDER_NAMES = [c.name for c in CONTENDERS]
# Every fusedtie layer a contender may hold (for the cache-scope check).
TIED_LAYERS = (*(ops.tied for ops in LAYER_OPS.values()), fusedtie.FusedTiedConvTranspose2d)
