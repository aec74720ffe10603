"""User transforms: f and f' written as C++ expressions and compiled (``Transform.from_expression``),
and compositions of built-ins (``Transform.chain``).

Both register a name with the operator library (csrc/user_transforms.h) and return
``Transform(name)``, usable wherever a transform is: the operator schema carries the name, as for a
built-in, so torch.compile and export see a constant string. A name is bound to one definition for
the life of the process (creating it again with the same definition returns the same transform at
once; with another definition is a ValueError). A user transform exists in a process once it has
been created there: pickling a Transform records its definition, and unpickling creates it again
(for a compiled one, from the on-disk cache: no compiler runs).

Where the code runs:
  * compiled (from_expression): the CPU loops are compiled into a library of their own, in the
    computation type (float for float16/bfloat16): vector loops (SLEEF's math functions, as the
    built-in passes) where the CPU has AVX2 or AVX-512 and the expression compiles for the vector
    type, else scalar loops (``vectorized(t)`` and the table row say which it got; see
    fusedtie/_user_build.py); CUDA kernels too when the operator library has CUDA and
    torch.cuda.is_available() (or cuda=True). On CUDA the call runs the library path (f(W) by the
    user's kernel, then cuDNN, then grad * f'(W) by the user's kernel); the fused kernels only
    know the built-ins.
  * chain: nothing is compiled: the built-in vectorised CPU passes run stage after stage, and on
    CUDA one elementwise kernel composes the stages per element (library path too).
"""

from __future__ import annotations

import math
import numbers
import re
import threading
from dataclasses import dataclass
from typing import Optional, Union

import torch

from . import _user_build
from ._catalog import BUILT_IN, USER
from ._library import LIB
from .transforms import Transform

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# The derivative check: central differences with gradcheck's step and tolerances, on float64.
_CHECK_POINTS = 1000
_CHECK_STEP = 1e-6
_CHECK_ATOL = 1e-5
_CHECK_RTOL = 1e-3
_CHECK_DOMAIN = (-2.0, 2.0)
_LOCK = threading.Lock()  # one registration at a time (a compile may take seconds; so be it)
# What each compiled transform of this process got: its library's description (by name).
_BUILT: dict[str, _user_build.BuiltLibrary] = {}


@dataclass(frozen=True)
class ExpressionDefinition:
    """What ``Transform.from_expression`` was given; enough to create the transform again."""

    name: str
    forward: str
    derivative: str
    params: tuple[tuple[str, float], ...]  # sorted by name
    check_domain: tuple[float, float]
    cuda: Optional[bool]  # as asked: None decides where the transform is created

    def text(self) -> str:
        """The definition as the registry compares and quotes it (the check domain is not part of it)."""
        params = "".join(f", {name}={value!r}" for name, value in self.params)
        return f"from_expression(forward={self.forward!r}, derivative={self.derivative!r}{params})"

    def create(self) -> Transform:
        return from_expression(
            self.name,
            self.forward,
            self.derivative,
            cuda=self.cuda,
            check_domain=self.check_domain,
            **dict(self.params),
        )

    def row(self) -> dict:
        built = _BUILT.get(self.name)
        return {
            "name": self.name,
            "forward": self.forward,
            "derivative": self.derivative,
            "uses_alpha": False,
            "builtin": False,
            "params": dict(self.params),
            "vectorized": vectorized(self.name),
            "cpu_isa": built.isa if built is not None else None,
        }


@dataclass(frozen=True)
class ChainDefinition:
    """What ``Transform.chain`` was given: built-in stages, first applied first."""

    name: str
    stages: tuple[tuple[str, Optional[float]], ...]

    @staticmethod
    def canonical_name(stages: tuple[tuple[str, Optional[float]], ...]) -> str:
        """``chain(tanh, scale(alpha=2.0))``: the name of an unnamed chain, and every chain's definition."""
        return (
            "chain(" + ", ".join(name if alpha is None else f"{name}(alpha={alpha!r})" for name, alpha in stages) + ")"
        )

    def text(self) -> str:
        return self.canonical_name(self.stages)

    def create(self) -> Transform:
        return chain(
            *(Transform(name, alpha) for name, alpha in self.stages),
            name=None if self.name == self.text() else self.name,
        )

    def row(self) -> dict:
        return {
            "name": self.name,
            "forward": self.text(),
            "derivative": "the chain rule of the stages",
            "uses_alpha": False,
            "builtin": False,
            "params": {},
            "vectorized": True,
            "cpu_isa": None,
        }


UserDefinition = Union[ExpressionDefinition, ChainDefinition]


