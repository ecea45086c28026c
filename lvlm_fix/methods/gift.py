"""GIFT: gaze-shift-guided cross-modal fusion enhancement (Qi et al., arXiv 2510.22067).

What the reference does (official code amazon-science/GIFT @ e20b8a9, code commit 2fc7def:
`inference.py` builds the map, `transformers-4.50.0/.../llama/modeling_llama.py`,
`eager_attention_forward`, edits attention; `configs/llava_1.5_7b.yaml` holds the values):

1. Saliency map ("gaze shifts"), from a plain prefill. At map layer 11 (of 32), for each
   user-query row i, the positive change of its attention to each image column j against the
   row before, D[h, i, j] = max(A[h, i, j] - A[h, i-1, j], 0); the first query row is
   differenced against the row before it (the template's "\\n"). The top H//2 heads by total
   D are kept; S[j] = mean of D over (map layers, kept heads, query rows). S is clamped to
   mean +- 3 std (unbiased, over the image columns), min-max scaled to [0, 1], and the map is
   M[j] = exp(alpha * S_hat[j]) (alpha = 5), fixed for the sample.
2. Edit, in layers 12..22 (of 32), on the last query row only (the prefill's last prompt
   token, which gives the first token, and each decode step's token), after the softmax:
   HV = top H//2 heads by the row's total image attention; r = (image attention of HV after
   multiplying their image columns by M) / (before); HQ = top H//2 heads by total attention
   to the query columns (chosen independently); image columns of HV heads *= M, query columns
   of HQ heads *= r; the row is renormalised to sum 1. HV, HQ and r come from the unedited
   row, every step and every layer. The paper puts a beta on r (query x beta*r, beta = 1; the
   code has none, i.e. beta = 1): `beta`.

What runs here, and which choices are ours:
- One pass (ours; exactly equivalent): the reference runs a plain generate for the map, then
  a second, edited one. The map layers sit below every edited layer and the edit touches only
  the last row, so the hidden states at the map layers are those of the plain pass: the map is
  built at the map layers during the prefill and used from the next layers on. A config whose
  map layer is not below every edited layer (the reference's Qwen2-VL setting: map 14, edits
  5..18) would not be equivalent and is refused.
- Query span (the reference's: the user's words only, `v1 + 3 .. len - 6` in the llava-hf
  template): per row, columns [last image column + 1 + query_gap, S - query_tail) of the
  prompt (`ModelInfo.query_gap`/`query_tail`, read from the model's own template), so other
  templates work. This assumes a one-turn prompt (`Sample.text`); with a multi-turn
  `Sample.chat` the span runs from after the last image to the generation prompt.
- Content-word filter: not available. The reference keeps only the query rows whose word spaCy
  (`en_core_web_sm`) tags NOUN/PROPN/VERB/ADJ/ADV/NUM when building the map. That needs a
  spaCy model download, which this library never does, so every query row counts (the
  reference's own fallback for the head-selection step; the edit itself uses the whole query
  span in the reference too). No switch: there is nothing offline to switch to.
- Map layers: the reference's fixed layer (`map_layers="auto"`, a list averages as the code
  does), or "peak" (ours): per row, the layer below the first edited layer whose total
  positive change (all heads, query rows, image columns) is largest, after the paper's
  description ("the layer with the largest total positive change").
- Precision (ours): the map and the edit in fp32 (the reference: fp16).
- Renormalisation: of the edited row only (the Llama reference divides every row, a no-op up
  to fp16 rounding on rows it did not edit).
- Degenerate rows (ours; the reference gives NaN): a row without image, with an empty query
  span, or of a view that is not edited (`View.edited`, e.g. PAI-CFG's text-only row) is left
  unchanged. A map whose values are all equal (max = min) gives S_hat = 0, M = 1.
- Batches (ours; the reference is batch-1 with absolute indices): every span, map, head choice
  and ratio is per row, so left padding, views and batch-mates change nothing.
- Images: the map covers every image column of a row (several images; LLaVA-NeXT and
  OneVision anyres: the base image's and every crop's tokens and the newline tokens, one map
  over them all, since the reference's map is over the prompt's image span). With other
  methods, the map layers' probabilities are the stock ones of that layer's q/k, and the edit
  sees the row after PAI's gain and VAR, before VHR's head scale.

Layers on other depths: the reference's LLaVA-1.5-7B layers scale with the depth L:
map layer round(11 L/32), edited layers round(12 L/32) .. round(22 L/32) inclusive (32 layers:
11 and 12..22; 4 layers: 1 and 2..3), the first edited layer raised above the map layer if
they meet. The reference's 13B setting (map 10, edits 14..20 of 40) is not what the rule
gives for 40 layers: pass it as explicit lists.

The edit is a probability modifier (`kernels.edits.Modifier`): it needs row sums and a top-k
over heads, which the fused kernels do not state, so requests run the plain-torch attention
path in those layers and decode in a lane of their own (`attention_paths`: "modifiers").

Refused: OPERA (its replays leave masked holes that the plain-torch path does not see), and
token pruning inside the LLM (FastV, DyVTE, FlowCut on LLaVA-NeXT), whose later layers hold
fewer columns than the prompt-column map.

State (re-indexed with the rows): "gift.raw" float [R, S] (the running map sum, or the peak
layer's map), "gift.best" float [R] (peak: its total shift), "gift.query" bool [R, S] (query
columns of active rows), "gift.active" bool [R], "gift.map" float [R, S] (M on image columns
of active rows, 1 elsewhere), "gift.image" bool [R, S].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator

from lvlm_fix.methods.base import Contribution, Intervention, register
from lvlm_fix.model import ModelInfo

if TYPE_CHECKING:
    from lvlm_fix.hooks import AttentionCall

# The reference's LLaVA-1.5-7B layers, of 32 (configs/llava_1.5_7b.yaml).
MAP_LAYER_32, FIRST_EDIT_32, LAST_EDIT_32 = 11, 12, 22


def _scaled(layer_of_32: int, num_layers: int) -> int:
    return int(layer_of_32 * num_layers / 32 + 0.5)


@register
class GIFT(Intervention):
    """Boost image attention by a gaze-shift map, query attention by the same overall ratio."""

    name: ClassVar[str] = "gift"
    hooks: ClassVar[frozenset] = frozenset({"attention"})
    conflicts: ClassVar[frozenset[str]] = frozenset({"opera", "fastv", "dyvte"})

    alpha: float = Field(
        5.0, ge=0.0, le=30.0, description="Map strength: M = exp(alpha * S_hat) (0 = M of 1)."
    )
    beta: float = Field(
        1.0, ge=0.0, le=100.0, description="Query attention of HQ heads x beta*r (paper; 1 = code)."
    )
    map_layers: Literal["auto", "peak"] | list[int] = Field(
        "auto",
        min_length=1,
        max_length=1024,
        description="Map layers: 'auto' = [round(11/32 L)]; a list is averaged (code); 'peak' = "
        "per row the layer below the edited ones with the largest total shift.",
    )
    layers: Literal["auto"] | list[int] = Field(
        "auto",
        max_length=1024,
        description="Edited layers: 'auto' = round(12/32 L)..round(22/32 L) ([] = off).",
    )

    @field_validator("map_layers", "layers")
    @classmethod
    def _indices(cls, layers: str | list[int]) -> str | list[int]:
        if isinstance(layers, list) and any(layer < 0 for layer in layers):
            raise ValueError(f"layers must be indices >= 0, got {layers}")
        return layers

    def is_neutral(self) -> bool:
        return self.layers == [] or (self.alpha == 0 and self.beta == 1)

    def contribute(self, model: ModelInfo) -> Contribution:
        map_layers, peak, layers = gift_layers(self.map_layers, self.layers, model.num_layers)
        hook = GazeShift(
            map_layers=map_layers,
            peak=peak,
            layers=layers,
            alpha=self.alpha,
            beta=self.beta,
            heads=max(model.num_heads // 2, 1),
            query_gap=model.query_gap,
            query_tail=model.query_tail,
        )
        # FlowCut on LLaVA-NeXT prunes inside the LLM (layer 0 and its llm_layer).
        conflicts = frozenset({"flowcut"}) if model.family == "llava_next" else frozenset()
        return Contribution(attention=hook, conflicts=conflicts, shared_decode=False)


def gift_layers(
    map_layers: str | list[int], layers: str | list[int], num_layers: int
) -> tuple[frozenset[int], bool, frozenset[int]]:
    """(map layers, peak mode, edited layers) on a model of `num_layers` layers, checked."""
    L = num_layers
    if layers == "auto":
        map_auto = _scaled(MAP_LAYER_32, L)
        first = max(_scaled(FIRST_EDIT_32, L), map_auto + 1)
        edited = frozenset(range(first, min(_scaled(LAST_EDIT_32, L), L - 1) + 1))
    else:
        edited = frozenset(layers)
    if not edited:
        raise ValueError(f"gift has no layer to edit on a model of {L} layers")
    peak = map_layers == "peak"
    if map_layers == "auto":
        chosen = frozenset({_scaled(MAP_LAYER_32, L)})
    elif peak:
        chosen = frozenset(range(min(edited)))
    else:
        chosen = frozenset(map_layers)
    bad = sorted(layer for layer in chosen | edited if layer >= L)
    if bad:
        raise ValueError(f"gift layers {bad} do not exist: the model has {L} layers")
    if not chosen or max(chosen) >= min(edited):
        raise ValueError(
            f"gift map layers {sorted(chosen)} must all lie below the first edited layer "
            f"{min(edited)}: the map is built in the same prefill and used from the next "
            "layers on, which equals the reference's separate plain pass only then"
        )
    return chosen, peak, edited


@dataclass(frozen=True)
class GazeShift:
    """AttentionHook: the map at the map layers (prefill, `after`), the edit in edited layers."""

    map_layers: frozenset[int]
    peak: bool  # per row, the map layer with the largest total shift (else: the mean)
    layers: frozenset[int]
    alpha: float
    beta: float
    heads: int  # heads kept per selection (H // 2)
    query_gap: int
    query_tail: int

    def edits(self, call: AttentionCall) -> dict[str, Any] | None:
        if call.layer not in self.layers:
            return None
        state = call.ctx.state
        if "gift.map" not in state:
            return None  # no map (a forward that never ran the map layers): nothing to do
        if call.ctx.phase == "prefill" and not bool(state["gift.active"].any()):
            return None  # no row to edit: stock attention (a host check, at prefill only)
        _refuse_pruning(call)
        mod = Enhance(
            state["gift.map"], state["gift.image"], state["gift.query"], state["gift.active"],
            self.beta, self.heads,
        )  # fmt: skip
        return {"prob_mods": (mod,)}

    def after(self, call: AttentionCall, out: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        if call.ctx.phase != "prefill" or call.layer not in self.map_layers:
            return
        _refuse_pruning(call)
        state = call.ctx.state
        if "gift.active" not in state:
            self._start(call)
        active = state["gift.active"]
        if bool(active.any()):
            self._add_layer(call)
        if call.layer == max(self.map_layers):
            self._finish(call)

    def _start(self, call: AttentionCall) -> None:
        """Per row: the query columns (after the last image column) and whether it is edited."""
        state = call.ctx.state
        image = call.ctx.layout.image_mask  # [R, S]
        R, S = image.shape
        cols = torch.arange(S, device=image.device)
        last_image = torch.where(image, cols, -1).amax(-1)  # [R]
        q0 = last_image + 1 + self.query_gap
        q1 = S - self.query_tail
        active = state["row.edited"] & (last_image >= 0) & (q1 > q0)
        state["gift.active"] = active
        state["gift.image"] = image
        state["gift.query"] = (cols >= q0[:, None]) & (cols < q1) & active[:, None]
        state["gift.raw"] = torch.zeros(R, S, dtype=torch.float32, device=image.device)
        state["gift.best"] = torch.full((R,), -1.0, dtype=torch.float32, device=image.device)

    def _add_layer(self, call: AttentionCall) -> None:
        """This layer's map: positive shifts of query rows over image columns, top heads."""
        state = call.ctx.state
        image, query = state["gift.image"], state["gift.query"]  # [R, S]
        S = image.shape[1]
        first_row = torch.where(query, torch.arange(S, device=image.device), S).amin()
        q1 = S - self.query_tail
        rows = torch.arange(int(first_row) - 1, q1, device=image.device)  # one before the first
        probs = call.probabilities(rows)[..., :S]  # [R, H, n, S] fp32, stock
        shift = (probs[:, :, 1:] - probs[:, :, :-1]).clamp_min(0)  # rows rows[1:]
        where = query[:, rows[1:]][:, None, :, None] & image[:, None, None, :]
        shift = shift * where  # [R, H, n-1, S]: query rows of the row, image columns
        per_head = shift.sum((2, 3))  # [R, H]
        kept = top_heads(per_head, self.heads)
        n_rows = query.sum(-1).clamp(min=1).float()  # [R]
        layer_map = (shift * kept[:, :, None, None]).sum((1, 2)) / (self.heads * n_rows[:, None])
        if self.peak:  # keep the layer with the largest total shift (ties: the lower layer)
            total = per_head.sum(-1)
            better = total > state["gift.best"]
            state["gift.best"] = torch.where(better, total, state["gift.best"])
            state["gift.raw"] = torch.where(better[:, None], layer_map, state["gift.raw"])
        else:
            state["gift.raw"] = state["gift.raw"] + layer_map / len(self.map_layers)

    def _finish(self, call: AttentionCall) -> None:
        """M = exp(alpha * S_hat): 3-sigma clamp, min-max over each row's image columns."""
        state = call.ctx.state
        image, active = state["gift.image"], state["gift.active"]
        s_hat = normalised_map(state["gift.raw"], image)
        edit = image & active[:, None]
        state["gift.map"] = torch.where(edit, torch.exp(self.alpha * s_hat), 1.0)


