"""Token selection strategies: greedy, sampling and beam search (OPERA plugs in the same way).

A search sees the combined next-token scores of every sample and beam, `[B, G, V]`, and returns
the tokens to feed next and, for beams, which running beam each new beam continues. It owns the
sequences; the decode loop only feeds tokens and keeps the KV cache rows aligned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from lvlm_fix.params import GenerationParams


@dataclass
class Step:
    tokens: torch.Tensor  # long [B, G]: the token each beam feeds next
    parents: torch.Tensor | None  # long [B, G]: the beam each new beam continues (None: same)
    done: bool
    next_logits: torch.Tensor | None = None  # [R, V] if the search already ran the forward


@dataclass
class TokenLogprobs:
    """One generated position of one sample: the chosen token's log-prob and the top ones."""

    logprob: float
    top: list[tuple[int, float]]  # (token id, log-prob), most likely first


@dataclass
class SearchResult:
    tokens: list[list[int]]  # generated ids per sample, without the ending token / padding
    finish_reasons: list[str]  # "stop" (EOS, a stop id or a stop string) or "length"
    logprobs: list[list[TokenLogprobs]] | None = None  # per sample, one per token in `tokens`


@dataclass
class Limits:
    """Per-request stopping facts every search shares.

    The stop extras act as vLLM's (SamplingParams): a token of `ending` ends its sample and is
    left out of its tokens; with ignore_eos, EOS is an ordinary token. Until a sample has
    min_tokens tokens, EOS and the stop ids are masked out of its scores (EOS even with
    ignore_eos: vLLM's min-tokens processor masks the model's EOS whatever ignore_eos says), and
    stop strings are not checked (the engine's `stop_hit` knows min_tokens).
    """

    eos_id: int
    pad_id: int
    max_new_tokens: int
    generators: list[torch.Generator | None]  # per sample, for sampling
    stop_hit: Any = None  # callable(sample, token ids) -> bool, or None when no stop strings
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0

    @property
    def ending(self) -> tuple[int, ...]:
        """The tokens that end a sample."""
        return self.stop_token_ids if self.ignore_eos else (self.eos_id, *self.stop_token_ids)

    def held(self, generated: int) -> tuple[int, ...]:
        """The tokens masked out of a sample's scores once it has `generated` tokens."""
        return (self.eos_id, *self.stop_token_ids) if generated < self.min_tokens else ()

    def hold(self, scores: torch.Tensor, generated: int) -> torch.Tensor:
        """scores [..., V] with `held(generated)` at -inf (a copy; `scores` if none is held)."""
        held = self.held(generated)
        if not held:
            return scores
        return scores.index_fill(-1, torch.tensor(held, device=scores.device), float("-inf"))


class Search(Protocol):
    """A search is plain data, like the Plan that holds it: a frozen dataclass of its config,
    compared by value and pickled across processes. What it learns during a request lives in
    the `state` that `start` returns, never on the search."""

    width: int  # beams per sample (rows per sample, before views)
    # A search that runs its own forwards may not support extra view rows; it then sets
    # `handles_views = False` and the Plan refuses view methods with it.

    def start(self, batch_size: int, limits: Limits, device: torch.device) -> Any: ...

    def step(self, scores: torch.Tensor, state: Any, runner: Any) -> Step: ...

    def result(self, state: Any) -> SearchResult: ...


