"""Cold vs warm decode: the same request twice, ms per token (our loop and a bare Runner loop).

The first run at unseen KV lengths pays cuDNN's per-shape plan building inside SDPA; a repeat
does not. `python benchmarks/decode_warmup.py [--tiny]` prints one line per run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import SIZES, build_llava, sync
from PIL import Image

from lvlm_fix import GenerationParams, Sample
from lvlm_fix.decoding import Runner, build_rows, decode
from lvlm_fix.methods import RowState
from lvlm_fix.search import Limits


def ms_per_token_ours(lvlm, samples, interventions, tokens: int) -> float:
    """Our decode loop, EOS disabled; the clock starts after the first token."""
    plan = lvlm.plan(interventions, GenerationParams(max_new_tokens=tokens))
    limits = Limits(eos_id=-1, pad_id=0, max_new_tokens=tokens, generators=[None] * len(samples))
    start = None
    for step, _ in enumerate(decode(lvlm.model, lvlm.processor, lvlm.info, plan, samples, limits)):
        if step == 1:
            sync(lvlm.device)
            start = time.perf_counter()
    sync(lvlm.device)
    return (time.perf_counter() - start) * 1e3 / (tokens - 1)


def ms_per_token_bare(lvlm, samples, tokens: int) -> float:
    """A bare Runner loop (prefill, then argmax and one forward per step), no search, no views."""
    plan = lvlm.plan([], GenerationParams(max_new_tokens=tokens))
    batch = build_rows(lvlm.processor, lvlm.info.image_token_id, plan, samples, lvlm.device)
    runner = Runner(lvlm.model, batch, plan, RowState(), lvlm.info.num_layers)
    token = runner.prefill().argmax(-1)
    sync(lvlm.device)
    start = time.perf_counter()
    for _ in range(tokens - 1):
        token = runner.forward(token[:, None])[:, -1].argmax(-1)
    sync(lvlm.device)
    return (time.perf_counter() - start) * 1e3 / (tokens - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config on CPU")
    args = parser.parse_args()
    preset = "tiny" if args.tiny else "llava-1.5-7b"
    device = "cpu" if args.tiny else "cuda"
    lvlm = build_llava(preset, device, torch.float32 if args.tiny else torch.bfloat16)
    size = SIZES[preset].image_size
    pixels = np.random.default_rng(0).integers(0, 256, (size * 3 // 4, size + 16, 3), np.uint8)
    samples = [Sample("Please describe this image in detail.", (Image.fromarray(pixels),))]
    vcd = [{"name": "vcd"}]
    for tokens in (64, 256):
        for name, ms in (
            ("ours", ms_per_token_ours(lvlm, samples, [], tokens)),
            ("bare", ms_per_token_bare(lvlm, samples, tokens)),
            ("ours+vcd", ms_per_token_ours(lvlm, samples, vcd, tokens)),
            ("ours", ms_per_token_ours(lvlm, samples, [], tokens)),
        ):
            print(f"{tokens:4d} tokens  {name:9s} {ms:8.2f} ms/token", flush=True)


if __name__ == "__main__":
    main()
