"""A clear error for a tie that FSDP2 (``fully_shard``) splits across two parameter groups.

After the source's group runs its forward it reshards (FSDP2's default), so a tied layer in another
group would receive the source weight as a shard (a DTensor) instead of the full tensor. DTensor's
own message ("got mixed torch.Tensor and DTensor") does not say which tie broke; this one names both
modules, by their path in the model where FSDP2's state lets us find it, and says how to fix it.
FSDP2's state is private API, so every lookup falls back to the modules' reprs.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn


def _dtensor_type() -> Optional[type]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def _fsdp_root(module: nn.Module) -> Optional[nn.Module]:
    """The root module of the fully_shard tree that manages ``module``, or None."""
    try:
        states = module._get_fsdp_state()._state_ctx.all_states
        for state in states:
            if getattr(state, "_is_root", False):
                return state._modules[0]
    except Exception:  # private API: any change means we only lose the names
        return None
    return None


def _describe(module: nn.Module, root: Optional[nn.Module]) -> str:
    if root is not None:
        for name, candidate in root.named_modules(remove_duplicate=False):
            if candidate is module:
                return f"{type(module).__name__} '{name}'" if name else f"{type(module).__name__} (the root)"
    return repr(module)


def check_source_not_sharded(tied: nn.Module, source: nn.Module, weight: Tensor, input: Tensor) -> None:
    """Raise if FSDP2 handed the tied layer a shard (``weight``) of its source's weight."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(weight, dtensor) or isinstance(input, dtensor):
        return
    root = _fsdp_root(source)
    raise RuntimeError(
        f"fusedtie: {_describe(tied, root)} is tied to {_describe(source, root)}, "
        "but FSDP2 (fully_shard) put the source in a different group, which resharded its weight after "
        f"its forward: the tied layer got a shard (a DTensor of local shape {list(weight.to_local().shape)}) "
        f"instead of the full weight {list(weight.shape)}. Put the source and the tied layer in one "
        "group (fully_shard their common parent, not the source alone), or shard the source with "
        "reshard_after_forward=False and run it before the tied layer."
    )
