"""state_dict() and load_state_dict() across a module tree that holds ties.

A tie is two paths to one module (parent.conv_1 and parent.conv_2.source). state_dict() keeps the
source's entries under its own path, and under the tied layer's "source." path only when no other
path to the source exists in that state_dict. load_state_dict() accepts either. The hooks here are
installed on each source (install_source_hooks) and on each tied layer (derived_loaded); the tied
layer's own state_dict / _load_from_state_dict (fusedtie/_tied_layer.py) call slot_saving and
slot_loading, which consult the same per-call books.

PyTorch's public hook API registers every hook here (register_state_dict_post_hook,
register_load_state_dict_pre_hook, register_load_state_dict_post_hook). Only removal
(remove_source_hooks, for bake) reads nn.Module's private hook tables (_state_dict_hooks,
_load_state_dict_pre_hooks), because the one public way to remove a hook is the RemovableHandle
its registration returned, and the modules bake cleans hold no such handle: bake works on a deep
copy, and models saved whole (torch.save) by any version so far carry the hooks without handles.
Keeping handles on each source from now on would add them to every pickle of a model and still
leave those checkpoints to the scan, so the hooks are found by identity instead. The tied layer
overrides state_dict and _load_from_state_dict instead of registering hooks of its own for the
reasons given there: a state_dict pre-hook is not given the destination (which names the call's
book), and a per-instance load pre-hook would be missing from layers saved whole by earlier
versions.
"""

from __future__ import annotations

import threading
import weakref
from typing import Optional

import torch
from torch import nn


class SaveBook:
    """Per state_dict() call (one destination): where each tied source has been written."""

    def __init__(self):
        self.slot_prefixes: set[str] = set()  # every tied layer's "source." prefix in this call
        self.canonical: dict[int, str] = {}  # source id -> its first path of its own
        self.kept_slot: dict[int, str] = {}  # source id -> the one slot kept while no own path is seen


_save_books: dict[int, tuple[weakref.ref, SaveBook]] = {}


def save_book(destination) -> Optional[SaveBook]:
    key = id(destination)
    entry = _save_books.get(key)
    if entry is not None and entry[0]() is destination:
        return entry[1]
    try:
        ref = weakref.ref(destination, lambda _, key=key: _save_books.pop(key, None))
    except TypeError:  # a destination without weak references (plain dict): no deduplication
        return None
    book = SaveBook()
    _save_books[key] = (ref, book)
    return book


def _drop_prefix(destination, prefix: str) -> None:
    for key in [k for k in destination if k.startswith(prefix)]:
        del destination[key]
    metadata = getattr(destination, "_metadata", None)
    if metadata is not None:
        for key in [k for k in metadata if k == prefix[:-1] or k.startswith(prefix)]:
            del metadata[key]


def _source_saved(module, destination, prefix, local_metadata):
    book = save_book(destination)
    if book is None:
        return
    sid = id(module)
    if prefix in book.slot_prefixes:
        if sid in book.canonical or sid in book.kept_slot:
            _drop_prefix(destination, prefix)
        else:
            book.kept_slot[sid] = prefix
    else:
        book.canonical.setdefault(sid, prefix)
        slot = book.kept_slot.pop(sid, None)
        if slot is not None:
            _drop_prefix(destination, slot)


def slot_saving(destination, slot: str) -> None:
    """A tied layer's state_dict() is about to write its source under ``slot`` ("...source.").
    Called by a parent, the source may also be saved under its own name elsewhere in the same
    state_dict; the source's hook then keeps that entry and drops this one (see _source_saved)."""
    book = save_book(destination)
    if book is not None:
        book.slot_prefixes.add(slot)


class LoadBook:
    """Per load_state_dict() call: which tied sources were loaded, and which keys were reported."""

    def __init__(self, missing_keys: list):
        self.missing_keys = missing_keys  # identifies the call (the same list throughout it)
        self.slots: set[str] = set()  # every tied layer's "source." prefix visited in this call
        self.placeholder_slots: set[str] = set()  # ... of them, those absent from the checkpoint
        self.placeholders: dict[int, tuple[int, list[str]]] = {}  # derived id -> (source id, slot keys)
        self.loaded: dict[int, str] = {}  # source id -> the prefix it was first loaded from
        # source id -> (the keys reported missing for it, whether under a tied layer's path)
        self.reported: dict[int, tuple[list[str], bool]] = {}

    def withdraw(self, sid: int, only_slot_reports: bool) -> None:
        keys, from_slot = self.reported.get(sid, ([], False))
        if from_slot or not only_slot_reports:
            for key in keys:
                if key in self.missing_keys:
                    self.missing_keys.remove(key)
            self.reported.pop(sid, None)


_load_state = threading.local()


