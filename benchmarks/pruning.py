"""Prefill cost of visual token pruning: FastV and FlowCut vs the unpruned model.

LLaVA-1.5-7B and LLaVA-NeXT-7B architectures with random weights (cost does not depend on
weight values), bf16, one image per sample, batch 1 by default (`--batch`). Per configuration:
- prefill_ms: `Runner.prefill` (vision tower + projector + LLM over the prompt), median of runs;
- peak_mib:   peak GPU memory allocated during that prefill;
- ttft_ms:    time to first token through the whole pipeline (`LVLM.generate`, one new token:
              processor, row building, prefill, first token).
Image tokens: LLaVA-1.5 576 -> 192/128/64. LLaVA-NeXT (anyres, 672x672 -> 4 crops + base, about
2.9k tokens) -> 640/320/160: FastV at layer 2; FlowCut with budget/2 patches per crop in the tower,
then the budget per sample from LLM layer 2 on. Columns: llm_tokens / image_tokens = tokens entering
LLM layer 0 (all / image), image_tokens_last = image tokens the last LLM layer sees.

    python benchmarks/pruning.py --out pruning.json          # GPU (H100), both 7B configs
    python benchmarks/pruning.py --batch 8 --out pruning8.json  # compute-bound regime
    python benchmarks/pruning.py --tiny --out /tmp/p.json    # CPU smoke run, tiny configs

At batch 1 a 7B prefill of ~100 tokens is bound by reading the 14 GB of weights (about 4-5 ms
on an H100), which caps the speed-up of any token pruning; `--batch 8` shows the FLOP regime.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import numpy as np
import torch
from common import CORPUS, SIZES, Sizes, llava_config, sync, write_json
from PIL import Image
from transformers import (
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
)

from lvlm_fix import LVLM, GenerationParams, Sample
from lvlm_fix.decoding import Runner, build_rows
from lvlm_fix.methods.base import RowState
from lvlm_fix.plan import compile_plan
from lvlm_fix.tiny import CHAT_TEMPLATE, llava_processor, train_tokenizer

QUESTION = "Is there a dog in the image? Answer yes or no."
FULL = SIZES["llava-1.5-7b"]
# FlowCut needs vision layers before the read layer: 8 layers, 64 patches.
TINY = replace(SIZES["tiny"], vision_layers=8, image_size=64)


def build(family: str, sizes: Sizes, device: str, dtype: torch.dtype) -> LVLM:
    """A random-weight LLaVA-1.5, or LLaVA-NeXT with the same parts (anyres up to 2x2 crops)."""
    tokenizer = train_tokenizer(CORPUS)
    tokenizer.padding_side = "left"
    config = llava_config(sizes, tokenizer)
    processor = llava_processor(tokenizer, sizes.image_size, sizes.patch_size)
    model_class = LlavaForConditionalGeneration
    if family == "llava_next":
        side = sizes.image_size
        grid = [[side, 2 * side], [2 * side, side], [2 * side, 2 * side], [3 * side, side]]
        config = LlavaNextConfig(
            vision_config=config.vision_config,
            text_config=config.text_config,
            image_token_id=config.image_token_id,
            vision_feature_layer=sizes.feature_layer,
            vision_feature_select_strategy=sizes.feature_strategy,
            image_grid_pinpoints=grid,
        )
        model_class = LlavaNextForConditionalGeneration
        crop = {"height": side, "width": side}
        processor = LlavaNextProcessor(
            image_processor=LlavaNextImageProcessorPil(
                size={"shortest_edge": side}, crop_size=crop, image_grid_pinpoints=grid
            ),
            tokenizer=tokenizer,
            patch_size=sizes.patch_size,
            vision_feature_select_strategy=sizes.feature_strategy,
            chat_template=CHAT_TEMPLATE,
            num_additional_image_tokens=1,
        )
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype).eval()
    return LVLM(model, processor, name=f"{family}-{sizes.name}")


def configurations(
    family: str, n_image: int, n_patches: int, tiny: bool
) -> list[tuple[str, list[dict]]]:
    """(label, interventions): unpruned, then FastV and FlowCut at each budget."""
    if family == "llava":
        budgets = [32, 16, 8] if tiny else [192, 128, 64]
    else:  # NeXT: 2880 patches (5 crops x 576, newlines aside) -> 640/320/160
        budgets = [n_patches * b // 2880 for b in (640, 320, 160)]
    rows = [(f"unpruned {n_image}", [])]
    rows += [(f"fastv K=2 {b}", [{"name": "fastv", "layer": 2, "keep": b}]) for b in budgets]
    rows += [(f"flowcut {b}", [{"name": "flowcut", "budget": b}]) for b in budgets]
    return rows


def measure(lvlm: LVLM, samples: list[Sample], interventions: list[dict], runs: int) -> dict:
    """Median prefill time, peak memory of one prefill, median time to first token."""
    device = lvlm.device
    plan = compile_plan(interventions, lvlm.info, GenerationParams(max_new_tokens=1))
    batch = build_rows(lvlm.processor, lvlm.info.image_token_id, plan, samples, device)
    state = RowState.start(plan.views, len(samples), device)
    prefill, ttft, peak = [], [], 0
    for run in range(runs + 1):  # the first run warms up
        runner = Runner(lvlm.model, batch, plan, state, lvlm.info.num_layers)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        runner.prefill()
        sync(device)
        elapsed = time.perf_counter() - start
        if device.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated(device))
        layout = runner.layout  # per-layer columns after the cuts
        del runner
        start = time.perf_counter()
        lvlm.generate(samples, interventions, GenerationParams(max_new_tokens=1))
        sync(device)
        if run:
            prefill.append(elapsed)
            ttft.append(time.perf_counter() - start)
    first = layout.columns_at(0)  # anyres FlowCut drops tokens before LLM layer 0
    last = lvlm.info.num_layers - 1
    return {
        "llm_tokens": int(batch.attention_mask.sum() if first is None else (first >= 0).sum()),
        "image_tokens": int(layout.at_layer(0).n_image.sum()),
        "image_tokens_last": int(layout.at_layer(last).n_image.sum()),
        "prefill_ms": 1e3 * statistics.median(prefill),
        "ttft_ms": 1e3 * statistics.median(ttft),
        "peak_mib": peak / 2**20,
    }


def run_family(family: str, sizes: Sizes, device: str, dtype, args) -> list[dict]:
    lvlm = build(family, sizes, device, dtype)
    rng = np.random.default_rng(0)
    side = sizes.image_size * (2 if family == "llava_next" else 1)
    image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    sample = Sample(QUESTION, (image,))
    n_image = int(build_rows(lvlm.processor, lvlm.info.image_token_id,
                             compile_plan([], lvlm.info, GenerationParams()), [sample],
                             lvlm.device).layout.n_image.sum())  # fmt: skip
    crops = 5 if family == "llava_next" else 1  # the square image: base + 2x2 sub-crops
    n_patches = crops * (sizes.image_size // sizes.patch_size) ** 2
    results = []
    samples = [sample] * args.batch
    for label, interventions in configurations(family, n_image, n_patches, args.tiny):
        row = {"model": family, "config": label, "batch": args.batch}
        row.update(measure(lvlm, samples, interventions, args.runs))
        print(
            f"{family:10s} {label:18s} tokens {row['llm_tokens']:5d}  "
            f"image {row['image_tokens']:5d} -> {row['image_tokens_last']:5d}  "
            f"prefill {row['prefill_ms']:8.2f} ms  ttft {row['ttft_ms']:8.2f} ms  "
            f"peak {row['peak_mib']:8.0f} MiB",
            flush=True,
        )
        results.append(row)
    del lvlm
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return results


def print_table(results: list[dict]) -> None:
    print("\n| model | config | LLM tokens | prefill ms | speed-up | TTFT ms | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for row in results:
        base = next(r for r in results if r["model"] == row["model"])["prefill_ms"]
        print(
            f"| {row['model']} | {row['config']} | {row['llm_tokens']} | "
            f"{row['prefill_ms']:.2f} | {base / row['prefill_ms']:.2f}x | "
            f"{row['ttft_ms']:.2f} | {row['peak_mib']:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs on CPU (smoke run)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1, help="samples per prefill")
    parser.add_argument("--families", default="llava,llava_next")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.tiny:
        sizes, device, dtype = TINY, "cpu", torch.float32
    else:
        sizes, device, dtype = FULL, "cuda", torch.bfloat16
    results = []
    with torch.inference_mode():
        for family in args.families.split(","):
            results += run_family(family, sizes, device, dtype, args)
    print_table(results)
    if args.out:
        info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
        write_json(args.out, {"setup": {**info, "dtype": str(dtype)}, "results": results})


if __name__ == "__main__":
    main()