def normalised_map(raw: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """S_hat [R, S] in [0, 1] on image columns (0 elsewhere): raw clamped to mean +- 3 std
    (unbiased, over the row's image columns), then min-max. A row whose clamped values are all
    equal (or that has no image column) gets 0."""
    n = image.sum(-1, keepdim=True).float()  # [R, 1]
    mean = (raw * image).sum(-1, keepdim=True) / n.clamp(min=1)
    var = (((raw - mean) * image) ** 2).sum(-1, keepdim=True) / (n - 1).clamp(min=1)
    std = torch.where(n > 1, var.sqrt(), 0.0)
    clamped = torch.minimum(torch.maximum(raw, mean - 3 * std), mean + 3 * std)
    low = torch.where(image, clamped, float("inf")).amin(-1, keepdim=True)
    high = torch.where(image, clamped, float("-inf")).amax(-1, keepdim=True)
    span = high - low
    ok = image & (span > 0)
    return torch.where(ok, (clamped - low) / torch.where(span > 0, span, 1.0), 0.0)


def top_heads(score: torch.Tensor, k: int) -> torch.Tensor:
    """bool [R, H]: the k heads with the largest score in each row (torch.topk's choice)."""
    picked = torch.zeros_like(score, dtype=torch.bool)
    return picked.scatter_(-1, score.topk(k, dim=-1).indices, True)


def _refuse_pruning(call: AttentionCall) -> None:
    if any(columns is not None for columns in call.ctx.layout.columns):
        raise ValueError(
            "gift cannot run with token pruning inside the LLM: its map lives in the prompt's "
            "columns, which pruned layers no longer hold"
        )


@dataclass(frozen=True)
class Enhance:
    """Probability modifier: GIFT's edit of each row's last query row (x [B, H, Q, K] fp32).

    Not a pointwise FlexAttention mod: it needs the row's per-head sums, a top-k over heads and
    the row's total, so it reads the whole last row (the plain-torch path has it). Tensors are
    over the prompt's S columns (K may be wider: generated columns are neither image nor query).
    """

    weight: torch.Tensor  # float32 [B, S]: M on image columns of active rows, else 1
    image: torch.Tensor  # bool [B, S]
    query: torch.Tensor  # bool [B, S]: query columns of active rows
    active: torch.Tensor  # bool [B]
    beta: float
    heads: int

    def __call__(self, x, b, h, q_idx, kv_idx):
        rows = b.reshape(-1)
        extra = x.shape[-1] - self.image.shape[1]
        pad = torch.nn.functional.pad
        weight = pad(self.weight[rows], (0, extra), value=1.0)[:, None]  # [B, 1, K]
        image = pad(self.image[rows], (0, extra), value=False)[:, None]
        query = pad(self.query[rows], (0, extra), value=False)[:, None]
        p = x[:, :, -1]  # [B, H, K]: the last query row, unedited by GIFT
        before = (p * image).sum(-1)  # [B, H]
        hv = top_heads(before, self.heads)
        after = (p * weight * image).sum(-1)
        orig, enhanced = (before * hv).sum(-1), (after * hv).sum(-1)  # [B]
        r = torch.where(orig > 0, enhanced / torch.where(orig > 0, orig, 1.0), 1.0)
        hq = top_heads((p * query).sum(-1), self.heads)
        scale = torch.where(hv[..., None] & image, weight, 1.0)
        scale = scale * torch.where(hq[..., None] & query, self.beta * r[:, None, None], 1.0)
        edited = p * scale
        total = edited.sum(-1, keepdim=True)
        edited = torch.where(total > 0, edited / torch.where(total > 0, total, 1.0), p)
        # In place: at prefill x is the whole [B, H, S, S] (fresh from the softmax or VAR), and
        # a copy of it for one row would double the plain-torch path's largest tensor.
        x[:, :, -1] = torch.where(self.active[rows][:, None, None], edited, p)
        return x
