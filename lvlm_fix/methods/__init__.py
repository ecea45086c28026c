"""Intervention methods: one small file each. Importing this package registers them all."""

# Importing a method module registers it (one line each).
from lvlm_fix.methods import (
    act,  # noqa: F401
    dyvte,  # noqa: F401
    fastv,  # noqa: F401
    flowcut,  # noqa: F401
    gift,  # noqa: F401
    m3id,  # noqa: F401
    opera,  # noqa: F401
    pai,  # noqa: F401
    pai_cfg,  # noqa: F401
    paint,  # noqa: F401
    ritual,  # noqa: F401
    var,  # noqa: F401
    vcd,  # noqa: F401
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
