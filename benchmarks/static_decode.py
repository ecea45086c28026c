"""Where a decode step's time goes: eager steps vs static steps replayed from a CUDA graph.

    python benchmarks/static_decode.py --out static_decode.json            # H100, LLaVA-1.5-7B
    python benchmarks/static_decode.py --batch 8 --out static_decode8.json

Per method (none, VAR, VHR, PAI, VAR+VHR+PAI), after one prefill (random bf16 weights); every
method is measured twice and the second pass is kept (the first compiles kernels and builds
cuDNN's plans for each KV length an eager step meets):
- eager_ms:   a `Runner.forward` step over the DynamicCache (median of 8 steps);
- first_ms:   the first static step: the static cache built from the prompt's KV, one eager step
              over it, and the capture of the step;
- step_ms:    a later static step through `Runner.forward` (input writes + replay; median of 16);
- replay_ms:  `graph.replay()` alone, back to back (GPU time per step; mean of 20);
- kernel_ms:  summed CUDA kernel time of one replay (torch.profiler).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from common import build_llava, sync, write_json  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from lvlm_fix import Sample  # noqa: E402
from lvlm_fix.decoding import Runner, _after_prefill_rows, build_rows  # noqa: E402
from lvlm_fix.methods.base import RowState  # noqa: E402

QUESTION = "Please help me describe the image in detail."


def runner_for(lvlm, samples, interventions, static_steps: int) -> Runner:
    plan = lvlm.plan(interventions)
    batch = build_rows(lvlm.processor, lvlm.info.image_token_id, plan, samples, lvlm.device)
    state = RowState.start(plan.views, len(samples), lvlm.device)
    runner = Runner(lvlm.model, batch, plan, state, lvlm.info.num_layers, static_steps)
    with torch.inference_mode():
        runner.prefill()
    runner.select_rows(_after_prefill_rows(plan, len(samples), 1, lvlm.device))
    return runner


def seconds(fn) -> float:
    sync("cuda")
    start = time.perf_counter()
    fn()
    sync("cuda")
    return time.perf_counter() - start


def measure(lvlm, samples, interventions) -> dict:
    token = torch.full((len(samples), 1), 100, device="cuda")
    eager = runner_for(lvlm, samples, interventions, static_steps=0)
    eager.forward(token)  # compile and warm
    eager_ms = statistics.median(seconds(lambda: eager.forward(token)) for _ in range(8)) * 1e3
    static = runner_for(lvlm, samples, interventions, static_steps=64)
    first_ms = seconds(lambda: static.forward(token)) * 1e3
    step_ms = statistics.median(seconds(lambda: static.forward(token)) for _ in range(16)) * 1e3
    graph = static.static.graph

    def replays() -> None:
        for _ in range(20):
            graph.replay()

    replay_ms = seconds(replays) / 20 * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        sync("cuda")
    kernel_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    return {"eager_ms": eager_ms, "first_ms": first_ms, "step_ms": step_ms,
            "replay_ms": replay_ms, "kernel_ms": kernel_ms}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA (the static steps replay CUDA graphs)")
    from attention import make_images  # the same images as the attention benchmark

    lvlm = build_llava("llava-1.5-7b", "cuda", torch.bfloat16)
    samples = [Sample(QUESTION, (image,)) for image in make_images(args.batch)]
    var = {"name": "var", "tau": 1.5, "sink_dims": [1415, 2533]}  # random weights: low tau
    settings = {"none": [], "var": [var], "vhr": [{"name": "vhr"}], "pai": [{"name": "pai"}],
                "var+vhr+pai": [var, {"name": "vhr"}, {"name": "pai"}]}  # fmt: skip
    rows = {}
    print(f"batch {args.batch}, ms: eager step | first static step | static step | replay | "
          "kernels")  # fmt: skip
    for name, interventions in settings.items():
        measure(lvlm, samples, interventions)  # warm-up pass
        rows[name] = r = measure(lvlm, samples, interventions)
        print(f"{name:12} {r['eager_ms']:8.2f} {r['first_ms']:8.1f} {r['step_ms']:8.2f} "
              f"{r['replay_ms']:8.2f} {r['kernel_ms']:8.2f}", flush=True)  # fmt: skip
    write_json(args.out, {"device": torch.cuda.get_device_name(), "batch": args.batch,
                          "torch": torch.__version__, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
