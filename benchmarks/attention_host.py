"""Host time of one decode-step attention call: stock SDPA vs our edited path, piece by piece.

    python benchmarks/attention_host.py            # GPU, LLaVA-1.5-7B shape, VAR+VHR+PAI

At batch 1 a decode step is bound by host time, so what an intervention costs end to end is the
host time it adds per layer. This captures one real decode-step call (layer 5, the prompt of
benchmarks/attention.py plus a few generated tokens) with its request context, then times 3000
back-to-back calls of each piece without synchronising (host µs per call).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from attention import QUESTION, make_images, method_settings  # noqa: E402
from common import build_llava, sync  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from lvlm_fix import GenerationParams, Sample, attention  # noqa: E402
from lvlm_fix.hooks import AttentionCall, current, forward_context  # noqa: E402
from lvlm_fix.kernels import AttentionEdits, edited_attention  # noqa: E402
from lvlm_fix.kernels.triton_decode import decode_attention  # noqa: E402

LAYER = 5


def capture_call(lvlm, samples, interventions) -> tuple:
    """(module, q, k, v, mask, kwargs, ctx) of one decode-step attention call at LAYER."""
    seen: dict[str, tuple] = {}

    def spy(module, q, k, v, mask, *args, **kwargs):
        ctx = current()
        if ctx is not None and ctx.phase == "decode" and module.layer_idx == LAYER and not seen:
            seen["call"] = (module, q, k, v, mask, kwargs, ctx)
        return attention.lvlm_attention(module, q, k, v, mask, *args, **kwargs)

    AttentionInterface.register(attention.NAME, spy)
    try:
        lvlm.generate(samples, interventions, GenerationParams(max_new_tokens=8))
    finally:
        AttentionInterface.register(attention.NAME, attention.lvlm_attention)
    return seen["call"]


def host_us(fn, calls: int = 3000) -> float:
    for _ in range(50):
        fn()
    sync("cuda")
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    sync("cuda")
    return elapsed / calls * 1e6


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA: the point is the host cost of GPU launches")
    lvlm = build_llava("llava-1.5-7b", "cuda", torch.bfloat16)
    samples = [Sample(QUESTION, (make_images(1)[0],))]
    interventions = method_settings(1.5, [1415, 2533])["var+vhr+pai"]
    module, q, k, v, mask, kwargs, ctx = capture_call(lvlm, samples, interventions)
    scale = q.shape[-1] ** -0.5
    call = AttentionCall(LAYER, q, k, v, scale, ctx)

    def edits() -> AttentionEdits:
        requests = [r for hook in ctx.plan.attention_hooks if (r := hook.edits(call))]
        return AttentionEdits(**attention.merge_edits(call, requests))

    merged, key_start = edits(), call.layout.key_start
    rows = {"stock SDPA path (no plan)": host_us(
        lambda: sdpa_attention_forward(module, q, k, v, mask, **kwargs))}  # fmt: skip
    with forward_context(ctx):
        rows["our path, VAR+VHR+PAI"] = host_us(
            lambda: attention.lvlm_attention(module, q, k, v, mask, **kwargs)
        )
        rows["  hooks + merge + AttentionEdits"] = host_us(edits)
    rows["  edited_attention (one launch)"] = host_us(
        lambda: edited_attention(q, k, v, scale=scale, key_start=key_start, edits=merged,
                                 validate=False))  # fmt: skip
    rows["  split-K kernel pair, for comparison"] = host_us(
        lambda: decode_attention(q, k, v, scale=scale, key_start=key_start, edits=merged,
                                 validate=False))  # fmt: skip
    rows["one aten op (q * 2), for scale"] = host_us(lambda: q * 2)
    print(f"host µs per call, layer {LAYER}, K = {k.shape[2]} ({torch.cuda.get_device_name()})")
    for name, us in rows.items():
        print(f"{name:40s} {us:8.1f}")


if __name__ == "__main__":
    main()
