"""Intervention methods: one small file each. Importing this package registers them all."""

from lvlm_fix.methods import (
    pai,  # noqa: F401
    var,  # noqa: F401
    vhr,  # noqa: F401
)
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
