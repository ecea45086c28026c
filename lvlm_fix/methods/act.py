"""ACT: Attention Calibration Technique (Yu et al., ICML 2024, "Unveiling and Harnessing Hidden
Attention Sinks: Enhancing Large Language Models without Training through Attention Calibration",
arXiv 2406.15765).

What the reference does (official code GATECH-EIC/ACT, commit a267af7e70cd, the file
models/llama_modelling_aug.py, function `atten_process_eval`; head lists in
models/augment_index.py; BETA=0.4 and THRES=0.1 in scripts/evaluation.sh):
- In layers 2..30 of Llama-2-7B's 32 (`signal in range(2, 31)`), for each head of a fixed,
  offline-searched per-layer list (`aug_indices_comb_classification`, 184 of 928 heads, searched
  on Llama-2-7b-chat one head at a time for text-classification accuracy), take the head's
  post-softmax probabilities P [Q, K] of that forward call.
- Sinks: the columns whose mean attention over the rows that can see them,
  m_j = sum_i P[i, j] / (number of rows i >= j), exceeds THRES = 0.1 (strict >), minus the
  smallest such column (BOS).
- Calibration, after the softmax and before P @ V, in every query row: sink columns keep a
  fraction beta = 0.4 of their probability, and the freed mass (1 - beta) * M_i (M_i = the row's
  mass on sinks) goes to the row's non-sink columns (BOS included) in proportion to their own
  probability: P'[i, j] = P[i, j] * (1 - beta * M_i) / (1 - M_i). Rows still sum to 1.
- Every reported number is prefill-only (classification: one forward; multiple choice: one
  new token), batch size 1, fp16. The reference has no working decode path.

What this module does. Each sink set is found from the STOCK probabilities of the layer
(`AttentionCall.probabilities`, before PAI's gain, VAR and ACT itself: what the reference's
"uncalibrated" map is when ACT runs alone) in fp32, per batch row, padding masked, and it is
applied by a probability modifier (`Calibrate`, plain-torch attention path) to the
probabilities it receives (after PAI and VAR, when those run too).
- Prefill: two passes, as the reference needs (row i's edit depends on rows after i): the
  column sums of every prompt row first (blockwise over query rows, in `edits`), then the edit
  of all rows (the modifier). The same as the reference at batch size 1.
- Decode, `decode="running"` (ours; the default): per (row, layer, calibrated head) the column
  sums of every row so far are kept in the RowState ("act.colsum.{layer}", fp32 [R, Hc, K]),
  the current row's stock probabilities are added at each step, the sinks are re-thresholded
  with count_j = t - j + 1 (the current row included), and only the current row is edited.
  That is exactly what the reference computes for the current row when the prompt plus the
  generated text is run without a cache. `"prefill_only"`: decode steps run plain (the request
  decodes in the engine's shared batch); `"current_row"`: sinks from the current row alone
  (P[t, j] > threshold), no state.
  The state is updated in `edits`, which runs once per layer call, before the kernel. It is not
  undone by a KV-cache crop, and a decode call is taken to hold one row per sample, so both
  decode-time modes refuse OPERA (its rollback replays several rows at once); "prefill_only"
  composes with it.
- The first real token (column key_start, BOS) is never a sink (`exclude_first="first_token"`,
  ours). The reference drops the smallest detected index, which is BOS whenever BOS passes the
  threshold (nearly always); `"first_detected"` reproduces it literally. The reference sets
  row 0 to [1, 0, ...]: a no-op without padding; here padding rows and columns are skipped.
- Heads: `heads="auto"` (default) takes the reference's list on a Llama backbone of 32 layers x
  32 heads (LLaVA-1.5-7B, LLaVA-NeXT-Vicuna-7B), and every head of the calibrated layers on any
  other shape (ours: no list exists there). For LLaVA-1.5-7B the list is a transfer: it was
  searched on Llama-2-7b-chat for text classification, not on Vicuna-7B v1.5 nor on images. It
  is still the default there, because (1) both checkpoints are fine-tunes of the same Llama-2-7B
  base, where a head's role (and its sinks) forms, so the heads match by index and shape;
  (2) it is the only setting behind every number the reference reports, and the reference
  searched heads precisely because it did not calibrate them all; (3) "all" (928 heads) edits
  five times as many heads with no reference evidence behind it. `heads="all"` is the switch;
  a list of [layer, head] pairs is a custom set (e.g. one searched for LLaVA on held-out POPE
  images, one head at a time, as the reference's `--calibrate 1` does; that search is not
  shipped, and its selection rule is not in the released code). The MT-bench list is not
  shipped: that path never ran as released (it patches transformers' own LlamaAttention, whose
  stock LlamaModel never passes the layer index `signal`, so no layer is calibrated).
- Layers: 2..L-2 of L (the reference: 2..30 of 32), i.e. the first two and the last layer are
  never calibrated; `skip_last_layer=False` gives 2..L-1 (the Mistral and MT-bench variants).
  The tiny and gym models (4 layers) calibrate layer 2 only. A preset's heads outside the layer
  range are dropped; a custom head outside it is an error.
- Open choices, all switches (reference behaviour first unless noted): `threshold_mode`
  ("absolute" 0.1 as in the code; "alpha_over_n": threshold alpha / N with N the row's real
  columns, the paper's form as secondary sources describe it, alpha unverified);
  `first_token_receives` (True: BOS shares the freed mass, as in the code; False: it does not);
  `sink_scope` (all columns, as the reference, which is modality-blind; or only text / only
  image columns); `edited_rows` (prefill rows edited: all, as the reference; or only those
  after the image, ours); `min_rows` (a column needs this many rows seeing it; 1 = reference).
  Not offered: fp16 statistics (the reference's precision; we keep fp32).

LLaVA-NeXT and OneVision (anyres): nothing differs. ACT is modality-blind and reads whatever
columns the layer holds (with LLM-side pruning, the layer's own kept columns), so it runs on the
three families; long anyres prompts only make the statistics pass cost more. GQA (OneVision's
Qwen2) is handled by `AttentionCall.probabilities`.

Overlap with VAR (`var.py`, Kang et al., ICLR 2025): both move attention away from sinks. VAR
finds sinks from massive activations in the residual stream, edits only rows after the image
that look at the image, and gives the freed mass to non-sink image tokens; ACT finds sinks from
attention column means, edits every row of its heads, and gives the freed mass to every
non-sink column. They compose: VAR's redistribution runs first (a built-in kernel edit), ACT's
modifier after it; ACT's sinks come from the stock probabilities, so VAR does not change which
columns ACT calls sinks, while ACT's M_i and shares are read from VAR's output. Columns both
call sinks then keep (1 - recycle_fraction) * beta of their mass, a strength neither paper ran.

Cost: the calibrated layers run on the plain-torch attention path (probabilities in fp32), and
the statistics recompute the layer's stock probabilities (every head, blockwise over query
rows); with running statistics the request decodes in a lane of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field

from lvlm_fix.methods.base import Contribution, Intervention, register
from lvlm_fix.model import ModelInfo

if TYPE_CHECKING:
    from lvlm_fix.hooks import AttentionCall

# models/augment_index.py `aug_indices_comb_classification` (GATECH-EIC/ACT @ a267af7): the heads
# of layers 2..30 of Llama-2-7b-chat; the list the released eval uses for every task.
LLAMA2_CHAT_CLS: tuple[tuple[int, ...], ...] = (
    (2, 8, 12, 13, 16, 17, 20, 25),
    (0, 1, 2, 10, 24, 28),
    (1, 3, 4, 9, 10, 11, 15, 19, 23, 25, 27, 30),
    (0, 1, 3, 8, 9, 12, 13, 14, 19, 22),
    (1, 11, 13, 15, 17, 18, 20, 21, 22, 25, 28, 31),
    (7, 8, 18, 24, 25),
    (0, 2, 5, 6, 7, 8, 26),
    (0, 6, 7, 10, 11, 15, 17, 20, 21, 29),
    (1, 4, 19, 22, 23, 25, 26, 27, 31),
    (6, 8, 10, 12, 14, 15, 17, 18, 21, 26, 27, 28),
    (0, 4, 6, 11, 21, 24, 25, 27),
    (1, 4, 9, 21, 25, 26, 27),
    (0, 1, 4, 7, 9, 12, 13, 15, 19, 21, 24),
    (6, 9, 12, 17, 19, 21, 24, 25, 26),
    (0, 29),
    (0, 15, 19, 24, 29, 30),
    (7, 12, 22, 23),
    (2, 15, 16, 21, 30),
    (1, 2, 5, 9, 10, 15, 20, 27, 29),
    (17, 20, 24, 29),
    (2, 3, 5, 6, 13, 15, 25),
    (5, 6, 16),
    (1, 3, 5, 13, 20),
    (17, 24),
    (9, 14, 19, 20),
    (2, 29),
    (),
    (2, 14, 15, 25),
    (2,),
)
LLAMA2_FIRST_LAYER = 2  # the list's first entry is layer 2
LLAMA2_SHAPE = ("llama", 32, 32, 32)  # text model type, layers, heads, key/value heads

Index = Annotated[int, Field(ge=0, le=65535)]  # a layer or head index

# Elements of one block of stock probabilities in the statistics pass (fp32: 64 MiB).
_BLOCK = 1 << 24


@register
class ACT(Intervention):
    """Attention calibration: damp each calibrated head's attention sinks, redistribute."""

    name: ClassVar[str] = "act"
    hooks: ClassVar[frozenset] = frozenset({"attention"})

    beta: float = Field(
        0.4, ge=0.0, le=1.0, description="Fraction of a sink's attention kept (BETA; 1 = off)."
    )
    threshold: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Sink if a column's mean attention > this (THRES; absolute mode; 1 = off).",
    )
    threshold_mode: Literal["absolute", "alpha_over_n"] = Field(
        "absolute",
        description="'absolute' (code) or 'alpha_over_n': threshold alpha / N (the row's columns).",
    )
    alpha: float = Field(
        5.0, gt=0.0, le=1e4, description="alpha_over_n only: threshold alpha / N (unverified)."
    )
    heads: Literal["auto", "llama2_chat_cls", "all"] | list[tuple[Index, Index]] = Field(
        "auto",
        max_length=65536,
        description="Calibrated heads: 'auto' (Llama-2 list on 32x32 Llama, else all), the "
        "'llama2_chat_cls' list, 'all' heads of the layers, or [layer, head] pairs ([] = off).",
    )
    first_layer: int = Field(2, ge=0, le=1024, description="First calibrated layer (reference 2).")
    skip_last_layer: bool = Field(
        True, description="Layers first..L-2 (reference eval); False = first..L-1 (MT-bench)."
    )
    exclude_first: Literal["first_token", "first_detected"] = Field(
        "first_token",
        description="Never a sink: the first real token, or the smallest detected column (code).",
    )
    first_token_receives: bool = Field(
        True, description="The first token shares the freed mass (code); False = it does not."
    )
    sink_scope: Literal["all", "text", "image"] = Field(
        "all", description="Columns that may be sinks: all (reference), text only, image only."
    )
    edited_rows: Literal["all", "after_image"] = Field(
        "all", description="Prefill rows calibrated: all (reference) or those after the image."
    )
    decode: Literal["running", "prefill_only", "current_row"] = Field(
        "running",
        description="Decode rows: running column statistics, none, or the current row's alone.",
    )
    min_rows: int = Field(
        1, ge=1, le=1_000_000, description="A sink needs this many rows seeing it (1 = code)."
    )

    def is_neutral(self) -> bool:
        no_sinks = self.threshold_mode == "absolute" and self.threshold >= 1.0
        return self.beta == 1.0 or self.heads == [] or no_sinks

    def contribute(self, model: ModelInfo) -> Contribution:
        layers = calibrated_layers(self.first_layer, self.skip_last_layer, model.num_layers)
        heads = calibrated_heads(self.heads, layers, model)
        if not heads:
            raise ValueError(f"ACT calibrates no head in layers {sorted(layers)} of this model")
        hook = Calibration(
            heads=heads,
            beta=self.beta,
            threshold=self.threshold,
            alpha=self.alpha if self.threshold_mode == "alpha_over_n" else None,
            exclude_detected=self.exclude_first == "first_detected",
            first_receives=self.first_token_receives,
            scope=self.sink_scope,
            after_image=self.edited_rows == "after_image",
            decode=self.decode,
            min_rows=self.min_rows,
        )
        prefill_only = self.decode == "prefill_only"
        return Contribution(
            attention=hook,
            shared_decode=prefill_only,
            # OPERA's rollback crops the cache and replays several rows in one call: running
            # sums would count them twice, and one call's rows would share one sink set
            conflicts=frozenset() if prefill_only else frozenset({"opera"}),
        )


