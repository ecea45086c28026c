"""Fused edited attention in Triton: the entry point that picks the prefill kernel
(triton_prefill.py) or the split-K decode kernel (triton_decode.py). Both apply PAI on score
tiles, keep VAR's group partials in the online softmax, scale heads in the epilogue and write
the requested statistics; the math is reference.py's, and tests hold one against the other.
"""

from __future__ import annotations

from torch import Tensor

from .edits import AttentionEdits
from .triton_common import KernelConfig
from .triton_decode import decode_attention
from .triton_prefill import prefill_attention

__all__ = ["KernelConfig", "decode_attention", "edited_attention_triton", "prefill_attention"]

DECODE_MAX_ROWS = 16  # GQA*Q packed rows up to which the decode kernel is used


def edited_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, key_start: Tensor, edits: AttentionEdits,
    validate: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """Pick the decode kernel for few packed query rows, the prefill kernel otherwise."""
    kernel = decode_attention
    if (q.shape[1] // k.shape[1]) * q.shape[2] > DECODE_MAX_ROWS:
        kernel = prefill_attention
    return kernel(q, k, v, scale=scale, key_start=key_start, edits=edits, validate=validate)
