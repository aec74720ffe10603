"""The correctness guard: every contender's output (and gradients, when training) against a
reference computed without any contender, and the check that fusedtie+cache's scope covers its own
layer alone. Either failing aborts the run."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fusedtie
from cases import CONV, CONV1D, DECODER, FORUM_TRANSFORMS, LINEAR, Mode
from contenders import CACHED, LAYER_OPS, TIED_LAYERS, DecoderTie, Forum, Runner

# (rtol, atol relative to the reference's largest magnitude: sums over many terms scale with it).
# bfloat16 (CUDA only, untested on a GPU): about 2 bfloat16 ulps.
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 1e-2)}


class GuardError(RuntimeError):
    pass


def _check_close(what: str, got: Tensor, ref: Tensor) -> None:
    """got (the case's dtype) against ref (that dtype, or a float64 oracle), at got's tolerance."""
    rtol, atol_rel = TOLERANCES[got.dtype]
    atol = atol_rel * max(1.0, ref.abs().max().item())
    got = got.to(ref.dtype)
    if got.shape != ref.shape or not torch.allclose(got, ref, rtol=rtol, atol=atol):
        err = (got - ref).abs().max().item() if got.shape == ref.shape else float("nan")
        raise GuardError(
            f"{what} does not match the reference (shape {list(got.shape)} vs {list(ref.shape)}, "
            f"max abs error {err:.3g}, rtol={rtol:g}, atol={atol:.3g})"
        )


Reference = tuple[Tensor, tuple[Tensor, ...]]  # (output, gradients of its sum w.r.t. the leaves)


def conv_reference(source: nn.Conv2d, transform: str, x: Tensor) -> Reference:
    """A conv case's reference: a forum module built here, in the case's dtype."""
    y = Forum(source, transform).train()(x)
    return y.detach(), torch.autograd.grad(y.sum(), [source.weight, source.bias])


def float64_reference(source: nn.Module, transform: str, x: Tensor) -> Reference:
    """A linear or conv1d case's reference: F.linear / F.conv1d (LAYER_OPS) on f(W) in float64, on
    copies of the source's W and b, f written in torch ops (FORUM_TRANSFORMS), the geometry read from
    the source, never from a contender's module."""
    w, b = (t.detach().double().requires_grad_(True) for t in (source.weight, source.bias))
    y = LAYER_OPS[type(source)].functional(source, x.detach().double(), FORUM_TRANSFORMS[transform](w), b)
    return y.detach(), torch.autograd.grad(y.sum(), [w, b])


def decoder_reference(tie: DecoderTie, transform: str, h: Tensor) -> Reference:
    """A decoder case's reference: F.conv_transpose2d(h, f(W), b) in float64 on copies of the
    leaves, f written in torch ops (FORUM_TRANSFORMS), geometry read from the encoder and the tie,
    never from a contender's module."""
    s = tie.source
    w, b = (t.detach().double().requires_grad_(True) for t in tie.leaves)
    y = F.conv_transpose2d(
        h.detach().double(),
        FORUM_TRANSFORMS[transform](w),
        b,
        s.stride,
        s.padding,
        tie.output_padding,
        s.groups,
        s.dilation,
    )
    return y.detach(), torch.autograd.grad(y.sum(), [w, b])


# Per kind: the reference (of the case's source, or DecoderTie, its transform and its input) and
# what it is, for the JSON's settings.
REFERENCES: dict[str, tuple[Callable[..., Reference], str]] = {
    CONV: (conv_reference, "a fresh forum module, F.conv2d(x, f(W), b), in the case's dtype"),
    DECODER: (decoder_reference, "F.conv_transpose2d(h, f(W), b) in float64 on copies of the leaves"),
    LINEAR: (float64_reference, "F.linear(x, f(W), b) in float64 on copies of the leaves"),
    CONV1D: (float64_reference, "F.conv1d(x, f(W), b) in float64 on copies of the leaves"),
}
GUARD_REFERENCE_BY_KIND = {kind: what for kind, (_, what) in REFERENCES.items()}


def guard(runners: dict[str, Runner], reference: Reference, x: Tensor, mode: Mode) -> None:
    """Every contender's output, and when training the gradients with respect to the leaves it
    shares with the case (the source's W and the bias), must equal the reference's.

    The reference is computed by the caller without any contender (REFERENCES), so the check does
    not depend on which contenders were selected. Each contender runs as the mode runs it (under
    no_grad for inference, inside its scope), since that is the path being timed and an operator may
    take another path with autograd off.
    """
    ref_y, ref_grads = reference
    for name, runner in runners.items():
        mode.prepare(runner)
        with torch.set_grad_enabled(mode.trains):
            y = runner.module(x)
        _check_close(f"{name} output", y.detach(), ref_y.detach())
        if mode.trains and runner.grads_wrt_source:
            grads = torch.autograd.grad(y.sum(), runner.params)
            for label, g, rg in zip(("d/dW", "d/db"), grads, ref_grads):
                _check_close(f"{name} gradient {label}", g, rg)


class ScopeError(RuntimeError):
    pass


def check_cache_scope(runners: dict[str, Runner]) -> None:
    """With the scopes open: fusedtie+cache's tied layer, and no other, must be in its scope.

    A cached `fusedtie` contender would be timed as something it is not (benchmarks/README.md, "Scopes").
    """
    for name, runner in runners.items():
        for layer in runner.module.modules():
            if not isinstance(layer, TIED_LAYERS):
                continue
            expected = name == CACHED
            if fusedtie.cache._in_scope(layer) != expected:
                raise ScopeError(
                    f"{name}'s {type(layer).__name__} is {'not' if expected else 'also'} cached while "
                    f"{CACHED}'s scope, fusedtie.cached(its own layer), is open "
                    f"(fusedtie.cache._in_scope returned {not expected}), so {name} would not be "
                    "timed as what it claims to be"
                )
