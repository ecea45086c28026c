"""Intervention methods: one small file each. Importing this package registers them all."""

from lvlm_fix.methods import dyvte, fastv, flowcut  # noqa: F401  (registers them)
from lvlm_fix.methods.base import (
    REGISTRY,
    Contribution,
    Intervention,
    RowState,
    View,
    parse_intervention,
    register,
)

__all__ = [
    "REGISTRY",
    "Contribution",
    "Intervention",
    "RowState",
    "View",
    "parse_intervention",
    "register",
]
