"""Edited attention kernels against SDPA at LLaVA-1.5-7B shapes (H=32, D=128, 576 image columns).

Prefill (Q=K=640) and decode (Q=1, K=640..1200), B=1 and B=4 with left padding, with no edits
and with all edits (VAR + PAI + head scale, and the same plus both statistics). Two clocks:
  graph  the calls captured in one CUDA graph over several input sets (L2 cold, no launch
         overhead): the kernels' own time, median of replays, per call;
  eager  triton.testing.do_bench on one call (median; includes Python and launch overhead).
SDPA gets the mask transformers would give it: is_causal without padding, a boolean mask with.
It is timed alone (without the transpose transformers does after it; our kernels write
[B, Q, H, D] directly). `--sweep` also times candidate tile configs of our kernels.

    python benchmarks/attention_kernels.py --out attention_kernels.json [--sweep]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import triton
import triton.testing

from lvlm_fix.kernels import AttentionEdits
from lvlm_fix.kernels import reference as ref
from lvlm_fix.kernels import triton_attention as ta

H, D, N_IMAGE, PREFIX = 32, 128, 576, 5
L2_FLUSH_BYTES = 256 * 2**20  # input sets per graph cover this many bytes


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "prefill" or "decode"
    B: int
    Q: int
    K: int
    key_start: tuple[int, ...]


CASES = [
    Case("prefill B1 Q=K=640", "prefill", 1, 640, 640, (0,)),
    Case("prefill B4 Q=K=640 ragged", "prefill", 4, 640, 640, (0, 7, 21, 48)),
    Case("decode B1 K=640", "decode", 1, 1, 640, (0,)),
    Case("decode B1 K=1200", "decode", 1, 1, 1200, (0,)),
    Case("decode B4 K=1200 ragged", "decode", 4, 1, 1200, (0, 7, 21, 48)),
]

PREFILL_SWEEP = {
    "none": [(64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 3), (64, 32, 4, 3)],
    "all": [(64, 32, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2), (64, 32, 4, 4)],
}
DECODE_SWEEP = [  # (block_n, warps, stages, programs per SM)
    (64, 4, 3, 2), (64, 4, 2, 2), (32, 4, 3, 2), (64, 4, 3, 1), (128, 4, 2, 2), (64, 2, 3, 2),
]  # fmt: skip


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 0):
    """Enough (q, k, v) sets to push each other out of L2, and the column layout."""
    g = torch.Generator("cuda").manual_seed(seed)
    per_set = (case.B * H * (case.Q + 2 * case.K) * D) * torch.finfo(dtype).bits // 8
    n_sets = max(2, min(16, math.ceil(L2_FLUSH_BYTES / per_set)))
    sets = []
    for _ in range(n_sets):
        q = torch.randn(case.B, H, case.Q, D, device="cuda", generator=g, dtype=dtype)
        k = torch.randn(case.B, H, case.K, D, device="cuda", generator=g, dtype=dtype)
        v = torch.randn(case.B, H, case.K, D, device="cuda", generator=g, dtype=dtype)
        sets.append((q, k, v))
    key_start = torch.tensor(case.key_start, device="cuda", dtype=torch.int64)
    col_group = torch.zeros(case.B, case.K, dtype=torch.int8, device="cuda")
    for b, s in enumerate(case.key_start):
        col_group[b, s] = 1
        col_group[b, s + PREFIX : s + PREFIX + N_IMAGE] = 3
        col_group[b, [s + PREFIX + 10, s + PREFIX + 200, s + PREFIX + 401]] = 2
    return sets, key_start, col_group


def make_edits(case: Case, key_start, col_group, kind: str) -> AttentionEdits:
    if kind == "none":
        return AttentionEdits()
    gain_rows = torch.zeros(case.B, case.Q, dtype=torch.bool, device="cuda")
    gain_rows[:, -1] = True  # PAI: the last row
    rows = torch.arange(case.Q, device="cuda")
    image_end = key_start + PREFIX + N_IMAGE - (case.K - case.Q)
    return AttentionEdits(
        col_group=col_group,
        image_gain=torch.full((case.B, H), 0.2, device="cuda"),
        gain_rows=gain_rows,
        var_rows=rows[None, :] >= image_end[:, None],
        var_keep=0.6,
        head_scale=torch.full((case.B, H), 2.0, device="cuda"),
        want_group_mass=kind == "all+stats",
        want_last_row=kind == "all+stats",
    )


def sdpa_fn(case: Case, key_start):
    padded = any(case.key_start)
    mask = ref.visibility(key_start, case.Q, case.K) if padded else None
    causal = not padded and case.Q > 1

    def call(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=D**-0.5
        )

    return call


def ours_fn(case: Case, key_start, edits, config=None):
    kernel = ta.prefill_attention if case.kind == "prefill" else ta.decode_attention

    def call(q, k, v):
        return kernel(q, k, v, scale=D**-0.5, key_start=key_start, edits=edits, config=config)

    return call


def graph_ms(fn, sets) -> float:
    """Per-call kernel time: one CUDA graph calls fn on every input set; median of replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for qkv in sets:  # compile and warm up outside the capture
            fn(*qkv)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for qkv in sets:
            fn(*qkv)
    graph.replay()
    times = []
    for _ in range(50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(sets))
    return statistics.median(times)


