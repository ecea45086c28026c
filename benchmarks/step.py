"""Decode step speed: the engine's shared step against a gpt-fast-style reference decoder.

    python benchmarks/step.py --out step.json                        # GPU: LLaVA-1.5-7B shapes
    python benchmarks/step.py --preset tiny --out /tmp/step.json     # CPU smoke run

One run measures, in milliseconds per decode step (each row one token):
- reference: the decoder written below after pytorch-labs/gpt-fast's model.py, at LLaVA-1.5-7B's
  text shapes (Llama-2-7B: 32 layers, 4096 hidden, 32 heads, 11008 intermediate, vocab 32064):
  fused QKV and gate/up weights, a static KV cache, torch.compile(mode="max-autotune", with its
  CUDA graphs; `--ref-mode`), attention in the math path as gpt-fast decodes;
- ours: `SlotBatch.step`, the engine's shared step over the random-weight LLaVA-1.5-7B of
  common.py (the fused decoder, compiled and replayed from CUDA graphs; `--mode`), its rows
  placed from real prefills of one image (576 tokens) and ~40 text tokens, without
  interventions and with VAR+VHR+PAI edit tables in every row (`--transformers`: also the
  step as transformers' forward, the unfused path);
at batch 1, 8 and 32, each over the same context (prompt, then `--steps` generated tokens); and
the prefill of one such request without and with VAR+VHR+PAI (rows built, prefill, decode edits:
what the engine runs to admit it). The bound printed is what the step must read (the language
model's weights, and each row's keys and values) over the bandwidth of a measured device copy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import SIZES, Sizes, build_llava, sync, write_json  # noqa: E402
from PIL import Image  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from lvlm_fix import LVLM, Sample  # noqa: E402
from lvlm_fix.decoding import build_rows, prefill  # noqa: E402
from lvlm_fix.model import FAMILIES, resolve  # noqa: E402
from lvlm_fix.slots import SlotBatch, decode_edits  # noqa: E402

# ~40 text tokens with the chat template around them (the tokenizer knows these words)
PROMPT = (
    "Please help me describe the image in detail. a photo of a cat and a dog on a red "
    "sofa near the window in the sunny room. Please describe this image in detail."
)
START = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - START:6.1f} s] {text}", flush=True)


# ----- the reference: a gpt-fast-style decoder -----


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    return weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(
        x.dtype
    )


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # x [B, S, H, D], cos/sin [S, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos[:, None] + rotated * sin[:, None]


class Block(nn.Module):
    def __init__(self, s: Sizes, dtype: torch.dtype):
        super().__init__()
        self.heads, self.head_dim = s.heads, s.hidden // s.heads
        self.wqkv = nn.Linear(s.hidden, 3 * s.hidden, bias=False, dtype=dtype)
        self.wo = nn.Linear(s.hidden, s.hidden, bias=False, dtype=dtype)
        self.w13 = nn.Linear(s.hidden, 2 * s.intermediate, bias=False, dtype=dtype)
        self.w2 = nn.Linear(s.intermediate, s.hidden, bias=False, dtype=dtype)
        self.attn_norm = nn.Parameter(torch.ones(s.hidden, dtype=dtype))
        self.ffn_norm = nn.Parameter(torch.ones(s.hidden, dtype=dtype))

    def setup_cache(self, batch: int, max_len: int) -> None:
        like = self.wo.weight
        shape = (batch, self.heads, max_len, self.head_dim)
        for name in ("k_cache", "v_cache"):  # random keys and values: the step's cost is the same
            self.register_buffer(name, torch.randn(shape, dtype=like.dtype, device=like.device))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, mask: Tensor) -> Tensor:
        B, S, hidden = x.shape
        q, k, v = self.wqkv(rms_norm(x, self.attn_norm)).split(hidden, -1)
        q, k, v = (t.view(B, S, self.heads, self.head_dim) for t in (q, k, v))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        self.k_cache[:, :, pos] = k  # the static cache: rows written in place, all columns read
        self.v_cache[:, :, pos] = v
        y = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask)
        x = x + self.wo(y.transpose(1, 2).reshape(B, S, hidden))
        gate, up = self.w13(rms_norm(x, self.ffn_norm)).chunk(2, -1)
        return x + self.w2(F.silu(gate) * up)


class Reference(nn.Module):
    def __init__(self, s: Sizes, max_len: int, dtype: torch.dtype):
        super().__init__()
        self.embed = nn.Embedding(s.vocab, s.hidden, dtype=dtype)
        self.layers = nn.ModuleList(Block(s, dtype) for _ in range(s.layers))
        self.norm = nn.Parameter(torch.ones(s.hidden, dtype=dtype))
        self.output = nn.Linear(s.hidden, s.vocab, bias=False, dtype=dtype)
        head_dim = s.hidden // s.heads
        inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(max_len).float(), inv_freq).repeat(1, 2)
        self.register_buffer("cos", angles.cos().to(dtype))
        self.register_buffer("sin", angles.sin().to(dtype))
        self.register_buffer("causal", torch.ones(max_len, max_len, dtype=torch.bool).tril())
        self.max_len = max_len

    def setup_caches(self, batch: int) -> None:
        for layer in self.layers:
            layer.setup_cache(batch, self.max_len)

    def forward(self, tokens: Tensor, pos: Tensor) -> Tensor:  # tokens [B, S], pos [S]
        x = self.embed(tokens)
        mask, cos, sin = self.causal[None, None, pos], self.cos[pos], self.sin[pos]
        for layer in self.layers:
            x = layer(x, cos, sin, pos, mask)
        return self.output(rms_norm(x, self.norm))


def decode_one(model: Reference, token: Tensor, pos: Tensor) -> Tensor:
    return model(token, pos)[:, -1].argmax(-1, keepdim=True)


def time_reference(s: Sizes, batches, context: int, steps: int, mode: str, device, dtype):
    """ms per step of the reference at each batch size (its cache filled to `context`)."""
    with torch.device(device):
        model = Reference(s, context + steps + 8, dtype).eval()
    step = decode_one
    if mode != "none":
        step = torch.compile(decode_one, mode=mode, fullgraph=True, dynamic=False)
    results = {}
    # gpt-fast decodes in the math path, so that inductor generates the attention itself
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH):
        for batch in batches:
            model.setup_caches(batch)
            token = torch.zeros(batch, 1, dtype=torch.long, device=device)

            def run(n: int, token=token) -> float:
                pos = torch.tensor([context], device=device)
                sync(device)
                start = time.perf_counter()
                for _ in range(n):
                    token = step(model, token, pos).clone()  # a graph's output is overwritten
                    pos += 1
                sync(device)
                return (time.perf_counter() - start) * 1e3 / n

            began = time.monotonic()
            run(3)  # compile, record the graphs, replay
            say(f"reference batch {batch}: compiled and warmed in {time.monotonic() - began:.1f} s")
            results[batch] = min(run(steps) for _ in range(3))
            say(f"reference batch {batch}: {results[batch]:.3f} ms/step")
    return results


# ----- ours: the engine's shared step -----


def sample(size: int) -> Sample:
    pixels = np.random.default_rng(0).integers(0, 256, (size * 3 // 4 + 8, size + 16, 3), np.uint8)
    return Sample(PROMPT, (Image.fromarray(pixels),))


def admit(lvlm: LVLM, interventions: list[dict], image_size: int):
    """What the engine runs to admit one request to the shared batch: (prefilled, edits)."""
    plan = lvlm.plan(interventions)
    rows = build_rows(lvlm.processor, lvlm.info.image_token_id, plan, [sample(image_size)],
                      lvlm.device)  # fmt: skip
    prefilled = prefill(lvlm.model, lvlm.info, plan, rows, 1)
    return prefilled, decode_edits(prefilled, plan, lvlm.info)


def time_prefills(lvlm: LVLM, plans: dict[str, list[dict]], image_size: int,
                  repeats: int) -> dict[str, float]:  # fmt: skip
    """Median ms of `admit` per plan, the plans taking turns (host time drifts by tens of
    percent over seconds: timing one plan's repeats after the other's would compare drifts)."""
    for interventions in plans.values():
        admit(lvlm, interventions, image_size)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in plans}
    for _ in range(repeats):
        for name, interventions in plans.items():
            sync(lvlm.device)
            start = time.perf_counter()
            admit(lvlm, interventions, image_size)
            sync(lvlm.device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def time_ours(slots: SlotBatch, admitted, batch: int, steps: int) -> tuple[float, float | None]:
    """(ms per `SlotBatch.step`, ms per bare graph replay or None) with `batch` rows of the
    admitted request; every repeat starts from the prompt again."""
    prefilled, edits = admitted
    for _ in range(batch):
        slots.place(prefilled, edits)
    lengths = list(slots.lengths)
    first = int(prefilled.runner.positions[0]) + 1
    tokens = [int(prefilled.logits[0].argmax())] * batch

    def run() -> float:
        slots.lengths[:] = lengths
        sync(slots.device)
        start = time.perf_counter()
        for i in range(steps):
            slots.step(tokens, [first + i] * batch)
        sync(slots.device)
        return (time.perf_counter() - start) * 1e3 / steps

    run()
    per_step = min(run() for _ in range(3))
    replay = None
    graph = slots.graphs.get((batch, any(slots.edited)))
    if graph is not None:  # the GPU's share alone: no host work between replays
        slots.lengths[:] = lengths
        sync(slots.device)
        start = time.perf_counter()
        for _ in range(steps):
            graph[0].replay()
        sync(slots.device)
        replay = (time.perf_counter() - start) * 1e3 / steps
    slots.release(list(range(batch)))
    return per_step, replay


def measure_ours(lvlm: LVLM, admitted: dict, batches: list[int], columns: int, steps: int,
                 fused: bool, mode: str) -> tuple[dict, float]:  # fmt: skip
    """{(batch, plan): (ms per step, ms per replay)} of a SlotBatch as the engine builds it, and
    the seconds its start took (compiling and capturing)."""
    began = time.monotonic()
    slots = SlotBatch(lvlm.model, lvlm.info, max(batches), columns,
                      graphs=lvlm.device.type == "cuda", buckets=tuple(batches), fused=fused,
                      compile_mode=None if mode == "none" else mode)  # fmt: skip
    warmup_s = time.monotonic() - began
    kind = "fused" if slots.decoder else "transformers"
    say(f"{kind} step: buckets {slots.buckets}, compiled and captured in {warmup_s:.1f} s")
    results = {}
    for batch in batches:
        for name, request in admitted.items():
            results[batch, name] = time_ours(slots, request, batch, steps)
            say(f"{kind} step, batch {batch}, {name}: {results[batch, name][0]:.3f} ms/step")
    return results, warmup_s


def copy_bandwidth(device, nbytes: int) -> float:
    """Bytes/s of a device copy (each byte read once and written once)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * 10 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(SIZES), default="llava-1.5-7b")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --preset tiny)")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (64; tiny: 8)")
    parser.add_argument("--mode", default="default",
                        help="torch.compile mode of our step ('none': uncompiled)")  # fmt: skip
    parser.add_argument("--ref-mode", default=None,
                        help="the reference's compile mode (max-autotune; CPU: none)")  # fmt: skip
    parser.add_argument("--transformers", action="store_true",
                        help="also time the unfused step (transformers' forward)")  # fmt: skip
    parser.add_argument("--prefill-only", action="store_true", help="stop after the prefill")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    tiny = args.preset == "tiny"
    device = torch.device(args.device or ("cpu" if tiny else "cuda"))
    dtype = torch.float32 if tiny else torch.bfloat16
    steps = args.steps or (8 if tiny else 64)
    ref_mode = args.ref_mode or ("max-autotune" if device.type == "cuda" else "none")
    batches = sorted(int(b) for b in args.batches.split(","))
    sizes = SIZES[args.preset]
    # VAR finds sinks in random weights only with a low tau (real checkpoints use 20)
    var = {"name": "var", "tau": 2.0 if tiny else 1.5,
           "sink_dims": list(range(8)) if tiny else [1415, 2533]}  # fmt: skip
    edited = [var, {"name": "vhr"}, {"name": "pai"}]

    lvlm = build_llava(args.preset, device, dtype)
    say(f"built {lvlm.info.name} on {device}")
    bandwidth = copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**26)
    lm = resolve(lvlm.model, FAMILIES[lvlm.info.family].language_model)
    head = lvlm.model.get_output_embeddings().weight
    # a step reads every weight but the embedding table's (one row per token)
    weight_bytes = sum(p.nbytes for p in lm.parameters()) - lm.embed_tokens.weight.nbytes
    weight_bytes += head.nbytes
    say(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; LM weights read per step "
        f"{weight_bytes / 1e9:.2f} GB")  # fmt: skip

    repeats = 2 if tiny else 15
    plans = {"none": [], "var+vhr+pai": edited}
    prefill_ms = time_prefills(lvlm, plans, sizes.image_size, repeats)
    say(f"prefill batch 1: {prefill_ms} ({prefill_ms['var+vhr+pai'] / prefill_ms['none']:.2f}x)")
    if args.prefill_only:
        return
    admitted = {"none": admit(lvlm, [], sizes.image_size),
                "var+vhr+pai": admit(lvlm, edited, sizes.image_size)}  # fmt: skip
    context = admitted["none"][0].runner.attention_mask.shape[1]
    say(f"context: {context} tokens")
    columns = context + steps + 8
    ours, warmup_s = measure_ours(lvlm, admitted, batches, columns, steps, True, args.mode)
    if args.transformers:
        before, _ = measure_ours(lvlm, admitted, batches, columns, steps, False, args.mode)
    del admitted
    reference = time_reference(sizes, batches, context, steps, ref_mode, device, dtype)

    info = lvlm.info  # a row's keys and values over its mean columns while timed
    kv_bytes = 2 * info.num_layers * info.num_kv_heads * info.head_dim * dtype.itemsize
    kv_bytes *= context + steps // 2
    rows = []
    for batch in batches:
        plain, replay = ours[batch, "none"]
        with_edits, edited_replay = ours[batch, "var+vhr+pai"]
        bound = (weight_bytes + batch * kv_bytes) / bandwidth * 1e3
        rows.append({
            "batch": batch, "reference_ms": round(reference[batch], 3),
            "ours_ms": round(plain, 3), "ours_replay_ms": replay and round(replay, 3),
            "ours_edited_ms": round(with_edits, 3),
            "ours_edited_replay_ms": edited_replay and round(edited_replay, 3),
            "ours_over_reference": round(plain / reference[batch], 3),
            "edited_over_ours": round(with_edits / plain, 3),
            "bound_ms": round(bound, 3), "ours_tokens_per_s": round(batch / plain * 1e3, 1),
            "reference_tokens_per_s": round(batch / reference[batch] * 1e3, 1),
        })  # fmt: skip
        if args.transformers:
            rows[-1]["transformers_ms"] = round(before[batch, "none"][0], 3)
            rows[-1]["transformers_edited_ms"] = round(before[batch, "var+vhr+pai"][0], 3)
    meta = {
        "model": lvlm.info.name, "device": _device_name(device), "dtype": str(dtype),
        "torch": torch.__version__, "context_tokens": context, "timed_steps": steps,
        "mode": args.mode, "ref_mode": ref_mode, "our_warmup_s": round(warmup_s, 1),
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1), "weight_gb": round(weight_bytes / 1e9, 3),
        "prefill_ms": {k: round(v, 2) for k, v in prefill_ms.items()},
        "total_s": round(time.monotonic() - START, 1),
    }  # fmt: skip
    print_table(meta, rows)
    if args.out:
        write_json(args.out, {"meta": meta, "results": rows})


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def print_table(meta: dict, rows: list[dict]) -> None:
    print(f"\n{meta['model']}, {meta['device']}, {meta['dtype']}, context {meta['context_tokens']}"
          f" + {meta['timed_steps']} steps; ours {meta['mode']!r}, reference "
          f"{meta['ref_mode']!r}; copy {meta['copy_bandwidth_gb_s']} GB/s")  # fmt: skip
    print("| batch | reference ms | ours ms (replay) | ours / ref | VAR+VHR+PAI ms (replay) | "
          "edited / ours | bound ms | ours tok/s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['reference_ms']:.3f} | {r['ours_ms']:.3f} "
              f"({_ms(r['ours_replay_ms'])}) | {r['ours_over_reference']:.3f} | "
              f"{r['ours_edited_ms']:.3f} ({_ms(r['ours_edited_replay_ms'])}) | "
              f"{r['edited_over_ours']:.3f} | {r['bound_ms']:.3f} | "
              f"{r['ours_tokens_per_s']:.0f} |")  # fmt: skip
    for r in rows:
        if "transformers_ms" in r:
            print(f"batch {r['batch']}, unfused (transformers' forward): "
                  f"{r['transformers_ms']:.3f} ms, with VAR+VHR+PAI "
                  f"{r['transformers_edited_ms']:.3f} ms")  # fmt: skip
    none, edited = meta["prefill_ms"]["none"], meta["prefill_ms"]["var+vhr+pai"]
    print(f"\nprefill batch 1 (rows, prefill, decode edits): none {none:.2f} ms, VAR+VHR+PAI "
          f"{edited:.2f} ms ({edited / none:.2f}x); total run {meta['total_s']} s")  # fmt: skip


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
