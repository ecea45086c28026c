"""Attention interventions benchmark: fused kernel vs SDPA, and end-to-end decode speed.

    python benchmarks/attention.py --out results/attention.json          # H100, LLaVA-1.5-7B shape
    python benchmarks/attention.py --tiny --out /tmp/attention.json      # CPU, tiny config

The model has LLaVA-1.5-7B's configuration (Vicuna-7B + CLIP ViT-L/336, 576 image tokens) with
random weights in bf16: speed does not depend on the weights. Two parts, one run:

1. Kernel: `edited_attention` (Triton on CUDA) against PyTorch SDPA on one layer's shapes, at
   prefill (the whole prompt) and decode (one query row), with no edit, PAI, VAR, VHR and all three
   (do_bench, launch overhead included). On CUDA it also runs the kernels' own benchmark table
   (benchmarks/attention_kernels.py: CUDA-graph timings, ragged batches) into "kernel_graph".
2. End to end: tokens/s with no intervention, VAR, VHR, PAI and VAR+VHR+PAI, on our engine
   (`LVLM.generate`: decode steps replayed from CUDA graphs over the engine's slots), on the
   per-request eager loop with our attention (`decoding.decode`; none and VAR+VHR+PAI only), and
   on the eager path the reference repositories use: the same loop with transformers' eager
   attention over a DynamicCache, and for the methods our plain-torch oracle (materialised fp32
   probabilities) on every layer.

Random weights have no massive activations, so VAR gets a low `tau` here to find sinks.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import build_llava, sync, timer, write_json  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

from lvlm_fix import LVLM, GenerationParams, Sample, attention  # noqa: E402
from lvlm_fix.decoding import decode  # noqa: E402
from lvlm_fix.hooks import AttentionCall, current  # noqa: E402
from lvlm_fix.kernels import AttentionEdits, edited_attention, reference  # noqa: E402
from lvlm_fix.search import Limits  # noqa: E402

ORACLE = "lvlm_fix_oracle"
QUESTION = "Please help me describe the image in detail."


def build_lvlm(shape: str, device: str, dtype: torch.dtype) -> LVLM:
    """The shared random-weight LLaVA, with the oracle attention registered for the eager rows."""
    lvlm = build_llava(shape, device, dtype)
    AttentionInterface.register(ORACLE, oracle_attention)
    AttentionMaskInterface.register(ORACLE, sdpa_mask)
    return lvlm


def oracle_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     is_causal=None, **kwargs):  # fmt: skip
    """The eager path: materialised fp32 probabilities on every layer, methods in plain torch."""
    ctx = current()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    call = AttentionCall(module.layer_idx, query, key, value, scale, ctx)
    hooks = ctx.plan.attention_hooks
    requests = [r for hook in hooks if (r := hook.edits(call))]
    edits = AttentionEdits(**attention.merge_edits(call, requests) if requests else {})
    out, stats = reference.edited_attention(
        query, key, value, scale=scale, key_start=ctx.layout.key_start, edits=edits
    )
    for hook in hooks:
        hook.after(call, out, stats)
    return out, None


def kernel_edits(kind: str, B: int, H: int, Q: int, K: int, image: slice, device) -> AttentionEdits:
    """Edits of one method on one layer: image columns `image`, BOS + 3 visual sinks."""
    group = torch.zeros(B, K, dtype=torch.int8, device=device)
    group[:, image] = 3
    fields: dict[str, object] = {}
    if kind in ("var", "all"):
        group[:, 0] = 1
        group[:, image.start : image.start + 3] = 2
        rows = torch.arange(K - Q, K, device=device) >= image.stop
        n_image = torch.full((B,), float(image.stop - image.start), device=device)
        fields.update(var_rows=rows.expand(B, Q).contiguous(), var_keep=0.6, n_image=n_image)
    if kind in ("pai", "all"):
        gain_rows = torch.zeros(B, Q, dtype=torch.bool, device=device)
        gain_rows[:, -1] = True
        fields.update(image_gain=torch.full((B, H), 0.2, device=device), gain_rows=gain_rows)
    if kind in ("vhr", "all"):
        fields["head_scale"] = torch.where(torch.arange(H, device=device) % 2 == 0, 2.0, 1.0)
        fields["head_scale"] = fields["head_scale"].expand(B, H).contiguous()
    needs_groups = kind in ("var", "pai", "all")
    return AttentionEdits(col_group=group if needs_groups else None, **fields)


def bench_kernels(lvlm: LVLM, prompt_len: int, image: slice, B: int, device, dtype) -> list[dict]:
    """One layer's attention at prefill and decode; `image` is the prompt's image columns."""
    info, measure = lvlm.info, timer(device)
    H, D = info.num_heads, info.head_dim
    rows = []
    for phase, Q, K in (("prefill", prompt_len, prompt_len), ("decode", 1, prompt_len + 64)):
        q = torch.randn(B, H, Q, D, device=device, dtype=dtype)
        k, v = (torch.randn(B, H, K, D, device=device, dtype=dtype) for _ in range(2))
        key_start = torch.zeros(B, dtype=torch.long, device=device)
        sdpa = measure(partial(F.scaled_dot_product_attention, q, k, v, is_causal=Q > 1))
        for kind in ("none", "pai", "var", "vhr", "all"):
            edits = kernel_edits(kind, B, H, Q, K, image, device)
            ms = measure(
                partial(edited_attention, q, k, v, scale=D**-0.5, key_start=key_start, edits=edits)
            )
            rows.append({"phase": phase, "edits": kind, "B": B, "H": H, "Q": Q, "K": K, "D": D,
                         "ms": ms, "sdpa_ms": sdpa, "vs_sdpa": ms / sdpa})  # fmt: skip
    return rows


def method_settings(tau: float, sink_dims: list[int]) -> dict[str, list[dict]]:
    var = {"name": "var", "tau": tau, "sink_dims": sink_dims}
    vhr, pai = {"name": "vhr"}, {"name": "pai"}
    return {"none": [], "var": [var], "vhr": [vhr], "pai": [pai], "var+vhr+pai": [var, vhr, pai]}


def timed_generate(lvlm: LVLM, samples, interventions, tokens: int, device, engine: bool):
    """Seconds for one request, and the tokens it produced: through the engine, or the
    per-request eager loop (`decoding.decode`)."""
    params = GenerationParams(max_new_tokens=tokens)
    sync(device)
    start = time.perf_counter()
    if engine:
        generated = sum(len(o.token_ids) for o in lvlm.generate(samples, interventions, params))
    else:
        plan = lvlm.plan(interventions, params)
        tokenizer = lvlm.processor.tokenizer
        limits = Limits(tokenizer.eos_token_id, tokenizer.pad_token_id or 0, tokens,
                        [None] * len(samples))  # fmt: skip
        events = decode(lvlm.model, lvlm.processor, lvlm.info, plan, samples, limits)
        result = [e for e in events if e.result is not None][0].result
        generated = sum(len(ids) for ids in result.tokens)
    sync(device)
    return time.perf_counter() - start, generated


def bench_e2e(lvlm: LVLM, samples, settings, new_tokens: int, device, rounds: int) -> list[dict]:
    """Decode tokens/s of every (engine, method), in `rounds` interleaved rounds.

    Each case first runs once at full length (kernels compiled, cuDNN plans built for every KV
    length). A round times each case's prefill (1 new token) and full generation; decode rate =
    (tokens - 1 per sample) / (total - prefill). At batch 1 a decode step is bound by host time,
    which other work on a shared machine inflates at random: the best round is the least
    disturbed measurement, the median shows the spread.
    """
    # (engine, attention for plain layers, for edited layers, through the engine, methods)
    engines = (
        ("ours", attention.NAME, attention.NAME, True, settings),
        ("ours-eager-steps", attention.NAME, attention.NAME, False, ("none", "var+vhr+pai")),
        ("eager", "eager", ORACLE, False, settings),
    )
    cases = [(engine, plain if not settings[method] else edited, on_engine, method,
              settings[method])
             for engine, plain, edited, on_engine, methods in engines
             for method in methods]  # fmt: skip

    def use(impl: str) -> None:
        lvlm.model.set_attn_implementation({"text_config": impl, "vision_config": "sdpa"})

    for _, impl, on_engine, _, interventions in cases:  # warm-up at full length
        use(impl)
        timed_generate(lvlm, samples, interventions, new_tokens, device, on_engine)
    runs: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
    for _ in range(rounds):
        for engine, impl, on_engine, method, interventions in cases:
            use(impl)
            prefill, _ = timed_generate(lvlm, samples, interventions, 1, device, on_engine)
            total, generated = timed_generate(
                lvlm, samples, interventions, new_tokens, device, on_engine
            )
            runs.setdefault((engine, method), []).append((prefill, total, generated))
    use(attention.NAME)
    rows = []
    for (engine, method), timings in runs.items():
        rates = sorted((g - len(samples)) / (t - p) for p, t, g in timings)
        rows.append({"engine": engine, "method": method, "rounds": timings,
                     "prefill_s": statistics.median(p for p, _, _ in timings),
                     "decode_tokens_per_s_best": rates[-1],
                     "decode_tokens_per_s_median": statistics.median(rates)})  # fmt: skip
    return rows


def make_images(n: int) -> list[Image.Image]:
    images = []
    for i in range(n):
        image = Image.new("RGB", (400, 300), (230, 230, 230))
        ImageDraw.Draw(image).ellipse((40 + 20 * i, 30, 300, 260), fill=(200, 40 * i % 255, 60))
        images.append(image)
    return images


def print_tables(result: dict) -> None:
    print(f"\n# kernel vs SDPA ({result['device']}, {result['dtype']})")
    print(f"{'phase':8} {'edits':6} {'Q':>5} {'K':>5} {'ours ms':>9} {'sdpa ms':>9} {'x sdpa':>7}")
    for r in result["kernel"]:
        print(f"{r['phase']:8} {r['edits']:6} {r['Q']:5d} {r['K']:5d} {r['ms']:9.4f} "
              f"{r['sdpa_ms']:9.4f} {r['vs_sdpa']:7.2f}")  # fmt: skip
    print(
        f"\n# end to end, batch {result['batch']}, {result['new_tokens']} new tokens, "
        f"{result['rounds']} interleaved rounds (decode tok/s; ratios of the best rounds)"
    )
    best = {(r["engine"], r["method"]): r["decode_tokens_per_s_best"] for r in result["e2e"]}
    print(f"{'engine':16} {'method':12} {'prefill s':>9} {'best':>7} {'median':>7} "
          f"{'vs ours none':>12} {'vs eager same':>13}")  # fmt: skip
    for r in result["e2e"]:
        rate = r["decode_tokens_per_s_best"]
        print(f"{r['engine']:16} {r['method']:12} {r['prefill_s']:9.3f} {rate:7.1f} "
              f"{r['decode_tokens_per_s_median']:7.1f} {rate / best[('ours', 'none')]:12.2f} "
              f"{rate / best[('eager', r['method'])]:13.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON")
    parser.add_argument("--tiny", action="store_true", help="tiny config on CPU (a smoke test)")
    parser.add_argument("--batch", type=int, default=1, help="samples per generate call")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sample")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved end-to-end rounds")
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: run with --tiny for the CPU smoke test")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    shape = "tiny" if args.tiny else "llava-1.5-7b"
    lvlm = build_lvlm(shape, device, dtype)
    samples = [Sample(QUESTION, (image,)) for image in make_images(args.batch)]
    batch = lvlm.processor(images=samples[0].images, text=["USER: <image>\n" + QUESTION],
                           return_tensors="pt")  # fmt: skip
    prompt_len = batch["input_ids"].shape[1]
    image_cols = (batch["input_ids"][0] == lvlm.info.image_token_id).nonzero().flatten()
    n_image = len(image_cols)
    image = slice(int(image_cols[0]), int(image_cols[0]) + n_image)  # "USER: <image>..."
    # random weights: a low tau so that sinks exist (real checkpoints use 20)
    tau, dims = (2.0, list(range(8))) if args.tiny else (1.5, [1415, 2533])
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu {platform.machine()}",
        "dtype": str(dtype), "model": shape, "prompt_tokens": prompt_len, "image_tokens": n_image,
        "batch": args.batch, "new_tokens": args.new_tokens, "var_tau": tau, "var_sink_dims": dims,
        "versions": {"torch": torch.__version__},
        "kernel": bench_kernels(lvlm, prompt_len, image, args.batch, device, dtype),
        "rounds": args.rounds,
        "e2e": bench_e2e(lvlm, samples, method_settings(tau, dims), args.new_tokens, device,
                         args.rounds),
    }  # fmt: skip
    if device == "cuda":
        from attention_kernels import print_table, run_table  # the kernels' own benchmark

        result["kernel_graph"] = run_table(dtype)
        print_table(result["kernel_graph"])
    print_tables(result)
    write_json(args.out, result)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
