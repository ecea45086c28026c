"""Decode speed of the view methods: ms per generated token, batched views vs a naive loop.

LLaVA-1.5-7B's architecture with random weights (speed does not depend on weight values), bf16,
CHAIR-length generation: 512 new tokens and no early stop (EOS is set to an id no token has).

Rows:
- ours:  `lvlm_fix.decoding.decode`; every view of every sample is a row of ONE batched forward.
- naive: the reference repos' layout; each view has its own cache and its own forward per step,
         run one after another (views of all samples of one kind share a forward).
- hf:    transformers' `generate` (greedy and beam only), with `min_new_tokens` to hold off EOS.

    python benchmarks/decoding.py --out decoding.json            # GPU, LLaVA-1.5-7B config
    python benchmarks/decoding.py --tiny --out /tmp/decoding.json  # CPU smoke run, tiny config
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import SIZES, build_llava, sync, write_json
from PIL import Image

from lvlm_fix import LVLM, GenerationParams, Sample
from lvlm_fix.decoding import Runner, build_rows, combine_views, decode
from lvlm_fix.methods import RowState
from lvlm_fix.model import ImageLayout, PromptBatch
from lvlm_fix.search import Limits

NO_EOS = -1  # no token has this id, so generation always runs to max_new_tokens
CAPTION = "Please describe this image in detail."

METHODS: dict[str, tuple[list[dict], int]] = {  # name -> (interventions, num_beams)
    "greedy": ([], 1),
    "ritual": ([{"name": "ritual"}], 1),
    "vcd": ([{"name": "vcd"}], 1),
    "ritual+vcd": ([{"name": "ritual"}, {"name": "vcd"}], 1),
    "beam-5": ([], 5),
}


def make_samples(batch: int, image_size: int) -> list[Sample]:
    rng = np.random.default_rng(0)
    shape = (image_size * 3 // 4 + 8, image_size + 16, 3)  # not square: the processor resizes
    images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(batch)]
    return [Sample(CAPTION, (image,), seed=i) for i, image in enumerate(images)]


def _limits(lvlm: LVLM, samples: list[Sample], tokens: int) -> Limits:
    generators = [torch.Generator(device=lvlm.device).manual_seed(s.seed) for s in samples]
    return Limits(eos_id=NO_EOS, pad_id=0, max_new_tokens=tokens, generators=generators)


def time_ours(lvlm: LVLM, method: str, samples: list[Sample], tokens: int) -> tuple[float, float]:
    """(prefill + first token ms, ms per later token) of the library's batched decode loop."""
    specs, beams = METHODS[method]
    plan = lvlm.plan(specs, GenerationParams(max_new_tokens=tokens, num_beams=beams))
    limits = _limits(lvlm, samples, tokens)
    events = decode(lvlm.model, lvlm.processor, lvlm.info, plan, samples, limits)
    sync(lvlm.device)
    start = time.perf_counter()
    first, steps = None, 0
    for event in events:
        if event.tokens is not None:
            steps += 1
            if first is None:
                sync(lvlm.device)
                first = time.perf_counter()
    sync(lvlm.device)
    end = time.perf_counter()
    return (first - start) * 1e3, (end - first) * 1e3 / max(steps - 1, 1)


def _rows(batch: PromptBatch, rows: list[int]) -> PromptBatch:
    """The sub-batch of `rows` (their own cache in the naive loop)."""
    index = torch.tensor(rows, device=batch.input_ids.device)
    images = [i for r in rows for i in (batch.image_rows == r).nonzero().flatten().tolist()]
    return PromptBatch(
        input_ids=batch.input_ids[index],
        attention_mask=batch.attention_mask[index],
        pixel_values=batch.pixel_values[images] if images else None,
        image_sizes=None,
        image_rows=torch.arange(len(images), device=index.device),
        layout=ImageLayout(batch.layout.image_mask[index], batch.layout.key_start[index]),
    )