def calibrated_layers(first: int, skip_last: bool, num_layers: int) -> range:
    """first..L-2 (skip_last) or first..L-1: the reference's 2..30 of 32."""
    end = num_layers - 1 if skip_last else num_layers
    if not first < end:
        raise ValueError(f"ACT layers {first}..{end - 1} are empty on a model of {num_layers}")
    return range(first, end)


def calibrated_heads(
    heads: str | list[tuple[int, int]], layers: range, model: ModelInfo
) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """((layer, (head, ...)), ...) in layer order, layers without a head left out."""
    shape = (model.text_model_type, model.num_layers, model.num_heads, model.num_kv_heads)
    if heads == "auto":
        heads = "llama2_chat_cls" if shape == LLAMA2_SHAPE else "all"
    if heads == "all":
        return tuple((layer, tuple(range(model.num_heads))) for layer in layers)
    if heads == "llama2_chat_cls":
        if shape != LLAMA2_SHAPE:
            raise ValueError(
                "ACT's 'llama2_chat_cls' heads were searched on Llama-2-7B (32 layers x 32 "
                f"heads); this model is {shape[0]} with {shape[1]} layers x {shape[2]} heads "
                f"({shape[3]} key/value heads): use heads='all' or a list of [layer, head]"
            )
        listed = {LLAMA2_FIRST_LAYER + i: h for i, h in enumerate(LLAMA2_CHAT_CLS)}
        return tuple((layer, listed[layer]) for layer in layers if listed.get(layer))
    assert isinstance(heads, list)
    bad = [(layer, h) for layer, h in heads if layer not in layers or h >= model.num_heads]
    if bad:
        raise ValueError(
            f"ACT heads {bad} are outside layers {layers.start}..{layers.stop - 1} or the "
            f"model's {model.num_heads} heads"
        )
    by_layer: dict[int, set[int]] = {}
    for layer, h in heads:
        by_layer.setdefault(layer, set()).add(h)
    return tuple((layer, tuple(sorted(by_layer[layer]))) for layer in sorted(by_layer))


