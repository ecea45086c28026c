"""OPERA (Huang et al., CVPR 2024): beam search with an over-trust penalty and retrospection.

Each step, every beam proposes its top-C tokens. All K·C candidates run in ONE forward (the
cache rows are expanded C×); the last decoder layer's attention row of each candidate, captured
by `LastRowHook`, scores how much the response keeps leaning on one earlier "summary" token
(column products in log space). The candidates' logits are adjusted (an image-attention bonus
for the first tokens, the over-trust penalty afterwards) and a restricted beam step picks the
continuations; the chosen candidates' rows stay in the cache and their logits are the next
step's scores, so no separate forward is needed. When one summary location dominates every
beam's history, the sample rolls back to the token after it and re-decides it with the plain
logits, banning the continuations chosen there before. The KV cache is rebuilt by cropping to
the prompt and replaying the response tokens, never by re-encoding the image.

Everything is per sample: a rollback of one sample never changes another's tokens.
Reference semantics and the differences are in the spec (specs/opera.md).

Two reproduction switches copy reference numerics that our defaults deliberately avoid:
`score_dtype="float16"` keeps column scores in fp16 buffers as the reference does (ε·product
underflows to 0 for every product below about 0.3; a candidate whose columns all do gets φ = 0
and the spurious location 0), and `length_includes_prompt=True` normalises beam scores by
transformers 4.29's length, which counts the prompt's ids (each image one placeholder id, as in
the reference's LLaVA path).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from lvlm_fix.methods.base import Contribution, Intervention, register
from lvlm_fix.methods.opera_state import (
    HOLE_KEY,
    ROW_KEY,
    LastRowHook,
    SampleState,
    Snapshot,
    adjusted_logits,
    candidate_log_probs,
    clone_beams,
    column_scores,
    column_scores_fp16,
    mode_smallest,
)
from lvlm_fix.model import ModelInfo, PromptBatch
from lvlm_fix.params import GenerationParams
from lvlm_fix.search import BeamSearch, Limits, SearchResult, Step, advance_beams


@register
class Opera(Intervention):
    """OPERA's beam search. Defaults are the paper's released settings."""

    name: ClassVar[str] = "opera"
    hooks: ClassVar[frozenset] = frozenset({"search", "attention"})

    num_beams: int = Field(5, ge=1, le=16, description="Beams K (1 = a single beam).")
    candidates: int = Field(
        5, ge=1, le=1 << 20, description="Candidates C per beam (vocab size = no cut)."
    )
    scale: float = Field(
        50.0, gt=0, le=1e4, description="σ, attention scale in the column products."
    )
    penalty: float = Field(
        1.0, ge=0, le=1e3, description="α, weight of bonus and penalty (0 = off)."
    )
    threshold: int = Field(
        15,
        ge=0,
        le=1 << 20,
        description="r: rollback once a location recurs > r times (≥ max tokens = off).",
    )
    bonus_tokens: int = Field(
        10,
        ge=0,
        le=1 << 20,
        description="First response tokens that get the image bonus (0 = none).",
    )
    min_rollback_loc: int = Field(
        10,
        ge=0,
        le=1 << 20,
        description="No rollback to a summary token before this response index.",
    )
    max_rollbacks_per_position: int | None = Field(
        None,
        ge=0,
        le=1 << 20,
        description="β, rollbacks per position (None = candidates, 0 = no rollback).",
    )
    eps: float = Field(
        1e-7, gt=0, le=1.0, description="ε factor of the column score (reference value)."
    )
    length_penalty: float = Field(
        1.0, ge=-10.0, le=10.0, description="Beam score / length**penalty (HF default 1)."
    )
    early_stopping: bool = Field(False, description="Stop once num_beams hypotheses finished.")
    history: Literal["slot", "lineage"] = Field(
        "slot",
        description="Location history per beam slot (reference) or gathered along beam lineage.",
    )
    keep_stale_bans: bool = Field(
        True, description="Keep bans of positions past a rollback point (reference: True)."
    )
    score_dtype: Literal["float32", "float16"] = Field(
        "float32",
        description="Column scores in log space (float32) or the reference's fp16 buffers.",
    )
    length_includes_prompt: bool = Field(
        False, description="Beam length counts the prompt (reference, transformers 4.29)."
    )

    def contribute(self, model: ModelInfo) -> Contribution:
        # shared_decode=False: the recorder looks at every decode step's attention row
        return Contribution(search=OperaSearch(self), attention=LastRowHook(), shared_decode=False)


@dataclass
class OperaState:
    samples: list[SampleState]
    limits: Limits
    prompt_len: int = -1  # cache columns of the (padded) prompt; set at the first step


@dataclass(frozen=True)
class OperaSearch:
    """The Search: width K; each step runs the K·C candidate forward itself."""

    handles_views: ClassVar[bool] = False  # candidate rows are one per beam: no extra view rows

    config: Opera

    @property
    def width(self) -> int:
        return self.config.num_beams

    @property
    def params(self) -> GenerationParams:
        """The beam settings `advance_beams` reads."""
        return GenerationParams(
            num_beams=self.config.num_beams,
            length_penalty=self.config.length_penalty,
            early_stopping=self.config.early_stopping,
        )

    @property
    def budget(self) -> int:
        """β: rollbacks allowed per position."""
        budget = self.config.max_rollbacks_per_position
        return self.config.candidates if budget is None else budget

    @property
    def column_scores(self) -> Callable[..., tuple[torch.Tensor, ...]]:
        """In log space (float32) or in the reference's fp16 buffers (`score_dtype`)."""
        return column_scores_fp16 if self.config.score_dtype == "float16" else column_scores

    def start(self, batch_size: int, limits: Limits, device: torch.device) -> OperaState:
        beams = BeamSearch(self.params)
        T, K = limits.max_new_tokens, self.width
        samples = [
            SampleState(
                beams=beams.start(1, limits, device),
                logcol=torch.zeros(K, T, device=device),
                history=torch.zeros(T, K, dtype=torch.long, device=device),
            )
            for _ in range(batch_size)
        ]
        return OperaState(samples, limits)

    def step(self, scores: torch.Tensor, st: OperaState, runner: Any) -> Step:
        if st.prompt_len < 0:
            st.prompt_len = runner.attention_mask.shape[1]
            runner.state[HOLE_KEY] = torch.full_like(runner.attention_mask[:, :2], st.prompt_len)
            if self.config.length_includes_prompt:
                per_sample = len(runner.plan.views) + 1
                lengths = reference_prompt_ids(runner.batch, per_sample)
                for sample, length in zip(st.samples, lengths, strict=True):
                    sample.prompt_ids = length
        self._commit_pending(st, runner)
        for s in st.samples:
            if s.active and s.t >= self.config.min_rollback_loc:
                s.snapshots[s.t] = Snapshot(clone_beams(s.beams), s.logcol.clone())
        was_active = [s.active for s in st.samples]
        tokens, next_logits = self._candidate_step(scores, st, runner)
        targets = {
            b: rp
            for b, s in enumerate(st.samples)
            if was_active[b] and (rp := self._rollback_target(s)) is not None
        }
        done = not any(s.active for s in st.samples)
        if not targets:
            return Step(tokens=tokens, parents=None, done=done, next_logits=next_logits)
        return self._rollback(st, runner, targets)

    def result(self, st: OperaState) -> SearchResult:
        beams = BeamSearch(self.params)
        parts = [beams.result(s.beams) for s in st.samples]
        return SearchResult([p.tokens[0] for p in parts], [p.finish_reasons[0] for p in parts])

    # -- one OPERA step -------------------------------------------------------------------

    def _candidate_step(self, scores: torch.Tensor, st: OperaState, runner: Any):
        """Run all K·C candidates in one forward, pick per sample, keep the chosen rows."""
        cfg = self.config
        B, K, V = scores.shape
        C = min(cfg.candidates, V)
        # Tokens min_tokens holds back are no candidates: no beam could take them (advance_beams)
        scores = torch.stack([st.limits.hold(scores[b], s.t) for b, s in enumerate(st.samples)])
        cand_z, cand_ids = scores.topk(C, -1)  # [B, K, C] raw logits and their ids
        rows = torch.arange(B * K, device=scores.device)
        runner.select_rows(rows.repeat_interleave(C))
        logits = runner.forward(cand_ids.reshape(B * K * C, 1))[:, -1]  # [B·K·C, V]
        attn = runner.state[ROW_KEY]  # [B·K·C, cache columns]
        prompt = attn[:, : st.prompt_len] * runner.layout.image_mask
        image_mass = prompt.sum(-1).view(B, K, C)
        chosen, tokens = [], []
        for b, s in enumerate(st.samples):
            base = b * K * C
            if not s.active:  # finished: keep its rows going with any candidate
                chosen.append(base + torch.arange(K, device=scores.device) * C)
                tokens.append(cand_ids[b, :, 0])
                continue
            window = attn[base : base + K * C, -(s.t + 1) :].view(K, C, s.t + 1)
            parents, picked, c_star = self._select(
                s, cand_z[b], cand_ids[b], image_mass[b], window, V
            )
            chosen.append(base + parents * C + c_star)
            tokens.append(picked)
        chosen_rows = torch.cat(chosen)
        runner.select_rows(chosen_rows)
        return torch.stack(tokens), logits[chosen_rows]

    def _select(self, s: SampleState, cand_z, cand_ids, image_mass, window, vocab: int):
        """The OPERA beam step of one sample; updates its state. Returns parents, tokens, c*."""
        cfg, t = self.config, s.t
        log_phi, loc, logw = self.column_scores(s.logcol[:, :t], window, cfg.scale, cfg.eps)
        adjusted = adjusted_logits(cand_z, image_mass, log_phi, t, cfg.penalty, cfg.bonus_tokens)
        log_probs = candidate_log_probs(cand_ids, adjusted, vocab)
        step = advance_beams(s.beams, log_probs[None], self.params, s.prompt_ids)
        parents, picked = step.parents[0], step.tokens[0]
        # A beam continued with -inf score (fewer live candidates than beams) has no match: c*=0.
        c_star = (cand_ids[parents] == picked[:, None]).long().argmax(-1)
        row = logw[parents, c_star]  # [K, t+1]: the chosen candidates' committed rows
        logcol = s.logcol[parents].clone()
        logcol[:, :t] += row[:, :t]
        logcol[:, t] = row[:, t]
        s.logcol = logcol
        s.history[t] = mode_smallest(loc, s.history.shape[0] + 1)  # slot-indexed, pre-selection
        if cfg.history == "lineage":
            s.history[: t + 1] = s.history[: t + 1, parents]
        if t in s.snapshots:
            s.snapshots[t].choice = (parents, picked)
        s.active = not step.done
        return parents, picked, c_star

    # -- retrospection --------------------------------------------------------------------

    def _rollback_target(self, s: SampleState) -> int | None:
        """The reference's trigger (spec §2.2), for one sample after its step."""
        cfg, t = self.config, s.t
        loc_star = int(mode_smallest(s.history[t - 1], s.history.shape[0] + 1))
        if loc_star < cfg.min_rollback_loc:
            return None
        counts = (s.history[:t] == loc_star).sum(0)  # [K] per beam slot
        if not bool((counts > cfg.threshold).all()):
            return None
        rp = loc_star + 1
        if s.rollback_count.get(rp, 0) >= self.budget:
            rp -= 1
        # rp = 0 would re-decide the first token, whose logits came from the prefill: not kept
        if s.rollback_count.get(rp, 0) >= self.budget or not 0 < rp < t or rp not in s.snapshots:
            return None
        return rp

    def _restore(self, s: SampleState, rp: int) -> None:
        """Back to the start of step rp; ban the continuations the discarded branch took."""
        snap = s.snapshots[rp]
        parents, picked = snap.choice
        s.bans.setdefault(rp, set()).update(zip(parents.tolist(), picked.tolist(), strict=True))
        if not self.config.keep_stale_bans:
            s.bans = {p: bans for p, bans in s.bans.items() if p <= rp}
        s.snapshots = {p: snap for p, snap in s.snapshots.items() if p <= rp}
        s.beams, s.logcol = clone_beams(snap.beams), snap.logcol.clone()
        s.rollback_count[rp] = s.rollback_count.get(rp, 0) + 1
        s.active = True
        # history rows < rp+1 stay: step rp's own entry is kept, as the reference does

    def _rollback(self, st: OperaState, runner: Any, targets: dict[int, int]) -> Step:
        """Restore the rolled-back samples, rebuild the cache, re-decide their step rp."""
        K, pad = self.width, st.limits.pad_id
        start = {b: st.samples[b].t for b in targets}
        for b, rp in targets.items():
            self._restore(st.samples[b], rp)
        logits = self._replay(st, runner, set(targets))  # [R, V] after each row's replay
        rows = torch.arange(len(st.samples) * K, device=logits.device)
        feed = []
        for b, s in enumerate(st.samples):
            if b in targets:
                parents, picked = self._reselect(s, logits[b * K : (b + 1) * K], targets[b])
                s.rollbacks[-1]["from"] = start[b]
                rows[b * K : (b + 1) * K] = b * K + parents
                feed.append(picked)
            elif s.active:
                feed.append(s.beams.running[0, :, s.t - 1])  # re-fed: its replay stops before it
            else:
                feed.append(torch.full((K,), pad, dtype=torch.long, device=logits.device))
        runner.select_rows(rows)
        done = not any(s.active for s in st.samples)
        return Step(tokens=torch.stack(feed), parents=None, done=done, next_logits=None)

    def _reselect(self, s: SampleState, logits: torch.Tensor, rp: int):
        """Step rp again with the plain full-vocab logits [K, V], banned continuations at min."""
        row = logits.clone()
        for beam, token in s.bans.get(rp, ()):
            row[beam, token] = logits.min()
        step = advance_beams(s.beams, row.log_softmax(-1)[None], self.params, s.prompt_ids)
        parents, picked = step.parents[0], step.tokens[0]
        s.snapshots[rp].choice = (parents, picked)
        s.logcol = s.logcol[parents]
        if self.config.history == "lineage":
            s.history[: rp + 1] = s.history[: rp + 1, parents]
        s.pending, s.active = True, not step.done
        s.rollbacks.append(
            {
                "to": rp,
                "banned": sorted(s.bans.get(rp, ())),
                "chosen": list(zip(parents.tolist(), picked.tolist(), strict=True)),
            }
        )
        return parents, picked

    def _replay(self, st: OperaState, runner: Any, rolled: set[int]) -> torch.Tensor:
        """Crop every row to the prompt and replay its response tokens, right-aligned.

        Rolled-back samples replay their restored beams (all rp tokens: the logits of step rp
        come out); the others replay all but their last token, which the decode loop feeds
        next. Shorter rows get holes between prompt and response: masked, without positions.
        """
        S = st.prompt_len
        seqs = []
        for b, s in enumerate(st.samples):
            n = s.t if b in rolled else (s.t - 1 if s.active else 0)
            seqs.extend(s.beams.running[0, :, :n])
        width = max(len(seq) for seq in seqs)
        device = runner.attention_mask.device
        tokens = torch.full((len(seqs), width), st.limits.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(tokens)
        for r, seq in enumerate(seqs):
            tokens[r, width - len(seq) :] = seq
            mask[r, width - len(seq) :] = 1
        runner.crop(S)
        holes = width - mask.sum(-1)
        runner.state[HOLE_KEY] = torch.stack([holes * 0 + S, S + holes], -1)
        return runner.forward(tokens, mask)[:, -1]

    def _commit_pending(self, st: OperaState, runner: Any) -> None:
        """Add the attention row of each re-decided token (fed by the decode loop) to logcol."""
        K = self.width
        for b, s in enumerate(st.samples):
            if not s.pending:
                continue
            t = s.t - 1  # response index of the re-decided token
            row = runner.state[ROW_KEY][b * K : (b + 1) * K, -(t + 1) :]  # [K, t+1]
            logw = torch.log(row * self.config.scale)
            s.logcol[:, :t] += logw[:, :t]
            s.logcol[:, t] = logw[:, t]
            s.pending = False


def reference_prompt_ids(batch: PromptBatch, per_sample: int) -> list[int]:
    """Per sample, its prompt's length as transformers 4.29's generate saw it in OPERA's LLaVA
    path: the ids with each image as one placeholder (the model expands it inside forward).

    batch: the prefill rows, `per_sample` of them per sample, the original first."""
    rows = torch.arange(0, batch.input_ids.shape[0], per_sample, device=batch.input_ids.device)
    images = torch.bincount(batch.image_rows, minlength=batch.input_ids.shape[0])[rows]
    text = batch.attention_mask[rows].bool() & ~batch.layout.image_mask[rows]
    return (text.sum(-1) + images).tolist()
