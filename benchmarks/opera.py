"""ms per generated token: plain beam-5 vs our OPERA vs a naive OPERA, in one run.

GPU (default): a LLaVA-1.5-7B-shaped model with random weights in bf16, 512 new tokens, no
early stop (EOS disabled). `--tiny` runs the same architecture at toy sizes on CPU instead.

The naive OPERA has the reference's structure: per token one "main" forward plus C sequential
candidate forwards over the K beams, every one on eager attention with output_attentions=True
(the cache is cropped back after each candidate). It skips rollbacks; each would add a full
re-prefill with the image. Our OPERA: one K·C candidate forward per token on SDPA, the last
layer's row computed by a hook; its rollbacks are included in its time.

    python benchmarks/opera.py --out opera.json            # H100
    python benchmarks/opera.py --tiny --new-tokens 32      # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch
from common import SIZES, build_llava, sync, write_json
from PIL import Image

from lvlm_fix import LVLM, GenerationParams, attention
from lvlm_fix.compat import cache_kwargs, output_cache
from lvlm_fix.decoding import Sample, build_rows, decode
from lvlm_fix.methods.opera_state import candidate_log_probs
from lvlm_fix.search import BeamSearch, Limits, Recording, advance_beams

PROMPT = "Please describe this image in detail."


def timed_decode(lvlm: LVLM, interventions, params, sample, recorder=None):
    """Seconds for one request, and the search it used."""
    plan = lvlm.plan(interventions, params)
    if recorder is not None:
        plan = replace(plan, search=recorder(plan.search))
    limits = Limits(-1, 0, params.max_new_tokens, [None])  # eos -1: never stops early
    sync(lvlm.device)
    start = time.perf_counter()
    for _ in decode(lvlm.model, lvlm.processor, lvlm.info, plan, [sample], limits):
        pass
    sync(lvlm.device)
    return time.perf_counter() - start, plan.search


@torch.inference_mode()
def naive_opera(lvlm: LVLM, sample: Sample, new_tokens: int, K: int = 5, C: int = 5) -> float:
    """The reference's cost structure: (1 + C) eager forwards with all attentions per token."""
    model = lvlm.model
    model.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
    plan = lvlm.plan([], GenerationParams())
    batch = build_rows(lvlm.processor, lvlm.info.image_token_id, plan, [sample], lvlm.device)
    params = GenerationParams(num_beams=K, max_new_tokens=new_tokens)
    limits = Limits(-1, 0, new_tokens, [None])
    beams = BeamSearch(params).start(1, limits, lvlm.device)
    sync(lvlm.device)
    start = time.perf_counter()
    out = model(**_inputs(batch), use_cache=True, output_attentions=True)
    cache, mask = output_cache(out), batch.attention_mask.repeat(K, 1)
    cache.reorder_cache(torch.zeros(K, dtype=torch.long, device=lvlm.device))
    tokens = None
    for _ in range(new_tokens):
        if tokens is not None:  # the reference's "main" forward of the chosen tokens
            mask = torch.cat([mask, mask.new_ones(K, 1)], 1)
            out = model(input_ids=tokens, attention_mask=mask, **cache_kwargs(cache),
                        use_cache=True, output_attentions=True)  # fmt: skip
        logits = out.logits[:, -1].float().expand(K, -1)  # the prefill has one row
        cand_z, cand_ids = logits.topk(C, -1)
        cand_mask = torch.cat([mask, mask.new_ones(K, 1)], 1)
        for c in range(C):  # one candidate at a time, cache cropped back after each
            cand = model(input_ids=cand_ids[:, c : c + 1], attention_mask=cand_mask,
                         **cache_kwargs(cache), use_cache=True, output_attentions=True)  # fmt: skip
            row = cand.attentions[-1][:, :, -1].float().max(1).values  # what the penalty reads
            del row
            cache.crop(-1)
        log_probs = candidate_log_probs(cand_ids, cand_z, logits.shape[-1])
        step = advance_beams(beams, log_probs[None], params)
        cache.reorder_cache(step.parents[0])
        mask = mask[step.parents[0]]
        tokens = step.tokens[0][:, None]
    sync(lvlm.device)
    model.set_attn_implementation({"text_config": attention.NAME, "vision_config": "sdpa"})
    return time.perf_counter() - start


def _inputs(batch) -> dict:
    return {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "pixel_values": batch.pixel_values,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    preset = "tiny" if args.tiny else "llava-1.5-7b"
    device, dtype = ("cpu", torch.float32) if args.tiny else ("cuda", torch.bfloat16)
    lvlm = build_llava(preset, device, dtype)
    size = SIZES[preset].image_size
    sample = Sample(PROMPT, (Image.new("RGB", (size, size), (120, 80, 200)),))
    n = args.new_tokens
    timed_decode(lvlm, [], GenerationParams(num_beams=5, max_new_tokens=4), sample)  # warm-up
    results = {"device": str(lvlm.device), "new_tokens": n, "model": lvlm.info.name}
    beam, _ = timed_decode(lvlm, [], GenerationParams(num_beams=5, max_new_tokens=n), sample)
    results["beam5_ms_per_token"] = 1000 * beam / n
    opera, search = timed_decode(
        lvlm, [{"name": "opera"}], GenerationParams(max_new_tokens=n), sample, Recording
    )
    results["opera_ms_per_token"] = 1000 * opera / n
    results["opera_rollbacks"] = sum(len(s.rollbacks) for s in search.state.samples)
    if not args.skip_naive:
        results["naive_opera_ms_per_token"] = 1000 * naive_opera(lvlm, sample, n) / n
    if lvlm.device.type == "cuda":
        results["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(f"{'method':<14}{'ms/token':>10}{'x beam-5':>10}")
    for key in ("beam5", "opera", "naive_opera"):
        if f"{key}_ms_per_token" in results:
            ms = results[f"{key}_ms_per_token"]
            print(f"{key:<14}{ms:>10.2f}{ms / results['beam5_ms_per_token']:>10.2f}")
    print(json.dumps(results, indent=2))
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
