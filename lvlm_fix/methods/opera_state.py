"""OPERA's building blocks: the last-layer attention row, column scores, and per-sample state.

Kept apart from `opera.py` (the search loop) so each piece is small and unit-testable.
Shapes: R rows (sample, beam[, candidate]), H heads, K cache columns, C candidates, t response
tokens already committed on a beam.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lvlm_fix.hooks import AttentionCall

ROW_KEY = "opera.row"  # fp32 [R, K]: max-over-heads, renormalised last-layer row of the last query
HOLE_KEY = "opera.hole"  # long [R, 2]: cache columns [from, to) that are holes after a replay


def last_query_probs(call: AttentionCall, hole: torch.Tensor | None) -> torch.Tensor:
    """Attention probabilities of the last query row, fp32 [R, H, K], as eager attention has them.

    softmax(q·Kᵀ·scale) over the whole cache: left padding (columns before key_start) and replay
    holes are masked. GQA: each group of H/Hkv query heads reads its shared key head.
    """
    R, H, _, D = call.query.shape
    Hkv, K = call.key.shape[1], call.key.shape[2]
    q = call.query[:, :, -1].float().view(R, Hkv, H // Hkv, D)  # [R, Hkv, n, D]
    logits = torch.einsum("rgnd,rgkd->rgnk", q, call.key.float()) * call.scaling
    columns = torch.arange(K, device=q.device)
    masked = columns[None] < call.ctx.layout.key_start[:, None]  # [R, K]
    if hole is not None:
        masked |= (columns[None] >= hole[:, :1]) & (columns[None] < hole[:, 1:])
    logits = logits.masked_fill(masked[:, None, None], float("-inf"))
    return logits.softmax(-1).view(R, H, K)


def renormalised_row(probs: torch.Tensor) -> torch.Tensor:
    """Max over heads, then renormalise over the full row: [R, H, K] -> [R, K] (spec §1.1)."""
    top = probs.max(1).values
    return top / top.sum(-1, keepdim=True)


@dataclass(frozen=True)
class LastRowHook:
    """AttentionHook: stores the last layer's last-query row in ctx.state (decode phase only).

    It edits nothing, so every layer still runs stock SDPA; the row costs O(H·K·D) per query.
    """

    def edits(self, call: AttentionCall) -> dict[str, Any] | None:
        return None

    def after(self, call: AttentionCall, out: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        ctx = call.ctx
        if ctx.phase != "decode" or call.layer != ctx.num_layers - 1:
            return
        ctx.state[ROW_KEY] = renormalised_row(last_query_probs(call, ctx.state.get(HOLE_KEY)))


def column_scores(
    logcol: torch.Tensor, window: torch.Tensor, scale: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log column scores of candidate rows (spec §1.3), in log space.

    logcol [K, t]: Σ log(σ·a) over committed rows for each response column j < t.
    window [K, C, t+1]: each candidate's renormalised row over the response columns (last = self).
    Returns log φ [K, C], loc [K, C] (argmax column) and the candidate's log(σ·a) row [K, C, t+1].
    """
    logw = torch.log(window * scale)
    t = logcol.shape[1]
    logs = torch.cat([logcol[:, None] + logw[..., :t], logw[..., t:]], -1) + math.log(eps)
    log_phi, loc = logs.max(-1)
    return log_phi, loc, logw


def column_scores_fp16(
    logcol: torch.Tensor, window: torch.Tensor, scale: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`column_scores` with the reference's fp16 buffers (spec §1.3), for reproduction only.

    σ·a is rounded to fp16, each column's product to fp16 (inf past 65504) and ε·product to
    fp16 (0 below about 3e-8). A candidate whose columns all underflow gets φ = 0 and, from the
    max over equal zeros, location 0. Same returns as `column_scores` (log φ = -inf for φ = 0).
    """
    logw = torch.log((window.half() * scale).float())
    t = logcol.shape[1]
    logs = torch.cat([logcol[:, None] + logw[..., :t], logw[..., t:]], -1)
    scores = (eps * logs.exp().half().float()).half()  # the reference's fp16 score buffer
    loc = scores.argmax(-1)  # the first column on ties
    return scores.gather(-1, loc[..., None]).squeeze(-1).float().log(), loc, logw


def mode_smallest(values: torch.Tensor, bound: int) -> torch.Tensor:
    """Mode along the last dim, ties broken by the smallest value: long [..., n] -> [...].

    All values must lie in [0, bound). (torch.mode leaves its tie-break undocumented.)
    """
    counts = (values[..., :, None] == values[..., None, :]).sum(-1)  # [..., n]
    key = counts * bound - values  # more occurrences first, then the smaller value
    return values.gather(-1, key.argmax(-1, keepdim=True)).squeeze(-1)


def adjusted_logits(
    cand_z: torch.Tensor,
    image_mass: torch.Tensor,
    log_phi: torch.Tensor,
    step: int,
    penalty: float,
    bonus_tokens: int,
) -> torch.Tensor:
    """Candidate logits after OPERA's term [K, C]: image bonus early, over-trust penalty later.

    The reference switches on the window width t+1 and subtracts φ itself (not log φ).
    """
    if step + 1 <= bonus_tokens:
        return cand_z + penalty * image_mass
    return cand_z - penalty * log_phi.exp()


def candidate_log_probs(
    cand_ids: torch.Tensor, adjusted: torch.Tensor, vocab: int, fill: float = -999.0
) -> torch.Tensor:
    """The reference's restricted beam row: fill, scatter candidates, log_softmax. [K, V].

    Non-candidates are then set to -inf: the chosen token must be one whose forward we ran
    (the reference could pick a filler token once every candidate sinks below the fill).
    """
    row = adjusted.new_full((adjusted.shape[0], vocab), fill)
    row.scatter_(1, cand_ids, adjusted)
    log_probs = row.log_softmax(-1)
    keep = torch.zeros_like(log_probs, dtype=torch.bool).scatter_(1, cand_ids, True)
    return log_probs.masked_fill(~keep, float("-inf"))


@dataclass
class Snapshot:
    """One sample's search state at the start of a step (what a rollback restores)."""

    beams: Any  # search._BeamState of this sample (batch of one), cloned
    logcol: torch.Tensor  # [K, T]
    choice: tuple[torch.Tensor, torch.Tensor] | None = None  # (parents [K], tokens [K]) chosen


@dataclass
class SampleState:
    """Everything OPERA tracks for one sample (never shared across the batch)."""

    beams: Any  # search._BeamState, batch of one
    logcol: torch.Tensor  # fp32 [K, T]: running log column products, valid for columns < t
    active: bool = True
    pending: bool = False  # the last chosen token was fed by the decode loop, row not committed
    history: torch.Tensor | None = None  # long [T, K]: loc_mode per step, first `t` rows valid
    # length_includes_prompt: its prompt's ids as transformers 4.29 counted them (else None)
    prompt_ids: int | None = None
    snapshots: dict[int, Snapshot] = field(default_factory=dict)
    rollback_count: dict[int, int] = field(default_factory=dict)
    bans: dict[int, set[tuple[int, int]]] = field(default_factory=dict)
    rollbacks: list[dict[str, Any]] = field(default_factory=list)  # log: step, to, banned, chosen

    @property
    def t(self) -> int:
        return self.beams.length


def clone_beams(beams: Any) -> Any:
    """A deep copy of a _BeamState (its tensors are replaced, never edited in place)."""
    tensors = {k: v.clone() for k, v in vars(beams).items() if isinstance(v, torch.Tensor)}
    return replace(beams, **tensors)