def warp(scores: torch.Tensor, params: GenerationParams) -> torch.Tensor:
    """Temperature, top-k, top-p on scores [B, V] (fp32), in transformers' order."""
    if params.temperature != 1.0:
        scores = scores / params.temperature
    if params.top_k > 0:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1])).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop_sorted = cumulative <= (1 - params.top_p)
        drop_sorted[..., -1:] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def sample_rows(scores: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row from softmax(scores) [B, V], each row from its own generator.

    Per-row generators make a sample's tokens independent of its batch-mates.
    """
    probs = scores.softmax(-1)
    picks = [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators, strict=True)]
    return torch.cat(picks)


def _ended(
    row: list[int], ending: set[int], stopped_at: int | None = None
) -> tuple[list[int], str]:
    """A sample's kept tokens and finish reason from the tokens it was fed: up to its first
    ending token (left out), else up to `stopped_at` (a stop string's end), else all."""
    end = next((i for i, token in enumerate(row) if token in ending), stopped_at)
    return (row, "length") if end is None else (row[:end], "stop")


@dataclass
class _SingleState:
    limits: Limits
    ending: torch.Tensor  # long: `limits.ending` on the device
    finished: torch.Tensor  # bool [B]
    tokens: list[torch.Tensor] = field(default_factory=list)  # each long [B]
    stopped_at: list[int | None] = field(default_factory=list)  # per sample, see `_ended`
    # With params.logprobs: per step, (chosen [B], top values [B, k], top ids [B, k]).
    logprobs: list[tuple[torch.Tensor, ...]] = field(default_factory=list)


@dataclass(frozen=True)
class SingleSearch:
    """Greedy (argmax) or sampling: one beam per sample."""

    width: ClassVar[int] = 1
    reports_logprobs: ClassVar[bool] = True  # other searches leave it out: logprobs are refused

    params: GenerationParams

    def start(self, batch_size: int, limits: Limits, device: torch.device) -> _SingleState:
        return _SingleState(
            limits=limits,
            ending=torch.tensor(limits.ending, dtype=torch.long, device=device),
            finished=torch.zeros(batch_size, dtype=torch.bool, device=device),
            stopped_at=[None] * batch_size,
        )

    def step(self, scores: torch.Tensor, state: _SingleState, runner: Any) -> Step:
        limits = state.limits
        scores = scores[:, 0]  # [B, V]
        # Every sample has been fed one token per step (finished ones padding), so they all
        # hold the same tokens back; log-probs are reported from the scores before that.
        choice = limits.hold(scores, len(state.tokens))
        if self.params.do_sample:
            tokens = sample_rows(warp(choice, self.params), limits.generators)
        else:
            tokens = choice.argmax(-1)
        tokens = tokens.masked_fill(state.finished, limits.pad_id)
        if self.params.logprobs is not None:
            state.logprobs.append(_logprobs(scores, tokens, self.params.logprobs))
        state.tokens.append(tokens)
        state.finished |= torch.isin(tokens, state.ending)
        if limits.stop_hit is not None:
            ids = torch.stack(state.tokens, 1).tolist()
            for b, row in enumerate(ids):
                if not state.finished[b] and limits.stop_hit(b, row):
                    state.stopped_at[b] = len(row)
                    state.finished[b] = True
        done = len(state.tokens) >= limits.max_new_tokens or bool(state.finished.all())
        return Step(tokens=tokens[:, None], parents=None, done=done)

    def result(self, state: _SingleState) -> SearchResult:
        ids = torch.stack(state.tokens, 1).tolist()  # decode_steps steps before it asks
        ending = set(state.limits.ending)
        ended = [_ended(row, ending, at) for row, at in zip(ids, state.stopped_at, strict=True)]
        tokens, reasons = [row for row, _ in ended], [reason for _, reason in ended]
        logprobs = None
        if self.params.logprobs is not None:
            logprobs = _per_sample(state.logprobs, [len(row) for row in tokens])
        return SearchResult(tokens, reasons, logprobs)


def _logprobs(scores: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """Log-probs of one step from the combined scores [B, V] (interventions applied, before
    min_tokens' mask and temperature / top-k / top-p): the chosen tokens' [B] and the k best
    [B, k]. They stay on the device until the end, so a step costs no host sync."""
    log_probs = scores.float().log_softmax(-1)
    chosen = log_probs.gather(-1, tokens[:, None])[:, 0]
    top = log_probs.topk(k, dim=-1)
    return chosen, top.values, top.indices


def _per_sample(steps: list[tuple[torch.Tensor, ...]], lengths: list[int]):
    """Per-step tensors -> per sample, the first `length` positions as TokenLogprobs."""
    if not steps:
        return [[] for _ in lengths]
    chosen, values, ids = (torch.stack(parts, 1).tolist() for parts in zip(*steps, strict=True))
    return [
        [
            TokenLogprobs(chosen[b][t], list(zip(ids[b][t], values[b][t], strict=True)))
            for t in range(length)
        ]
        for b, length in enumerate(lengths)
    ]


@dataclass
class _BeamState:
    limits: Limits
    ending: torch.Tensor  # long: `limits.ending` on the device
    running: torch.Tensor  # long [B, K, T] running beams' tokens
    running_scores: torch.Tensor  # [B, K] sum of log-probs
    best: torch.Tensor  # long [B, K, T] finished hypotheses (length-normalised scores)
    best_scores: torch.Tensor  # [B, K]
    best_done: torch.Tensor  # bool [B, K]
    improvable: torch.Tensor  # bool [B, 1] (transformers' early-stop heuristic)
    length: int = 0


@dataclass(frozen=True)
class BeamSearch:
    """Beam search with transformers' exact selection rules (so outputs match `generate`)."""

    params: GenerationParams

    @property
    def width(self) -> int:
        return self.params.num_beams

    def start(self, batch_size: int, limits: Limits, device: torch.device) -> _BeamState:
        shape = (batch_size, self.width, limits.max_new_tokens)
        running = torch.full(shape, limits.pad_id, dtype=torch.long, device=device)
        scores = torch.zeros(batch_size, self.width, device=device)
        scores[:, 1:] = -1e9  # all beams start identical: only the first one may expand
        return _BeamState(
            limits=limits,
            ending=torch.tensor(limits.ending, dtype=torch.long, device=device),
            running=running,
            running_scores=scores,
            best=running.clone(),
            best_scores=torch.full_like(scores, -1e9),
            best_done=torch.zeros_like(scores, dtype=torch.bool),
            improvable=torch.ones(batch_size, 1, dtype=torch.bool, device=device),
        )

    def step(self, scores: torch.Tensor, st: _BeamState, runner: Any) -> Step:
        return advance_beams(st, scores.float().log_softmax(-1), self.params)

    def result(self, st: _BeamState) -> SearchResult:
        ending = set(st.limits.ending)
        ended = [_ended(row, ending) for row in st.best[:, 0, : st.length].tolist()]
        return SearchResult([row for row, _ in ended], [reason for _, reason in ended])


def advance_beams(
    st: _BeamState, log_probs: torch.Tensor, params: GenerationParams, prompt_ids: int | None = None
) -> Step:
    """One beam step from next-token log-probs [B, K, V]; updates `st` in place.

    Shared by BeamSearch and searches that reshape the log-probs first (OPERA). Scores are
    normalised by the generated length, the last token included (current transformers). With
    `prompt_ids`, by transformers 4.29's length instead (OPERA's reference, spec §1.4): the
    hypothesis's ids, prompt_ids of prompt included, a final EOS not (it is never appended).
    The stop ids end hypotheses as EOS does, and min_tokens masks the log-probs as
    transformers' MinNewTokensLengthLogitsProcessor does: after the log-softmax.
    """
    B, K, V = log_probs.shape
    t, limits = st.length, st.limits
    log_probs = limits.hold(log_probs, t) + st.running_scores[:, :, None]
    top_scores, top_index = torch.topk(log_probs.view(B, K * V), 2 * K)  # [B, 2K]
    source, token = top_index // V, top_index % V
    candidates = torch.take_along_dim(st.running, source[:, :, None], 1)
    candidates[:, :, t] = token
    stopped = torch.isin(token, st.ending)  # [B, 2K]
    ends = stopped | (t + 1 >= limits.max_new_tokens)

    # Running beams: the best K candidates that did not end.
    alive_scores = top_scores + ends.float() * -1e9
    keep = torch.topk(alive_scores, K).indices
    st.running = torch.take_along_dim(candidates, keep[:, :, None], 1)
    st.running_scores = torch.take_along_dim(alive_scores, keep, 1)
    parents = torch.take_along_dim(source, keep, 1)

    # Finished hypotheses: candidates among the top K that ended, length-normalised.
    just_done = ends.clone()
    just_done[:, K:] = False
    length = t + 1 if prompt_ids is None else prompt_ids + t + 1 - stopped.float()
    normed = top_scores / (length**params.length_penalty)
    full = st.best_done.all(-1, keepdim=True) & params.early_stopping
    normed = normed + full.float() * -1e9 + (~st.improvable).float() * -1e9
    normed = normed + (~just_done).float() * -1e9
    merged_scores = torch.cat([st.best_scores, normed], 1)
    pick = torch.topk(merged_scores, K).indices
    st.best = torch.take_along_dim(torch.cat([st.best, candidates], 1), pick[:, :, None], 1)
    st.best_scores = torch.take_along_dim(merged_scores, pick, 1)
    st.best_done = torch.take_along_dim(torch.cat([st.best_done, just_done], 1), pick, 1)
    st.length = t + 1

    running_length = st.length if prompt_ids is None else prompt_ids + st.length
    best_possible = st.running_scores[:, :1] / (running_length**params.length_penalty)
    worst_done = torch.where(st.best_done, st.best_scores.min(1, keepdim=True).values, -1e9)
    st.improvable &= (best_possible > worst_done).any(-1, keepdim=True)
    open_beams = not (bool(st.best_done.all()) and params.early_stopping)
    done = not (bool(st.improvable.any()) and open_beams and not bool(ends.all()))
    tokens = st.running[:, :, t]
    return Step(tokens=tokens, parents=parents, done=done)


@dataclass(frozen=True)
class Recording:
    """A search that passes every call to `inner` and keeps its state for inspection afterwards
    (e.g. OPERA's rollback log in tests and benchmarks): `replace(plan, search=Recording(...))`.

    The one search that keeps something: a test instrument, not for plans that are shared or
    sent elsewhere. The record is left out of equality: Recordings of equal searches are equal."""

    inner: Search
    started: list[Any] = field(default_factory=list, compare=False, repr=False)  # each state

    @property
    def width(self) -> int:
        return self.inner.width

    @property
    def handles_views(self) -> bool:
        return getattr(self.inner, "handles_views", True)

    @property
    def state(self) -> Any:
        """The state of the latest request (None before any)."""
        return self.started[-1] if self.started else None

    def start(self, batch_size: int, limits: Limits, device: torch.device) -> Any:
        state = self.inner.start(batch_size, limits, device)
        self.started.append(state)
        return state

    def step(self, scores: torch.Tensor, state: Any, runner: Any) -> Step:
        return self.inner.step(scores, state, runner)

    def result(self, state: Any) -> SearchResult:
        return self.inner.result(state)


def default_search(params: GenerationParams) -> Search:
    return BeamSearch(params) if params.num_beams > 1 else SingleSearch(params)
