"""Fused edited attention in Triton: the entry point that picks the row-tiled kernel
(triton_prefill.py) or the split-K decode kernel (triton_decode.py). Both apply PAI on score
tiles, keep VAR's group partials in the online softmax, scale heads in the epilogue and write
the requested statistics; the math is reference.py's, and tests hold one against the other.

Which kernel a decode step gets depends on what it costs. Run eagerly, a 7B decode step is
bound by host time (about 1 ms of Python per layer against tens of microseconds of GPU time),
and every Triton launch costs tens of microseconds of host time: the row-tiled kernel does the
whole call in one launch, the split-K kernel needs two. Inside a CUDA graph launches cost
nothing and GPU time is all that is left, so the split-K kernel, which spreads one query row
over many SMs, is used there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .edits import AttentionEdits
from .triton_common import KernelConfig
from .triton_decode import decode_attention
from .triton_prefill import prefill_attention

__all__ = ["KernelConfig", "decode_attention", "edited_attention_triton", "prefill_attention"]

DECODE_MAX_ROWS = 16  # GQA*Q packed rows up to which the decode kernel is used


def edited_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, key_start: Tensor, edits: AttentionEdits,
    key_end: Tensor | None = None, validate: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """Split-K for a static cache's decode step (`key_end` given: the step runs in a CUDA
    graph) or few packed query rows under capture; one row-tiled launch otherwise."""
    if key_end is not None:
        return decode_attention(
            q, k, v, scale=scale, key_start=key_start, edits=edits, key_end=key_end,
            validate=validate,
        )  # fmt: skip
    kernel = prefill_attention
    packed = (q.shape[1] // k.shape[1]) * q.shape[2]
    if packed <= DECODE_MAX_ROWS and q.is_cuda and torch.cuda.is_current_stream_capturing():
        kernel = decode_attention
    return kernel(q, k, v, scale=scale, key_start=key_start, edits=edits, validate=validate)