def eager_ms(fn, sets) -> float:
    return triton.testing.do_bench(lambda: fn(*sets[0]), warmup=25, rep=100, return_mode="median")


def work(case: Case) -> dict[str, float]:
    """The floor's two numbers: matmul flops (causal half at prefill) and K/V/Q/out bytes."""
    visible = case.Q * case.K - (case.Q * (case.Q - 1) // 2 if case.Q > 1 else 0)
    flops = 4 * case.B * H * visible * D
    nbytes = 2 * case.B * H * (2 * case.K + 2 * case.Q) * D
    return {"gflop": flops / 1e9, "mbytes": nbytes / 1e6}


def run_table(dtype: torch.dtype) -> list[dict]:
    rows = []
    for case in CASES:
        sets, key_start, col_group = make_inputs(case, dtype)
        fns = {"sdpa": sdpa_fn(case, key_start)}
        for kind in ("none", "all", "all+stats"):
            fns[f"ours {kind}"] = ours_fn(
                case, key_start, make_edits(case, key_start, col_group, kind)
            )
        for name, fn in fns.items():
            g, e = graph_ms(fn, sets), eager_ms(fn, sets)
            rows.append({"case": case.name, "impl": name, "dtype": str(dtype)[6:],
                         "graph_us": g * 1e3, "eager_us": e * 1e3, **work(case)})  # fmt: skip
        del sets
    return rows


def sweep(dtype: torch.dtype, budget_s: float) -> list[dict]:
    """Time candidate configs on the main shapes; stops when the time budget is spent."""
    t0, rows = time.time(), []
    for case in (CASES[0], CASES[1], CASES[3], CASES[4]):
        sets, key_start, col_group = make_inputs(case, dtype)
        for kind in ("none", "all"):
            edits = make_edits(case, key_start, col_group, kind)
            if case.kind == "prefill":
                configs = [ta.KernelConfig(*c) for c in PREFILL_SWEEP[kind]]
            else:
                configs = [ta.KernelConfig(16, bn, w, s, p) for bn, w, s, p in DECODE_SWEEP]
            for cfg in configs:
                if time.time() - t0 > budget_s:
                    return rows
                try:
                    us = graph_ms(ours_fn(case, key_start, edits, cfg), sets) * 1e3
                except Exception as err:  # a config that does not fit (shared memory) is skipped
                    us = float("nan")
                    print(f"  {case.name} {kind} {cfg}: {type(err).__name__}: {str(err)[:120]}")
                rows.append(
                    {"case": case.name, "edits": kind, "config": asdict(cfg), "graph_us": us}
                )
                print(f"  sweep {case.name:28s} {kind:5s} {cfg} {us:8.1f} us", flush=True)
        del sets
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'case':28s} {'dtype':9s} {'impl':15s} {'graph us':>9s} {'eager us':>9s} "
          f"{'TFLOP/s':>8s} {'GB/s':>7s} {'vs sdpa':>8s}")  # fmt: skip
    base = {(r["case"], r["dtype"]): r["graph_us"] for r in rows if r["impl"] == "sdpa"}
    for r in rows:
        us = r["graph_us"]
        print(f"{r['case']:28s} {r['dtype']:9s} {r['impl']:15s} {us:9.1f} {r['eager_us']:9.1f} "
              f"{r['gflop'] / us * 1e3:8.1f} {r['mbytes'] / us * 1e3:7.0f} "
              f"{us / base[(r['case'], r['dtype'])]:8.2f}x")  # fmt: skip


def print_best(rows: list[dict]) -> None:
    best: dict[tuple[str, str], dict] = {}
    for r in rows:
        key = (r["case"], r["edits"])
        if not math.isnan(r["graph_us"]) and r["graph_us"] < best.get(key, r)["graph_us"] + 1e-9:
            best[key] = r
    print("\nbest configs (bf16):")
    for (case, edits), r in best.items():
        print(f"  {case:28s} {edits:5s} {r['graph_us']:8.1f} us  {r['config']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="attention_kernels.json", help="JSON results path")
    parser.add_argument("--dtypes", default="bf16,fp16", help="comma list of bf16, fp16")
    parser.add_argument("--sweep", action="store_true", help="also time candidate tile configs")
    parser.add_argument("--sweep-budget", type=float, default=150.0, help="seconds for --sweep")
    args = parser.parse_args()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    env = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
    }
    print(env)
    rows = []
    for name in args.dtypes.split(","):
        rows += run_table(dtypes[name])
    result = {"env": env, "rows": rows}
    if args.sweep:
        result["sweep"] = sweep(torch.bfloat16, args.sweep_budget)
        print_best(result["sweep"])
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print_table(rows)


if __name__ == "__main__":
    main()
