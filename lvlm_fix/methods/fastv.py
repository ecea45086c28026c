"""FastV (arXiv 2403.06764): drop the least-attended image tokens once, at the input of layer K.

Layer K-1's attention gives every image token a score: by default the attention row of the last
prompt token (the official code; "mean" = the paper's mean over all query rows), softmax over
all keys, averaged over heads. It is computed as a cheap side row after the layer's attention,
so no `output_attentions` and no eager attention. Layers >= K then see, and cache, only the kept
image tokens; every token keeps its original position id. Rows may keep different counts (for
example, rows with several images); the core pads them with masked filler columns.

`mode`: "prefill" (default) prunes once, at prefill, like the repository's KV-cache variant:
every decode step sees the same kept tokens. "per_step" is the setting behind the paper's
evaluation, the repository's `use_cache=False` path: each step runs the whole sequence again and
prunes at layer K from that step's attention row (the newest token's), so the kept set may
change every step. It runs without a KV cache (`Contribution.recompute`), which costs a full
forward per token. It refuses VHR, whose head choice needs the prefill's counterfactual row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field

from lvlm_fix.hooks import AttentionCall, ForwardContext
from lvlm_fix.methods.base import Contribution, Intervention, register
from lvlm_fix.model import ModelInfo


def top_image_columns(scores: torch.Tensor, image: torch.Tensor, n_keep: torch.Tensor):
    """keep bool [R, W]: every non-image column plus the n_keep[r] best image columns of row r.

    Ties break toward the lower column (stable sort), so the choice is deterministic.
    """
    # (scores come from the layer before: on a split model, maybe from another device)
    scores = scores.to(image.device, torch.float32, non_blocking=True)
    ranked = scores.masked_fill(~image, float("-inf"))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ~image | (image & (rank < n_keep[:, None]))


def attention_rows(call: AttentionCall, mode: str) -> torch.Tensor:
    """Head-mean attention probabilities each key column receives: [R, K] (fp32)."""
    query = call.query[:, :, -1:] if mode == "last" else call.query  # slice before upcasting
    query, key = query.float(), call.key.float()
    rows, heads, q_len, dim = query.shape
    # GQA: query head h reads KV head h // groups; group the query heads per KV head instead
    # of repeating the keys: [R, Hkv, groups * Q, D] @ [R, Hkv, D, K].
    grouped = query.reshape(rows, key.shape[1], -1, dim) @ key.transpose(-1, -2)
    logits = grouped.view(rows, heads, q_len, -1) * call.scaling  # [R, H, Q, K]
    k_len = key.shape[2]
    columns = torch.arange(k_len, device=key.device)
    padding = columns[None] < call.layout.key_start[:, None]  # [R, K]
    hidden = padding[:, None, None, :] | (
        columns[None, :] > call.query_columns[-query.shape[2] :, None]
    )
    probs = logits.masked_fill(hidden, float("-inf")).softmax(-1).mean(1)  # [R, Q, K]
    if mode == "last":
        return probs[:, 0]
    real_rows = (call.query_columns[None] >= call.layout.key_start[:, None]).float()  # [R, Q]
    return (probs * real_rows[:, :, None]).sum(1) / real_rows.sum(1, keepdim=True).clamp(min=1)


@dataclass(frozen=True)
class _FastVHook:
    """Attention side row at layer K-1, then the prune choice at the input of layer K."""

    layer: int
    ratio: float
    keep: int | None
    mode: str

    def edits(self, call: AttentionCall) -> None:
        return None

    def after(self, call: AttentionCall, out: torch.Tensor, stats: dict) -> None:
        if call.ctx.phase == "prefill" and call.layer == self.layer - 1:
            call.ctx.scratch["fastv.score"] = attention_rows(call, self.mode)

    def select(self, layer: int, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        if layer != self.layer:
            return None
        image = ctx.layout.at_layer(layer - 1).image_mask  # columns of `hidden`
        n_image = image.sum(-1)
        if self.keep is not None:
            n_keep = n_image.clamp(max=self.keep)
        else:
            n_keep = torch.round(n_image.double() * (1 - self.ratio)).long()
        return top_image_columns(ctx.scratch["fastv.score"], image, n_keep)


@register
class FastV(Intervention):
    """Prune image tokens inside the LLM from one attention row (FastV)."""

    name: ClassVar[str] = "fastv"
    hooks: ClassVar[frozenset] = frozenset({"attention", "prune"})
    # OPERA's attention row and VAR's sink masks are kept in the unpruned prompt's columns;
    # they compose once they read the per-layer layout (`ctx.layout.at_layer(layer)`).
    conflicts: ClassVar[frozenset[str]] = frozenset({"opera", "var"})

    layer: int = Field(2, ge=1, le=1024, description="K: layers >= K see the pruned image tokens")
    ratio: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="fraction of image tokens dropped (0 = off); unused if keep",
    )
    keep: int | None = Field(
        None,
        ge=0,
        le=1 << 20,
        description="image tokens kept per row (None = use ratio; >= count = off)",
    )
    score_mode: Literal["last", "mean"] = Field(
        "last", description="'last': last prompt token's row (official code); 'mean': all rows"
    )
    mode: Literal["prefill", "per_step"] = Field(
        "prefill",
        description="Prune once at prefill (KV-cache code), or again every step without a cache.",
    )

    def is_neutral(self) -> bool:
        return self.keep is None and self.ratio == 0.0

    def contribute(self, model: ModelInfo) -> Contribution:
        if self.layer >= model.num_layers:
            raise ValueError(f"fastv layer={self.layer} must be below {model.num_layers} layers")
        hook = _FastVHook(self.layer, self.ratio, self.keep, self.score_mode)
        if self.mode == "prefill":
            return Contribution(attention=hook, prune=hook)
        return Contribution(
            attention=hook, prune=hook, recompute=True, conflicts=frozenset({"vhr"})
        )
