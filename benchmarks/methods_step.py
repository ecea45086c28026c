"""Per-step cost of each attention method in the engine: prefill ms and ms per decode step.

LLaVA-1.5-7B's architecture with random weights, bf16, one request at a time (batch 1), 128 new
tokens with EOS ignored. Each row reports which attention paths ran (`Generation.attention_paths`):
methods stated as built-in edits decode in the engine's shared batch on the fused kernel; methods
stated as modifiers decode in a lane of their own on the plain-torch path.

    python benchmarks/methods_step.py --out methods_step.json            # GPU, 7B config
    python benchmarks/methods_step.py --tiny --out /tmp/methods_step.json  # CPU smoke run
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
from common import SIZES, build_llava, write_json
from PIL import Image

from lvlm_fix import GenerationParams, Sample, parse_intervention

ROWS = {  # name -> intervention specs
    "none": [],
    "var+vhr+pai": [{"name": "var"}, {"name": "vhr"}, {"name": "pai"}],
    "gift": [{"name": "gift"}],
    "act": [{"name": "act"}],
    "paint": [{"name": "paint"}],
}


def measure(lvlm, specs, sample: Sample, new_tokens: int, repeats: int) -> dict:
    params = GenerationParams(max_new_tokens=new_tokens, ignore_eos=True)
    runs = []
    for _ in range(repeats + 1):  # the first run warms up
        request = lvlm.submit([sample], specs, params)
        [generation] = request.result()
        timing = request.timing
        steps = len(generation.token_ids) - 1
        runs.append((timing.prefill_s * 1e3, timing.decode_s * 1e3 / max(steps, 1)))
    prefill = statistics.median(r[0] for r in runs[1:])
    step = statistics.median(r[1] for r in runs[1:])
    return {"prefill_ms": prefill, "step_ms": step, "paths": generation.attention_paths}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run at toy sizes")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    preset = "tiny" if args.tiny else "llava-1.5-7b"
    lvlm = build_llava(preset, device, dtype)
    size = SIZES[preset].image_size
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    sample = Sample("Please describe this image in detail.", (image,))
    results = {}
    print(f"{'method':<14}{'prefill ms':>12}{'step ms':>10}{'x none':>8}  paths", flush=True)
    for name in args.rows.split(","):
        specs = [parse_intervention(spec) for spec in ROWS[name]]
        results[name] = measure(lvlm, specs, sample, args.new_tokens, args.repeats)
        r = results[name]
        ratio = r["step_ms"] / results["none"]["step_ms"] if "none" in results else float("nan")
        print(f"{name:<14}{r['prefill_ms']:>12.1f}{r['step_ms']:>10.2f}{ratio:>8.2f}  "
              f"{','.join(r['paths'])}", flush=True)  # fmt: skip
    lvlm.close()
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    write_json(args.out, {"device": device_name, "preset": preset, "rows": results})


if __name__ == "__main__":
    main()
