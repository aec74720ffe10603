"""User transforms: f and f' written as C++ expressions and compiled (``Transform.from_expression``),
and compositions of built-ins (``Transform.chain``).

Both register a name with the operator library (csrc/user_transforms.h) and return
``Transform(name)``, usable wherever a transform is: the operator schema carries the name, as for a
built-in, so torch.compile and export see a constant string. A name is bound to one definition for
the life of the process (creating it again with the same definition returns the same transform at
once; with another definition is a ValueError). A user transform exists in a process once it has
been created there: pickling a Transform records its definition, and unpickling creates it again
(for a compiled one, from the on-disk cache: no compiler runs).

This is the public module of user transforms: ``vectorized``, and the creation functions and
definitions it re-exports from fusedtie/transforms.py, where they live beside ``Transform`` (which
creates them and is created by them). The registry they bind names in, with the compiled libraries
and the rollback of a failed registration, is fusedtie/_catalog.py.

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

from typing import Union

from ._catalog import LIBRARIES as _BUILT  # noqa: F401  (the compiled libraries, by name; tests read it)
from ._catalog import USER
from .transforms import ChainDefinition as ChainDefinition
from .transforms import ExpressionDefinition as ExpressionDefinition
from .transforms import Transform
from .transforms import UserDefinition as UserDefinition
from .transforms import chain as chain
from .transforms import from_expression as from_expression


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
    return definition.vectorized()
