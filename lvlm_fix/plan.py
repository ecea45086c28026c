"""Compile a request's interventions into one Plan, or refuse a meaningless combination.

The Plan is immutable: the views (extra rows) and their logit weights, the attention hooks, the
layer-input hooks, one search strategy and the vision stage. Per-request tensors live beside it
in a `RowState`, created by the decode loop. It is plain data (no lambdas or closures, see
`methods.base`): it pickles, to cross process boundaries, and two compilations of the same
interventions and params are equal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lvlm_fix.methods.base import (
    Contribution,
    Intervention,
    View,
    config_hash,
    parse_intervention,
)
from lvlm_fix.model import ModelInfo
from lvlm_fix.params import GenerationParams
from lvlm_fix.search import Search, default_search


class PlanConflict(ValueError):
    """Two interventions that cannot run together (the message names both)."""


@dataclass(frozen=True)
class Plan:
    interventions: tuple[Intervention, ...]
    views: tuple[View, ...]  # extra views; the original view is implicit (index 0)
    base_weights: tuple[Callable[[int], float], ...]  # increments of the original view's weight
    plausibility_beta: float | None
    attention_hooks: tuple[Any, ...]
    layer_input_hooks: tuple[Any, ...]
    vision_stages: tuple[Any, ...]  # at most one (`hooks.VisionHook`)
    search: Search
    config_id: str
    prune_hooks: tuple[Any, ...] = ()  # `hooks.PruneHook`s (LLM token pruning)
    shared_decode: bool = (
        True  # may decode in the engine's shared batch (Contribution.shared_decode)
    )
    recompute: bool = False  # decode steps re-run the whole sequence (see Contribution.recompute)

    @property
    def n_views(self) -> int:
        """Rows per beam after prefill (prefill-only views excluded), the original included."""
        return 1 + sum(not view.prefill_only for view in self.views)

    @property
    def combines_views(self) -> bool:
        return bool(self.views) or bool(self.base_weights) or self.plausibility_beta is not None

    def view_weights(self, step: int) -> list[float]:
        """Logit weight of each kept view at generated step `step` (original first)."""
        base = 1.0 + sum(weight(step) for weight in self.base_weights)
        return [base] + [v.weight(step) for v in self.views if not v.prefill_only]


def _check_conflicts(interventions: list[Intervention]) -> None:
    names = [i.name for i in interventions]
    for name in set(names):
        if names.count(name) > 1:
            raise PlanConflict(f"intervention {name!r} is listed twice; give it once")
    for a in interventions:
        for b in interventions:
            if b.name in a.conflicts:
                raise PlanConflict(f"{a.name!r} and {b.name!r} cannot be combined")


def compile_plan(
    specs: list[Intervention | dict[str, Any]],
    model: ModelInfo,
    params: GenerationParams,
) -> Plan:
    """Parse, validate and merge the interventions of one request."""
    params.check_vocab(model.vocab_size)
    interventions = [parse_intervention(spec) for spec in specs]
    _check_conflicts(interventions)
    active = [i for i in interventions if not i.is_neutral()]
    contributions: list[tuple[Intervention, Contribution]] = [
        (i, i.contribute(model)) for i in active
    ]

    names = {i.name for i in interventions}
    for i, c in contributions:
        for other in sorted(c.conflicts & names):
            raise PlanConflict(f"{i.name!r} and {other!r} cannot be combined on this model")
    searches = [(i, c.search) for i, c in contributions if c.search is not None]
    if len(searches) > 1:
        raise PlanConflict(
            f"{searches[0][0].name!r} and {searches[1][0].name!r} both choose the search strategy"
        )
    if searches and params.num_beams > 1:
        raise PlanConflict(
            f"{searches[0][0].name!r} runs its own search; do not also set num_beams"
        )
    betas = {(i.name, c.plausibility_beta) for i, c in contributions if c.plausibility_beta}
    if len({beta for _, beta in betas}) > 1:
        raise PlanConflict(
            "views disagree on the plausibility cut: "
            + ", ".join(f"{name} beta={beta}" for name, beta in sorted(betas))
        )
    stages = [(i, c.vision) for i, c in contributions if c.vision is not None]
    if len(stages) > 1:
        raise PlanConflict(
            f"{stages[0][0].name!r} and {stages[1][0].name!r} both hook the vision tower (one may)"
        )
    search = searches[0][1] if searches else default_search(params)
    view_users = [i.name for i, c in contributions if any(not v.prefill_only for v in c.views)]
    if searches and view_users and not getattr(search, "handles_views", True):
        raise PlanConflict(f"{searches[0][0].name!r} and {view_users[0]!r} cannot be combined")
    if params.logprobs is not None and not getattr(search, "reports_logprobs", False):
        raise PlanConflict(
            "logprobs are only available with greedy decoding or sampling, not with "
            + (repr(searches[0][0].name) if searches else "beam search")
        )
    return Plan(
        interventions=tuple(interventions),
        views=tuple(v for _, c in contributions for v in c.views),
        base_weights=tuple(c.base_weight for _, c in contributions if c.base_weight),
        plausibility_beta=next(iter(betas))[1] if betas else None,
        attention_hooks=tuple(c.attention for _, c in contributions if c.attention),
        layer_input_hooks=tuple(c.layer_input for _, c in contributions if c.layer_input),
        vision_stages=tuple(stage for _, stage in stages),
        search=search,
        config_id=config_hash(interventions),
        prune_hooks=tuple(c.prune for _, c in contributions if c.prune),
        shared_decode=all(c.shared_decode for _, c in contributions),
        recompute=any(c.recompute for _, c in contributions),
    )
