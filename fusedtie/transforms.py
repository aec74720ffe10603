"""Transform names and parameters. The table itself (names, f, f') lives in csrc/transforms.h; user
transforms (compiled from expressions, or chains of built-ins) are defined in user_transforms.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ._catalog import BUILT_IN, USER


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
        from .user_transforms import from_expression

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
        from .user_transforms import chain

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