def column_sums(call: AttentionCall, heads: torch.Tensor) -> torch.Tensor:
    """fp32 [R, Hc, K]: the stock probabilities of the call's query rows, summed over the rows,
    of heads `heads` (long [Hc]); blockwise over query rows to bound the memory."""
    R, H, Q, _ = call.query.shape
    K = call.key.shape[2]
    step = max(1, _BLOCK // max(1, R * H * K))
    total = None
    for start in range(0, Q, step):
        rows = torch.arange(start, min(start + step, Q), device=call.query.device)
        part = call.probabilities(rows).index_select(1, heads).sum(2)
        total = part if total is None else total + part
    assert total is not None
    return total


@dataclass(frozen=True)
class Calibration:
    """AttentionHook: ACT's sinks per (row, calibrated head) from column statistics, and the
    probability modifier that calibrates them. State (decode="running"): "act.colsum.{layer}"
    fp32 [R, Hc, K], each calibrated head's column sums over every row so far (stock
    probabilities), updated here once per layer call."""

    heads: tuple[tuple[int, tuple[int, ...]], ...]  # (layer, calibrated heads)
    beta: float
    threshold: float
    alpha: float | None  # threshold alpha / N instead of `threshold`
    exclude_detected: bool  # drop the smallest detected column (code) instead of key_start
    first_receives: bool
    scope: Literal["all", "text", "image"]
    after_image: bool
    decode: Literal["running", "prefill_only", "current_row"]
    min_rows: int

    def edits(self, call: AttentionCall) -> dict[str, Any] | None:
        ctx = call.ctx
        heads = dict(self.heads).get(call.layer)
        if heads is None or (ctx.phase == "decode" and self.decode == "prefill_only"):
            return None
        R, H, _, _ = call.query.shape
        K = call.key.shape[2]
        device = call.query.device
        index = torch.tensor(heads, device=device)
        new = column_sums(call, index)  # [R, Hc, K]
        columns = call.query_columns
        first_row = call.layout.key_start  # the first row that the sums hold
        if ctx.phase == "decode" and self.decode == "current_row":
            first_row = columns[0].expand_as(first_row)
            colsum = new
        elif ctx.phase == "decode":
            key = f"act.colsum.{call.layer}"
            old = ctx.state.get(key)
            if old is not None:  # the rows so far (prompt and earlier steps), this one added
                new = new + torch.nn.functional.pad(old, (0, K - old.shape[-1]))
            colsum = ctx.state[key] = new
        else:
            colsum = new
            if self.decode == "running":
                ctx.state[f"act.colsum.{call.layer}"] = colsum
        sink = self.sinks(call, colsum, first_row, columns[-1])  # [R, Hc, K]
        full = torch.zeros(R, H, K, dtype=torch.bool, device=device)
        full[:, index] = sink
        layout = call.layout
        if self.after_image:
            cols = torch.arange(layout.image_mask.shape[1], device=device)
            from_column = torch.where(layout.image_mask, cols, -1).amax(-1) + 1  # [R]
        else:
            from_column = layout.key_start
        keep_out = layout.key_start if not self.first_receives else torch.full_like(from_column, -1)
        return {"prob_mods": (Calibrate(full, from_column, keep_out, self.beta),)}

    def sinks(
        self, call: AttentionCall, colsum: torch.Tensor, first_row: torch.Tensor, last: torch.Tensor
    ) -> torch.Tensor:
        """bool [R, Hc, K]: columns whose mean attention over the rows [first_row, last] that
        see them exceeds the threshold, minus the excluded first one, within the scope, in
        edited rows only."""
        K = colsum.shape[-1]
        key_start = call.layout.key_start[:, None]  # [R, 1]
        cols = torch.arange(K, device=colsum.device)[None]  # [1, K]
        count = (last - torch.maximum(cols, first_row[:, None]) + 1).clamp(min=0)  # [R, K]
        real = (cols >= key_start) & (cols <= last) & (count >= self.min_rows)
        mean = colsum / count.clamp(min=1)[:, None]
        if self.alpha is None:
            threshold: float | torch.Tensor = self.threshold
        else:  # N: the real columns the last row sees
            threshold = (self.alpha / (last - key_start + 1).clamp(min=1))[:, :, None]
        detected = (mean > threshold) & real[:, None]
        if self.exclude_detected:  # the reference's `indices[1:]`
            first = detected.int().argmax(-1, keepdim=True)  # a row without any: stays False
            detected = detected.scatter(-1, first, False)
        else:
            detected = detected & (cols != key_start)[:, None]
        if self.scope != "all":
            image = call.image_columns()[:, None]  # [R, 1, K]
            detected = detected & (image if self.scope == "image" else ~image)
        return detected & call.ctx.state["row.edited"][:, None, None]

    def after(self, call: AttentionCall, out: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        return None


@dataclass(frozen=True)
class Calibrate:
    """Probability modifier: in rows at columns >= from_column[b], sink columns keep beta of
    their probability and the freed mass goes to the other visible columns (but keep_out[b],
    -1 = none) in proportion to their probability. Rows keep their sum. Heads without a sink
    (uncalibrated ones) are unchanged, bit for bit."""

    sink: torch.Tensor  # bool [B, H, G]; columns G.. are no sinks
    from_column: torch.Tensor  # long [B]
    keep_out: torch.Tensor  # long [B]: the column that receives nothing (-1: none)
    beta: float

    def __call__(self, x, b, h, q_idx, kv_idx):
        K = x.shape[-1]
        sink = torch.nn.functional.pad(self.sink, (0, K - self.sink.shape[-1]))[b, h, kv_idx]
        target = ~sink & (kv_idx != self.keep_out[b])  # [B, H, 1, K]
        sink_mass = (x * sink).sum(-1, keepdim=True)  # [B, H, Q, 1]
        target_mass = (x * target).sum(-1, keepdim=True)
        grow = 1.0 + (1.0 - self.beta) * sink_mass / target_mass.clamp_min(1e-30)
        factor = torch.where(sink, self.beta, torch.where(target, grow, 1.0))
        rows = (q_idx >= self.from_column[b]) & (target_mass > 0)  # nowhere to send: unchanged
        return torch.where(rows, x * factor, x)
