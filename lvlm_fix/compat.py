"""What differs between the transformers releases we support, in one place.

transformers 5.24 renamed the KV cache argument of every model and decoder-layer `forward` from
`past_key_values` to `cache` (and the output field likewise); 5.23 knows only the old name, and
5.24 warns on every call that still uses it. We read the name off the installed release once.
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers import LlamaModel

CACHE_KWARG: str = (
    "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
)


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """`model(..., **cache_kwargs(cache))` under either name."""
    return {CACHE_KWARG: cache}


def layer_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache a decoder layer's forward was given (None if none)."""
    return kwargs.get(CACHE_KWARG)


def output_cache(output: Any) -> Any:
    """The KV cache a model forward returned."""
    return getattr(output, CACHE_KWARG)
