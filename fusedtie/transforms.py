"""``Transform``: the value a ``transform=`` argument takes, and the definitions of user transforms.

The table of built-in transforms (names, f, f') lives in csrc/transforms.h; the registry of the
names this process knows is fusedtie/_catalog.py's. User transforms (compiled from expressions, or
chains of built-ins) are defined here, next to the ``Transform`` they create and are created
again from when a ``Transform`` is unpickled; fusedtie/user_transforms.py is their public module.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Optional, Union

from . import _user_build
from ._catalog import BUILT_IN, LIBRARIES, USER, register_chain, register_expression
from ._catalog import available_transforms as available_transforms
from ._catalog import check_transform_name as check_transform_name
from ._catalog import transform_table as transform_table

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_CHECK_DOMAIN = (-2.0, 2.0)  # where from_expression checks f' against f, unless told otherwise


@dataclass(frozen=True)
class Transform:
    """An elementwise transform f applied to a source tensor.

    Most transforms are named by a string alone (``"square"``); ``scale`` takes its constant factor,
    which must be given (``Transform("scale")`` alone is an error rather than a silent alpha = 1).
    Anywhere a transform is accepted, a name string and a ``Transform`` are interchangeable. A
    ``Transform`` is immutable and hashable, and pickles (a user transform as its definition).

    Args:
        name: a built-in name (``available_transforms()``) or a user transform created in this
            process.
        alpha: the constant of ``scale`` (f(x) = alpha * x); None for every other transform.

    Attributes:
        name: the transform's name, as the operator schema carries it.
        alpha: the constant as a float, or None.

    Raises:
        ValueError: an unknown name (the message lists the valid ones), ``scale`` without ``alpha``,
            or ``alpha`` for a transform that takes none.
        TypeError: a name that is not a string.

    Examples:
        >>> half = fusedtie.Transform("scale", alpha=0.5)  # f(w) = 0.5 * w
        >>> print(half)
        scale(alpha=0.5)
        >>> fusedtie.apply_transform(torch.tensor([2.0, -4.0]), half)
        tensor([ 1., -2.])
    """

    name: str
    alpha: Optional[float] = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"a transform is named by a string, got {type(self.name).__name__}")
        check_transform_name(self.name)
        row = BUILT_IN.get(self.name) or {"uses_alpha": False}  # user transforms carry their own constants
        if row["uses_alpha"]:
            if self.alpha is None:
                raise ValueError(f"transform '{self.name}' needs its constant: Transform('{self.name}', alpha=...)")
            object.__setattr__(self, "alpha", float(self.alpha))
        elif self.alpha is not None:
            raise ValueError(f"transform '{self.name}' takes no alpha, got alpha={self.alpha}")

    @classmethod
    def from_expression(
        cls,
        name: str,
        forward: str,
        derivative: str,
        *,
        cuda: Optional[bool] = None,
        check_domain: Optional[tuple[float, float]] = None,
        **params: float,
    ) -> "Transform":
        """A user transform: f and f' as C++ expressions in ``x`` and named float parameters, compiled.

        The expressions are C++ evaluated in the computation type ``T`` (float for float32, bfloat16
        and float16; double for float64), with ``<cmath>`` in scope (``exp(x)``, ``tanh(x)``,
        ``pow(x, 3)``, ``x > 0 ? x : 0``). The first creation compiles a small library (a few seconds;
        with CUDA kernels too when ``cuda`` is True, or None and CUDA is available), cached on disk
        under $FUSEDTIE_CACHE_DIR, else $TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions, keyed
        by the expressions, parameter names and versions; later creations, in any process, load it
        without compiling. Parameter values are not compiled in: transforms differing only in them
        share one library.

        See docs/transforms-own.md for what runs where, and ``fusedtie.user_transforms.vectorized``
        for whether the CPU loops got vector code.

        Args:
            name: the transform's name, an identifier (letters, digits, _); not a built-in's.
            forward: f, one C++ expression in ``x`` and the parameters.
            derivative: f', one C++ expression in ``x`` and the parameters.
            cuda: compile CUDA kernels too; None (the default): when the operator library has CUDA
                and ``torch.cuda.is_available()``.
            check_domain: ``(low, high)``, where f' is checked against central differences of f
                ((-2, 2) by default; give one where f is defined, e.g. (0.1, 4) for ``log(x)``).
            **params: named float parameters the expressions use (``a=1.0``); ``name``, ``forward``,
                ``derivative``, ``cuda`` and ``check_domain`` cannot be parameter names.

        Returns:
            ``Transform(name)``, usable wherever a transform is (the name alone, too, once created in
                the process). Creating it again with the same definition returns it at once.

        Raises:
            ValueError: an expression that does not compile (quoting the compiler); a derivative
                that disagrees with central differences of the forward on random points of
                ``check_domain`` (giving the worst point); a name that is not an identifier, is a
                built-in's or is already defined otherwise in this process; a parameter whose name
                is reserved or whose value is not a finite real number.

        Examples:
            >>> cube = fusedtie.Transform.from_expression(
            ...     "cube", forward="x * x * x", derivative="3 * x * x"
            ... )
            >>> fusedtie.apply_transform(torch.tensor([1.0, 2.0]), cube)
            tensor([1., 8.])
            >>> quad = fusedtie.Transform.from_expression(
            ...     "quad", forward="a * x + b * x * x", derivative="a + 2 * b * x", a=1.0, b=0.5
            ... )
            >>> fusedtie.apply_transform(torch.tensor([2.0]), "quad")  # by name, once created
            tensor([4.])
        """
        return from_expression(name, forward, derivative, cuda=cuda, check_domain=check_domain, **params)

    @classmethod
    def chain(cls, *stages: Union[str, "Transform", tuple], name: Optional[str] = None) -> "Transform":
        """The composition of built-in transforms, the first applied first (f = f_n o ... o f_1).

        Nothing is compiled: the built-in passes run stage after stage (on CUDA, one elementwise
        kernel composes the stages per element).

        Args:
            *stages: 2 to 8 built-in transforms: names, ``Transform``s or ``(name, alpha)`` pairs.
            name: the transform's name, an identifier; by default the chain's own text, e.g.
                ``chain(tanh, scale(alpha=2.0))``.

        Returns:
            ``Transform(name)``, usable wherever a transform is.

        Raises:
            ValueError: a stage that is not a built-in (a user transform: write the composition into
                its expression instead), a malformed stage, fewer than 2 or more than 8 stages, or a
                name that is not an identifier or is already defined otherwise in this process.

        Examples:
            >>> t = fusedtie.Transform.chain("tanh", ("scale", 2.0))  # f(w) = 2 * tanh(w)
            >>> t.name
            'chain(tanh, scale(alpha=2.0))'
            >>> fusedtie.apply_transform(torch.tensor([0.5]), t)
            tensor([0.9242])
        """
        return chain(*stages, name=name)

    def __reduce__(self):
        # A user transform pickles as its definition, so that unpickling creates it again (in a new
        # process too; a compiled one from the disk cache).
        definition = USER.get(self.name)
        if definition is not None:
            return (definition.create, ())
        return (Transform, (self.name, self.alpha))

    @classmethod
    def parse(cls, value: Union[str, "Transform"]) -> "Transform":
        """The ``Transform`` a ``transform=`` argument names.

        Args:
            value: a transform name, or a ``Transform`` (returned as it is).

        Returns:
            The ``Transform``.

        Raises:
            ValueError: an unknown name, or ``"scale"`` (which needs its constant).
            TypeError: a value that is neither a string nor a ``Transform``.

        Examples:
            >>> fusedtie.Transform.parse("tanh")
            Transform(name='tanh', alpha=None)
        """
        if isinstance(value, Transform):
            return value
        if isinstance(value, str):
            return cls(value)
        raise TypeError(
            f"expected a transform name (one of {', '.join(BUILT_IN)}) or a fusedtie.Transform, "
            f"got {type(value).__name__}"
        )

    @property
    def op_alpha(self) -> float:
        """The float the operator schema carries (1.0 for transforms without a constant)."""
        return 1.0 if self.alpha is None else self.alpha

    def __str__(self) -> str:
        return self.name if self.alpha is None else f"{self.name}(alpha={self.alpha:g})"


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

    def vectorized(self) -> bool:
        """Whether its compiled CPU loops, f and the chain rule both, are vector loops."""
        built = LIBRARIES.get(self.name)
        return built is not None and built.vectorized

    def row(self) -> dict:
        built = LIBRARIES.get(self.name)
        return {
            "name": self.name,
            "forward": self.forward,
            "derivative": self.derivative,
            "uses_alpha": False,
            "builtin": False,
            "params": dict(self.params),
            "vectorized": self.vectorized(),
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

    def vectorized(self) -> bool:
        """Always: the built-in vector passes run stage by stage."""
        return True

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

# Pickles of user transforms name their definition's class by module: fusedtie.user_transforms, which
# defined them before they moved here and re-exports them, so that pickles load in either version.
ExpressionDefinition.__module__ = ChainDefinition.__module__ = "fusedtie.user_transforms"


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
    register_expression(definition)
    return Transform(definition.name)


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
    register_chain(definition)
    return Transform(definition.name)