def time_naive(lvlm: LVLM, method: str, samples: list[Sample], tokens: int) -> tuple[float, float]:
    """Views one after another: one forward per view per step, each with its own cache."""
    specs, _ = METHODS[method]
    plan = lvlm.plan(specs, GenerationParams(max_new_tokens=tokens))
    n_views, device = plan.n_views, lvlm.device
    empty = lvlm.plan([], GenerationParams(max_new_tokens=tokens))
    sync(device)
    start = time.perf_counter()
    batch = build_rows(lvlm.processor, lvlm.info.image_token_id, plan, samples, device)
    runners = [
        Runner(lvlm.model, _rows(batch, list(range(v, len(samples) * n_views, n_views))),
               empty, RowState(), lvlm.info.num_layers)
        for v in range(n_views)
    ]  # fmt: skip
    logits = [runner.prefill() for runner in runners]  # per view: [B, V]
    for step in range(tokens):
        stacked = torch.stack(logits, 1).flatten(0, 1)  # [B * views, V], sample-major
        token = combine_views(stacked, plan, step, 1)[:, 0].argmax(-1)  # [B]
        if step == 0:
            sync(device)
            first = time.perf_counter()
        if step + 1 < tokens:
            logits = [runner.forward(token[:, None])[:, -1] for runner in runners]
    sync(device)
    end = time.perf_counter()
    return (first - start) * 1e3, (end - first) * 1e3 / max(tokens - 1, 1)


def time_hf(lvlm: LVLM, method: str, samples: list[Sample], tokens: int) -> tuple[float, float]:
    """transformers' generate; ms/token from a 1-token run and a full run."""
    _, beams = METHODS[method]
    prompts = [lvlm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.text}]}],
        add_generation_prompt=True) for s in samples]  # fmt: skip
    inputs = lvlm.processor(
        text=prompts, images=[s.images[0] for s in samples], padding=True, return_tensors="pt"
    ).to(lvlm.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(lvlm.model.dtype)

    def run(n: int) -> float:
        sync(lvlm.device)
        start = time.perf_counter()
        lvlm.model.generate(
            **inputs, max_new_tokens=n, min_new_tokens=n, num_beams=beams, do_sample=False
        )
        sync(lvlm.device)
        return (time.perf_counter() - start) * 1e3

    one = run(1)
    return one, (run(tokens) - one) / max(tokens - 1, 1)


IMPLS = {"ours": time_ours, "naive": time_naive, "hf": time_hf}


def plan_rows() -> list[tuple[str, str]]:
    rows = []
    for method, (specs, _) in METHODS.items():
        rows.append((method, "ours"))
        rows.append((method, "naive" if specs else "hf"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config on CPU, few tokens")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens (512; tiny: 16)")
    parser.add_argument("--batch", type=int, default=1, help="samples per request")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    preset = "tiny" if args.tiny else "llava-1.5-7b"
    device = args.device or ("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    tokens = args.tokens or (16 if args.tiny else 512)

    lvlm = build_llava(preset, device, dtype)
    samples = make_samples(args.batch, SIZES[preset].image_size)
    results = []
    for method, impl in plan_rows():
        # Warm up over the full length: cuDNN attention builds a plan per new KV length, so a
        # first run at unseen lengths is 2-3x slower per token than a repeat (measured on H100).
        IMPLS[impl](lvlm, method, samples, tokens)
        prefill_ms, ms_per_token = IMPLS[impl](lvlm, method, samples, tokens)
        results.append(
            {
                "method": method,
                "impl": impl,
                "batch": args.batch,
                "new_tokens": tokens,
                "prefill_ms": round(prefill_ms, 2),
                "ms_per_token": round(ms_per_token, 3),
            }
        )
        print(f"{method:>11} {impl:>6}: {ms_per_token:8.2f} ms/token", flush=True)
    print_table(results, lvlm.info.name, device, dtype)
    if args.out:
        meta = {"model": lvlm.info.name, "device": _device_name(device), "dtype": str(dtype)}
        write_json(args.out, {"meta": meta, "results": results})


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def print_table(results: list[dict], model: str, device: str, dtype: torch.dtype) -> None:
    base = {r["impl"]: r["ms_per_token"] for r in results if r["method"] == "greedy"}["ours"]
    print(f"\n{model}, {_device_name(device)}, {dtype}, batch {results[0]['batch']}, "
          f"{results[0]['new_tokens']} new tokens (no EOS)")  # fmt: skip
    print("| method | impl | prefill+1st ms | ms/token | x greedy (ours) |")
    print("|---|---|---|---|---|")
    for r in results:
        ratio = r["ms_per_token"] / base
        print(f"| {r['method']} | {r['impl']} | {r['prefill_ms']:.1f} | "
              f"{r['ms_per_token']:.2f} | {ratio:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
