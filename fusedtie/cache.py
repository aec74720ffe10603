"""Opt-in reuse of the derived weight f(W) across calls: ``with fusedtie.cached(): ...``.

Without the scope every call of a FusedTiedConv2d (FusedTiedConv1d, FusedTiedConvTranspose2d) computes f(W) again
(one pass over W), which is what keeps the tie exact while W trains. In inference the weights usually
do not change between calls, and that pass is pure overhead on weight-heavy layers; inside
``cached()`` each layer computes f(W) (and g(b)) at its first call and reuses it until the scope ends.

When a cached value is reused, and when it is not:
- Reused only for calls that record no autograd graph (``torch.no_grad()``, ``inference_mode()``,
  or a source whose parameters do not require grad). A call that must differentiate to W computes
  f(W) inside the operator as usual, so training inside the scope is exact and gains nothing.
- Recomputed whenever the source tensor is a different object, sits in different memory, or has a
  different version counter: an optimizer step, any in-place op (also under ``no_grad``),
  ``load_state_dict``, ``.to()``/``.half()``, assigning a new Parameter.
- Dropped when the outermost scope exits, so a scope never sees values from before it began.
- Never used while torch.compile or torch.export traces the layer (the graph keeps the operator).

The one write PyTorch cannot see is an in-place write through ``.data`` (``w.data.normal_()``, as in
the classic ``weights_init``): ``.data`` is a new tensor with its own version counter, so the
parameter's counter does not move, and neither does its memory. Such writes must happen outside the
scope; the scope's contract, like ``torch.nn.utils.parametrize.cached()``'s, is that nothing rewrites
the weights behind autograd's back while it is open. Checking the contents on every call would cost
a pass over W, which is what the cache exists to avoid.

The scope is process-wide (like ``parametrize.cached()``) and re-entrant; it holds one derived
weight per layer used inside it, released at exit.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

_lock = threading.Lock()
# One entry per open scope, innermost last: None for a scope over every layer, else the modules it
# was opened for and all their submodules (weakly: a set of ids would outlive and alias deleted
# layers). A scope is open while this list is not empty.
_scopes: list[Optional["weakref.WeakSet[nn.Module]"]] = []
# layer -> _Entry; weak, so a layer dropped inside a scope takes its cached tensors with it.
_entries: "weakref.WeakKeyDictionary[nn.Module, _Entry]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def cached(*modules: nn.Module) -> Iterator[None]:
    """Reuse each fusedtie layer's f(W) across calls that need no gradient, until the scope exits.

    The layers are FusedTiedConv2d and FusedTiedConv1d (f(W) and g(b)) and FusedTiedConvTranspose2d
    (f(W); its bias is its own parameter and needs no derivation).

    A cached value is used only by calls that record no autograd graph (``torch.no_grad()``,
    ``inference_mode()``, or a frozen source), and is recomputed when the source tensor is replaced,
    moved, converted or changed in place by anything autograd can see (an optimizer step, any
    in-place op even under ``no_grad``, ``load_state_dict``). torch.compile and export traces
    bypass it. Everything is dropped when the outermost scope exits. The scope is process-wide and
    re-entrant. Writes through ``.data`` (``w.data.normal_()``) are invisible to PyTorch's version
    counters: make them outside the scope. The module docstring of ``fusedtie.cache`` gives the
    whole contract.

    Args:
        *modules: with none, every fusedtie layer is cached; ``cached(backbone, head)`` caches only
            the fusedtie layers inside those modules (for example a frozen part of a model that
            also trains).

    Yields:
        Nothing; the cache lives as long as the ``with`` block.

    Raises:
        TypeError: an argument that is not an ``nn.Module``.

    Examples:
        >>> conv = nn.Conv2d(16, 16, 3, padding=1)
        >>> model = nn.Sequential(conv, nn.ReLU(), fusedtie.FusedTiedConv2d(conv, "square"))
        >>> model = model.eval()
        >>> with torch.inference_mode(), fusedtie.cached():
        ...     for batch in torch.randn(4, 2, 16, 8, 8):
        ...         predictions = model(batch)  # f(W) computed at the first call only
    """
    for m in modules:
        if not isinstance(m, nn.Module):
            raise TypeError(f"fusedtie.cached() takes nn.Modules, got {type(m).__name__}")
    layers = None
    if modules:
        layers = weakref.WeakSet(sub for m in modules for sub in m.modules())
    with _lock:
        _scopes.append(layers)
    try:
        yield
    finally:
        with _lock:
            # by identity: two scopes over the same layers compare equal as sets
            del _scopes[max(i for i, scope in enumerate(_scopes) if scope is layers)]
            if not _scopes:
                _entries.clear()


def _in_scope(layer: nn.Module) -> bool:
    for layers in _scopes:
        if layers is None or layer in layers:
            return True
    return False


def is_caching() -> bool:
    """Whether a ``cached()`` scope is open."""
    return bool(_scopes)


class _Stamp:
    """What identifies one state of a tensor as far as PyTorch can tell: object, memory, version."""

    __slots__ = ("ref", "data_ptr", "version", "dtype", "device")

    def __init__(self, t: Tensor) -> None:
        self.ref = weakref.ref(t)
        self.data_ptr = t.data_ptr()
        self.version = t._version
        self.dtype = t.dtype
        self.device = t.device

    def matches(self, t: Tensor) -> bool:
        return (
            self.ref() is t
            and self.data_ptr == t.data_ptr()
            and self.version == t._version
            and self.dtype == t.dtype
            and self.device == t.device
        )


def _stamp(t: Optional[Tensor]) -> Optional[_Stamp]:
    return None if t is None else _Stamp(t)


def _still(stamp: Optional[_Stamp], t: Optional[Tensor]) -> bool:
    """Whether ``t`` is the tensor, in the state, that ``stamp`` recorded (None for None)."""
    return stamp is None if t is None else stamp is not None and stamp.matches(t)


class _Entry:
    __slots__ = ("weight_stamp", "bias_stamp", "weight", "bias")

    def __init__(self, weight_stamp, bias_stamp, weight, bias) -> None:
        self.weight_stamp = weight_stamp
        self.bias_stamp = bias_stamp
        self.weight = weight
        self.bias = bias


def _cacheable(t: Tensor) -> bool:
    # Inference tensors have no version counter, fake/meta tensors no memory to identify them by,
    # and tensor subclasses may not store what they report: none of them are cached.
    return type(t) in (Tensor, nn.Parameter) and not t.is_inference() and t.device.type not in ("meta",)


def lookup(
    layer: nn.Module,
    weight: Tensor,
    bias: Optional[Tensor],
    derive: Callable[[Tensor, Optional[Tensor]], tuple[Tensor, Optional[Tensor]]],
) -> Optional[tuple[Tensor, Optional[Tensor]]]:
    """(f(W), g(b)) for ``layer`` from the open scope, computed by ``derive`` when absent or stale.

    None when the call must not use the cache: no open scope, a call that records a graph, tracing,
    or tensors the cache cannot identify. The caller then takes the ordinary path.
    """
    if not _scopes or torch.compiler.is_compiling() or not _in_scope(layer):
        return None
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    entry = _entries.get(layer)
    if entry is not None and _still(entry.weight_stamp, weight) and _still(entry.bias_stamp, bias):
        return entry.weight, entry.bias  # a stamp matches only tensors that passed _cacheable
    if not _cacheable(weight) or (bias is not None and not _cacheable(bias)):
        return None
    with torch.no_grad():
        derived_weight, derived_bias = derive(weight, bias)
    _entries[layer] = _Entry(_Stamp(weight), _stamp(bias), derived_weight, derived_bias)
    return derived_weight, derived_bias
