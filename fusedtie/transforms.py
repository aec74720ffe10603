"""Transform names and parameters. The table itself (names, f, f') lives in csrc/transforms.h; user
transforms (compiled from expressions, or chains of built-ins) are defined in user_transforms.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

from ._library import LIB

if TYPE_CHECKING:
    from .user_transforms import UserDefinition

_TABLE: dict[str, dict] = {row["name"]: {**row, "builtin": True} for row in LIB.transforms()}
# The user transforms created in this process, by name, in creation order (user_transforms.py
# fills it, in step with the operator library's registry).
_USER: dict[str, "UserDefinition"] = {}


def available_transforms(include_user: bool = False) -> list[str]:
    """Names of the built-in transforms, e.g. ``['identity', 'square', ..., 'softplus']``; with
    ``include_user=True``, followed by the user transforms created in this process."""
    return list(_TABLE) + (list(_USER) if include_user else [])


def check_transform_name(name: str) -> None:
    """ValueError naming an unknown transform and listing the valid ones (the C++ message too)."""
    if name not in _TABLE and name not in _USER:
        raise ValueError(
            f"unknown transform '{name}'; valid transforms: {', '.join(available_transforms(include_user=True))}"
            " (a user transform exists in a process once Transform.from_expression or Transform.chain has "
            "created it there)"
        )


def transform_table(include_user: bool = False) -> list[dict]:
    """One row per transform: ``name``, ``forward`` (f), ``derivative`` (f'), ``uses_alpha``, ``builtin``;
    with ``include_user=True``, the user transforms created in this process follow the built-ins (their
    rows also give ``params``, the values of their named parameters)."""
    rows = [dict(row) for row in _TABLE.values()]
    return rows + ([definition.row() for definition in _USER.values()] if include_user else [])


@dataclass(frozen=True)
class Transform:
    """An elementwise transform f applied to a source tensor.

    Most transforms are named by a string alone (``"square"``); ``scale`` takes its constant factor::

        fusedtie.Transform("scale", alpha=0.5)     # f(w) = 0.5 * w

    Anywhere a transform is accepted, a name string and a ``Transform`` are interchangeable.
    """

    name: str
    alpha: Optional[float] = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"a transform is named by a string, got {type(self.name).__name__}")
        check_transform_name(self.name)
        row = _TABLE.get(self.name) or {"uses_alpha": False}  # user transforms carry their own constants
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
        """A user transform: f and f' as C++ expressions in ``x`` and named float parameters, compiled::

            cube = fusedtie.Transform.from_expression("cube", forward="x * x * x", derivative="3 * x * x")
            quad = fusedtie.Transform.from_expression(
                "quad", forward="a * x + b * x * x", derivative="a + 2 * b * x", a=1.0, b=0.5)
            y = fusedtie.tied_conv2d(x, w, transform=cube)   # or transform="cube", once created

        The expressions are C++ evaluated in the computation type ``T`` (float for float32, bfloat16
        and float16; double for float64), with ``<cmath>`` in scope (``exp(x)``, ``tanh(x)``,
        ``pow(x, 3)``, ``x > 0 ? x : 0``). The first creation compiles a small library (a few seconds;
        with CUDA kernels too when ``cuda`` is True, or None and CUDA is available), cached on disk
        under $FUSEDTIE_CACHE_DIR, else $TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions, keyed
        by the expressions, parameter names and versions; later creations, in any process, load it
        without compiling. Parameter values are not compiled in: transforms differing only in them
        share one library.

        Raises ValueError if an expression does not compile (quoting the compiler), if the derivative
        disagrees with central differences of the forward on random points of ``check_domain``
        ((-2, 2) by default; give one where f is defined, e.g. (0.1, 4) for ``log(x)``), giving the
        worst point, or if ``name`` is a built-in or already defined otherwise in this process.
        ``name``, ``forward``, ``derivative``, ``cuda`` and ``check_domain`` cannot be parameter
        names.
        """
        from .user_transforms import from_expression

        return from_expression(name, forward, derivative, cuda=cuda, check_domain=check_domain, **params)

    @classmethod
    def chain(cls, *stages: Union[str, "Transform", tuple], name: Optional[str] = None) -> "Transform":
        """The composition of built-in transforms, the first applied first (f = f_n o ... o f_1)::

            fusedtie.Transform.chain("tanh", ("scale", 2.0))   # f(w) = 2 * tanh(w)

        Stages are names, ``Transform``s or ``(name, alpha)`` pairs (2 to 8 of them). Nothing is
        compiled: the built-in passes run stage after stage. The transform is named
        ``chain(tanh, scale(alpha=2.0))`` unless ``name`` is given.
        """
        from .user_transforms import chain

        return chain(*stages, name=name)

    def __reduce__(self):
        # A user transform pickles as its definition, so that unpickling creates it again (in a new
        # process too; a compiled one from the disk cache).
        definition = _USER.get(self.name)
        if definition is not None:
            return (definition.create, ())
        return (Transform, (self.name, self.alpha))

    @classmethod
    def parse(cls, value: Union[str, "Transform"]) -> "Transform":
        if isinstance(value, Transform):
            return value
        if isinstance(value, str):
            return cls(value)
        raise TypeError(
            f"expected a transform name (one of {', '.join(_TABLE)}) or a fusedtie.Transform, "
            f"got {type(value).__name__}"
        )

    @property
    def op_alpha(self) -> float:
        """The float the operator schema carries (1.0 for transforms without a constant)."""
        return 1.0 if self.alpha is None else self.alpha

    def __str__(self) -> str:
        return self.name if self.alpha is None else f"{self.name}(alpha={self.alpha:g})"