def load_book(missing_keys: list) -> LoadBook:
    book = getattr(_load_state, "book", None)
    if book is None or book.missing_keys is not missing_keys:
        book = LoadBook(missing_keys)
        _load_state.book = book
    return book


def slot_loading(layer: nn.Module, source: nn.Module, state_dict, slot: str, missing_keys: list) -> None:
    """A tied layer's _load_from_state_dict is about to load its source from ``slot`` ("...source.")."""
    book = load_book(missing_keys)
    book.slots.add(slot)
    if not any(key.startswith(slot) for key in state_dict):
        # The checkpoint stores the source under its own name (or nowhere). Let the source's
        # visit through this layer load its current values onto itself, and report the keys
        # missing only if no other visit loads the source in this call (see derived_loaded).
        book.placeholder_slots.add(slot)
        own = source.state_dict(keep_vars=True)
        for key, value in own.items():
            state_dict[slot + key] = value
        book.placeholders[id(layer)] = (id(source), [slot + key for key in own])


def _difference(first, second) -> Optional[str]:
    """None if two copies of one tensor agree (NaN equals NaN), else how they differ, with values."""
    if not (isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)):
        return None
    if first.is_meta or second.is_meta:
        return None  # nothing to compare
    if first.shape != second.shape:
        return f"shapes {list(first.shape)} and {list(second.shape)}"
    first = first.detach()
    second = second.detach().to(device=first.device, dtype=first.dtype)
    unequal = (first != second) & ~(first.isnan() & second.isnan())
    count = int(unequal.sum())
    if count == 0:
        return None
    index = tuple(int(i) for i in unequal.nonzero()[0])
    at = f"[{', '.join(map(str, index))}]"
    return f"{count} of {first.numel()} elements, first at {at}: {first[index].item()!r} and {second[index].item()!r}"


def _source_loading(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Every visit of a tied source during load_state_dict, except through a placeholder slot."""
    for inner in module.modules():  # a source holding its own tied layer: say so before recursing
        check_no_cycle = getattr(inner, "_check_no_cycle", None)  # a tied layer's (_tied_layer.py)
        if check_no_cycle is not None:
            check_no_cycle("load_state_dict()")
    book = load_book(missing_keys)
    if prefix in book.placeholder_slots:
        return
    sid = id(module)
    values = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if values:
        if sid in book.loaded:
            # The checkpoint holds the source twice (say "conv_1.weight" and "conv_2.source.weight").
            # Equal copies are fine; unequal ones are an error, never "the last key wins".
            current = module.state_dict(keep_vars=True)
            for name, value in values.items():
                difference = _difference(current.get(name), value)
                if difference is not None:
                    error_msgs.append(
                        f"the checkpoint holds one tied source twice with different values: "
                        f"'{book.loaded[sid]}{name}' and '{prefix}{name}' differ ({difference}); keep one "
                        f"of the two keys"
                    )
            return
        book.loaded[sid] = prefix
        # Reports of it as missing are now wrong; a report under its own name gives way only to a
        # load through a tied layer's path (a source under two names of its own keeps PyTorch's rule).
        book.withdraw(sid, only_slot_reports=prefix not in book.slots)
    elif sid in book.loaded:
        # Loaded already through a tied layer's "source." path: this path loads it onto itself.
        for key, value in module.state_dict(keep_vars=True).items():
            state_dict[prefix + key] = value
    else:
        # Missing under its own name, which the module reports itself; a report under a tied
        # layer's path gives way to it.
        book.withdraw(sid, only_slot_reports=True)
        if sid not in book.reported:
            book.reported[sid] = ([prefix + key for key in module.state_dict(keep_vars=True)], False)


def derived_loaded(module, incompatible_keys):
    book = load_book(incompatible_keys.missing_keys)
    entry = book.placeholders.pop(id(module), None)
    if entry is None:
        return
    sid, keys = entry
    if sid not in book.loaded and sid not in book.reported:
        incompatible_keys.missing_keys.extend(keys)
        book.reported[sid] = (list(keys), True)


def install_source_hooks(source: nn.Module) -> None:
    if getattr(source, "_fusedtie_hooks", False):
        return
    source.register_state_dict_post_hook(_source_saved)
    source.register_load_state_dict_pre_hook(_source_loading)
    source._fusedtie_hooks = True


def remove_source_hooks(module: nn.Module) -> None:
    """Undo :func:`install_source_hooks` (on a module no tied layer uses any more, as in bake)."""
    if not module.__dict__.pop("_fusedtie_hooks", False):
        return
    for key, hook in list(module._state_dict_hooks.items()):
        if hook is _source_saved:
            del module._state_dict_hooks[key]
    for key, hook in list(module._load_state_dict_pre_hooks.items()):
        if getattr(hook, "hook", None) is _source_loading:
            del module._load_state_dict_pre_hooks[key]
