"""The transform registry of this process: its state, and the only code that changes it.

The state: the built-in table, read from the operator library (whose single definition is
csrc/transforms.h); the user transforms created here, by name; and the compiled library of each
one made from expressions. Registering a user transform (``register_expression``,
``register_chain``) binds its name here and in the operator library's own registry
(csrc/user_transforms.h) in one step, under one lock, and a registration whose check fails is
undone in both. transforms.py holds the user-facing side (``Transform`` and the definitions it
builds); this module knows a definition only by its fields, ``text()`` and ``row()``, so it imports
nothing of the package above the operator library.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Callable, Optional

import torch

from . import _user_build
from ._library import LIB
from ._version import __version__

BUILT_IN: dict[str, dict] = {row["name"]: {**row, "builtin": True} for row in LIB.transforms()}
# The user transforms created in this process, by name, in creation order: their definitions
# (transforms.ExpressionDefinition or ChainDefinition).
USER: dict[str, Any] = {}
# What each compiled (from_expression) transform of this process got: its library's description.
LIBRARIES: dict[str, _user_build.BuiltLibrary] = {}
_LOCK = threading.Lock()  # one registration at a time (a compile may take seconds; so be it)

# The derivative check: central differences with gradcheck's step and tolerances, on float64.
_CHECK_POINTS = 1000
_CHECK_STEP = 1e-6
_CHECK_ATOL = 1e-5
_CHECK_RTOL = 1e-3


def available_transforms(include_user: bool = False) -> list[str]:
    """Names of the transforms a ``transform=`` argument accepts.

    Args:
        include_user: also list the user transforms created in this process
            (``Transform.from_expression``, ``Transform.chain``), after the built-ins.

    Returns:
        The names, built-ins first in the order of ``csrc/transforms.h``.

    Examples:
        >>> fusedtie.available_transforms()
        ['identity', 'square', 'abs', 'neg', 'scale', 'exp', 'sigmoid', 'tanh', 'softplus']
    """
    return list(BUILT_IN) + (list(USER) if include_user else [])


def check_transform_name(name: str) -> None:
    """ValueError naming an unknown transform and listing the valid ones (the C++ message too)."""
    if name not in BUILT_IN and name not in USER:
        raise ValueError(
            f"unknown transform '{name}'; valid transforms: {', '.join(available_transforms(include_user=True))}"
            " (a user transform exists in a process once Transform.from_expression or Transform.chain has "
            "created it there)"
        )


def transform_table(include_user: bool = False) -> list[dict]:
    """The formulas of the transforms, read from ``csrc/transforms.h`` (the one definition of f and f').

    Args:
        include_user: also give the user transforms created in this process, after the built-ins.

    Returns:
        One dict per transform, with ``name``, ``forward`` (f), ``derivative`` (f'), ``uses_alpha``
            and ``builtin``. A user transform's row also gives ``params`` (the values of its named
            parameters), ``vectorized`` and ``cpu_isa`` (the instruction set its CPU loops were compiled
            for; None for a chain).

    Examples:
        >>> fusedtie.transform_table()[1]
        {'name': 'square', 'forward': 'x*x', 'derivative': '2*x', 'uses_alpha': False, 'builtin': True}
    """
    rows = [dict(row) for row in BUILT_IN.values()]
    return rows + ([definition.row() for definition in USER.values()] if include_user else [])


def register_expression(definition) -> None:
    """Compiles an ExpressionDefinition (or loads its library from the disk cache), registers it with
    the operator library and checks its derivative; see ``_bind``."""

    def register() -> _user_build.BuiltLibrary:
        cuda = definition.cuda
        with_cuda = bool(LIB.cuda_compiled) and torch.cuda.is_available() if cuda is None else bool(cuda)
        built = _user_build.build_library(
            definition.forward,
            definition.derivative,
            [p for p, _ in definition.params],
            cuda=with_cuda,
            fusedtie_version=__version__,
        )
        LIB._register_compiled_transform(
            definition.name, definition.text(), built.path, [v for _, v in definition.params]
        )
        return built

    _bind(definition, register, _check_derivative)


def register_chain(definition) -> None:
    """Registers a ChainDefinition (its stages are built-ins: nothing is compiled); see ``_bind``."""
    _bind(
        definition,
        lambda: LIB._register_chain_transform(
            definition.name, definition.text(), [(n, 1.0 if a is None else a) for n, a in definition.stages]
        ),
    )


def _bind(definition, register: Callable[[], Optional[_user_build.BuiltLibrary]], check=None) -> None:
    """Binds definition.name: nothing to do if it is bound to this definition already, a ValueError
    (from the operator library, which quotes both) if to another; else register() (which returns the
    compiled library, if any) and check(). A check that fails undoes the registration, here and in
    the operator library, so that a corrected definition can take the name."""
    with _LOCK:
        if LIB._check_user_transform(definition.name, definition.text()):
            USER.setdefault(definition.name, definition)
            return
        built = register()
        if built is not None:
            LIBRARIES[definition.name] = built
        USER[definition.name] = definition
        try:
            if check is not None:
                check(definition)
        except BaseException:
            del USER[definition.name]
            LIBRARIES.pop(definition.name, None)
            LIB._unregister_user_transform(definition.name)
            raise


def _check_derivative(definition) -> None:
    """ValueError unless the compiled f' matches central differences of the compiled f (float64,
    random points of the check domain, gradcheck's step and tolerances); where CUDA kernels run,
    also that they compute what the CPU code does."""
    name = definition.name
    lo, hi = definition.check_domain
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(_CHECK_POINTS, dtype=torch.float64, generator=generator) * (hi - lo) + lo

    def forward(v):
        return torch.ops.fusedtie.transform(v, name, 1.0)

    def derivative(v):
        return torch.ops.fusedtie._transform_backward(torch.ones_like(v), v, name, 1.0)

    with torch.no_grad():
        numeric = (forward(x + _CHECK_STEP) - forward(x - _CHECK_STEP)) / (2 * _CHECK_STEP)
        analytic = derivative(x)
        defined = torch.isfinite(numeric)
        if not bool(defined.any()):
            raise ValueError(
                f"transform '{name}': the forward {definition.forward!r} is not finite anywhere on the check "
                f"domain {definition.check_domain}; pass check_domain=(low, high) where it is defined"
            )
        excess = ((analytic - numeric).abs() - (_CHECK_ATOL + _CHECK_RTOL * numeric.abs())).nan_to_num(nan=math.inf)
        excess = torch.where(defined, excess, -math.inf)
        worst = int(excess.argmax())
        if float(excess[worst]) > 0:
            wrong = int((excess > 0).sum())
            raise ValueError(
                f"transform '{name}': the derivative {definition.derivative!r} disagrees with the forward "
                f"{definition.forward!r} at {wrong} of {int(defined.sum())} points of {definition.check_domain}; "
                f"worst at x = {float(x[worst])!r}: derivative {float(analytic[worst])!r}, central difference "
                f"(f(x+h) - f(x-h)) / 2h = {float(numeric[worst])!r} (h = {_CHECK_STEP}, atol = {_CHECK_ATOL}, "
                f"rtol = {_CHECK_RTOL})"
            )
        if bool(LIB.cuda_compiled) and torch.cuda.is_available() and definition.cuda is not False:
            _check_cuda_matches_cpu(definition, x, forward, derivative)


def _check_cuda_matches_cpu(definition, x, forward, derivative) -> None:
    device = x.to("cuda")
    for what, fn in (("forward", forward), ("derivative", derivative)):
        cpu, gpu = fn(x), fn(device).cpu()
        if not torch.allclose(cpu, gpu, rtol=1e-12, atol=1e-12, equal_nan=True):
            worst = int((cpu - gpu).abs().nan_to_num(nan=math.inf).argmax())
            raise ValueError(
                f"transform '{definition.name}': the CUDA {what} differs from the CPU one at x = "
                f"{float(x[worst])!r}: {float(gpu[worst])!r} against {float(cpu[worst])!r}"
            )
