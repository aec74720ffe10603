"""The transform names this process knows, in one place: the built-in table, read from the operator
library (whose single definition is csrc/transforms.h), and the user transforms created here.
transforms.py reads both; user_transforms.py, which creates user transforms, fills USER in step with
the operator library's own registry."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._library import LIB

if TYPE_CHECKING:
    from .user_transforms import UserDefinition

BUILT_IN: dict[str, dict] = {row["name"]: {**row, "builtin": True} for row in LIB.transforms()}
# The user transforms created in this process, by name, in creation order.
USER: dict[str, UserDefinition] = {}
