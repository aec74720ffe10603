"""Transform names and parameters. The table itself (names, f, f') lives in csrc/transforms.h."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ._library import LIB

_TABLE: dict[str, dict] = {row["name"]: row for row in LIB.transforms()}


def available_transforms() -> list[str]:
    """Names of the built-in transforms, e.g. ``['identity', 'square', ..., 'softplus']``."""
    return list(_TABLE)


def check_transform_name(name: str) -> None:
    """ValueError naming an unknown transform and listing the valid ones (the C++ message too)."""
    if name not in _TABLE:
        raise ValueError(f"unknown transform '{name}'; valid transforms: {', '.join(_TABLE)}")


def transform_table() -> list[dict]:
    """One row per transform: ``name``, ``forward`` (f), ``derivative`` (f'), ``uses_alpha``."""
    return [dict(row) for row in _TABLE.values()]


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
        row = _TABLE[self.name]
        if row["uses_alpha"]:
            if self.alpha is None:
                raise ValueError(
                    f"transform '{self.name}' needs its constant: Transform('{self.name}', alpha=...)"
                )
            object.__setattr__(self, "alpha", float(self.alpha))
        elif self.alpha is not None:
            raise ValueError(f"transform '{self.name}' takes no alpha, got alpha={self.alpha}")

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