def from_expression(
    name: str,
    forward: str,
    derivative: str,
    *,
    cuda: Optional[bool] = None,
    check_domain: Optional[tuple[float, float]] = None,
    **params: float,
) -> Transform:
    """A transform from C++ expressions in ``x`` for f and f', compiled; see
    :meth:`fusedtie.Transform.from_expression`."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"a user transform's name must be an identifier (letters, digits, _), got {name!r}")
    _user_build.check_expression("forward", forward)
    _user_build.check_expression("derivative", derivative)
    values = []
    for param, value in sorted(params.items()):
        _user_build.check_parameter_name(param)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"parameter {param} must be a finite real number, got {value!r}")
        values.append((param, float(value)))
    lo, hi = (float(v) for v in (check_domain or _CHECK_DOMAIN))
    if not lo < hi:
        raise ValueError(f"check_domain must be (low, high) with low < high, got {check_domain!r}")
    definition = ExpressionDefinition(
        name, forward, derivative, tuple(values), (lo, hi), None if cuda is None else bool(cuda)
    )

    def register() -> None:
        import fusedtie

        with_cuda = bool(LIB.cuda_compiled) and torch.cuda.is_available() if cuda is None else bool(cuda)
        built = _user_build.build_library(
            forward, derivative, [p for p, _ in values], cuda=with_cuda, fusedtie_version=fusedtie.__version__
        )
        LIB._register_compiled_transform(name, definition.text(), built.path, [v for _, v in values])
        _BUILT[name] = built

    return _register(definition, register, _check_derivative)


def vectorized(transform: Union[str, Transform]) -> bool:
    """Whether a user transform's CPU passes, f and the chain rule both, run vector loops.

    Args:
        transform: a user transform of this process, by name or as a ``Transform``.

    Returns:
        True for a chain (the built-in vector passes, stage by stage); for a compiled one, whether
            its expressions compiled for the vector type on a CPU with AVX2 or AVX-512 (False: scalar
            loops, correct but slower for an expression calling tanh, exp...: 29x for tanh(x) with
            AVX-512).

    Raises:
        ValueError: a built-in or unknown name.

    Examples:
        >>> t = fusedtie.Transform.from_expression(
        ...     "cube", forward="x * x * x", derivative="3 * x * x"
        ... )
        >>> fusedtie.user_transforms.vectorized(t)  # on a CPU with AVX2 or AVX-512
        True
        >>> chained = fusedtie.Transform.chain("tanh", "square")
        >>> fusedtie.user_transforms.vectorized(chained)
        True
    """
    name = Transform.parse(transform).name
    definition = USER.get(name)
    if definition is None:
        raise ValueError(f"'{name}' is not a user transform of this process")
    if isinstance(definition, ChainDefinition):
        return True
    built = _BUILT.get(name)
    return built is not None and built.vectorized


def chain(*stages, name: Optional[str] = None) -> Transform:
    """The composition of built-in transforms, first stage applied first; see
    :meth:`fusedtie.Transform.chain`."""
    parsed: list[tuple[str, Optional[float]]] = []
    for stage in stages:
        if isinstance(stage, tuple):
            if len(stage) != 2:
                raise ValueError(f"a chain stage given as a tuple is (name, alpha), got {stage!r}")
            stage = Transform(*stage)
        stage = Transform.parse(stage)
        if stage.name not in BUILT_IN:
            raise ValueError(
                f"a chain composes built-in transforms ({', '.join(BUILT_IN)}); '{stage.name}' is a user "
                "transform: write the composition into its expression instead"
            )
        parsed.append((stage.name, stage.alpha))
    if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
        raise ValueError(f"a chain's name must be an identifier (letters, digits, _), got {name!r}")
    definition = ChainDefinition(name or ChainDefinition.canonical_name(tuple(parsed)), tuple(parsed))
    return _register(
        definition,
        lambda: LIB._register_chain_transform(
            definition.name, definition.text(), [(n, 1.0 if a is None else a) for n, a in parsed]
        ),
    )


def _register(definition: UserDefinition, register, check=None) -> Transform:
    """Binds definition.name: nothing to do if it is bound to this definition already, a ValueError
    (from the operator library, which quotes both) if to another; else register() and check()."""
    with _LOCK:
        if LIB._check_user_transform(definition.name, definition.text()):
            USER.setdefault(definition.name, definition)
            return Transform(definition.name)
        register()
        USER[definition.name] = definition
        try:
            if check is not None:
                check(definition)
        except BaseException:
            del USER[definition.name]
            _BUILT.pop(definition.name, None)
            LIB._unregister_user_transform(definition.name)
            raise
        return Transform(definition.name)


def _check_derivative(definition: ExpressionDefinition) -> None:
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


def _check_cuda_matches_cpu(definition: ExpressionDefinition, x, forward, derivative) -> None:
    device = x.to("cuda")
    for what, fn in (("forward", forward), ("derivative", derivative)):
        cpu, gpu = fn(x), fn(device).cpu()
        if not torch.allclose(cpu, gpu, rtol=1e-12, atol=1e-12, equal_nan=True):
            worst = int((cpu - gpu).abs().nan_to_num(nan=math.inf).argmax())
            raise ValueError(
                f"transform '{definition.name}': the CUDA {what} differs from the CPU one at x = "
                f"{float(x[worst])!r}: {float(gpu[worst])!r} against {float(cpu[worst])!r}"
            )
