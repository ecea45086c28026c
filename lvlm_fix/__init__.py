"""lvlm_fix: composable, training-free hallucination interventions for LLaVA-family models."""

from lvlm_fix.decoding import Sample
from lvlm_fix.engine import EngineConfig
from lvlm_fix.lvlm import LVLM, Generation
from lvlm_fix.methods import REGISTRY as INTERVENTIONS
from lvlm_fix.methods import Intervention, parse_intervention
from lvlm_fix.params import GenerationParams

__version__ = "0.2.0"  # the one place the version is written (pyproject reads it)


def load(name_or_path: str | None = None, **kwargs) -> LVLM:
    """Shorthand for `LVLM.from_pretrained`."""
    return LVLM.from_pretrained(name_or_path, **kwargs)


__all__ = [
    "__version__",
    "INTERVENTIONS",
    "EngineConfig",
    "LVLM",
    "Generation",
    "GenerationParams",
    "Intervention",
    "Sample",
    "load",
    "parse_intervention",
]
