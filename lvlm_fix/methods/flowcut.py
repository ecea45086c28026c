"""FlowCut (arXiv 2505.19536): prune patches inside the CLIP vision tower (LLaVA-1.5), plus
one cut inside the LLM for LLaVA-NeXT's anyres images.

After each encoder layer before the one the LLM reads (`read_layer`), every patch gets a score
from that layer's attention: (CLS->patch attention + CLS-value->value similarity, each
renormalised over the patches) x L1 norm of the head-mean value vector. Scores accumulate with
an EMA (0.5). On layers whose remaining-layer count rpl = read_layer - 1 - idx is even, an
entropy-adaptive number of patches goes (more when CLS attention is concentrated, spread over
the remaining stages by sqrt(rpl)); at rpl = 0 every image is cut to exactly the budget. (A
tower whose LLM reads layer 0 gets only the forced cut, on layer 0's output.)
Survivors stay in raster order; nothing is merged.

Deviation from upstream (on purpose): the adaptive count is per image, not the max over the
batch, so an image's kept set never depends on its batch-mates. The entropy log gets an epsilon.
The CLS row is a side computation from the layer's own projections (any attention kernel).

LLaVA-NeXT (anyres), as the reference does it:
1. The tower stage above runs on every crop (the base image and each sub-crop are separate
   images in the tower), each cut to `crop_budget` patches (default budget // 2).
2. The LLM gets the base image's survivors, then the sub-crop survivors in the raster order of
   the unpadded crop grid, without image_newline tokens (`keep_newlines` keeps them). Done in
   the core with transformers' own packing (`lvlm_fix.anyres`): the survivors go back into
   their full grids before the projector, transformers packs them, and LLM layer 0 drops the
   placeholders of pruned patches and newlines, so the LLM never sees them.
3. Inside the LLM (`flowcut_llm`): layer `llm_layer`'s attention scores the visual tokens from
   the last prompt token; layers > `llm_layer` keep exactly `budget` of them per row (~2.5T -> T).
Positions follow the reference by default ("compact"): the LLM numbers the kept prompt tokens
0, 1, ... as if the dropped ones never existed, layers > `llm_layer` renumber again after the
second cut, and decoding continues from each layer's own count. "original" keeps every token's
position (gaps), like FastV. Per-row counts and left padding are handled by the core (the
reference requires batch 1 or right padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field

from lvlm_fix.hooks import GridRestore, VisionLayerCall
from lvlm_fix.methods.base import Contribution, Intervention, register
from lvlm_fix.methods.flowcut_llm import FlowCutLLMHook
from lvlm_fix.model import ModelInfo

EPS = 1e-7


def flow_scores(call: VisionLayerCall) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token score s [N, n] (0 for CLS and padding) and CLS attention a [N, n] (fp32)."""
    q, k, v = call.heads()  # [N, H, n, d]
    q_cls = q[:, :, :1]
    # Row 0: CLS -> token attention logits; row 1: CLS value . token value (no scaling).
    logits = torch.cat([q_cls @ k.transpose(-1, -2), v[:, :, :1] @ v.transpose(-1, -2)], 2)
    if call.padded:  # [N, H, 2, n]; with no padding the mask would change nothing
        logits = logits.masked_fill(~call.valid[:, None, None, :], float("-inf"))
    probs = logits.softmax(-1).mean(1)  # [N, 2, n]: head mean
    probs[:, :, 0] = 0.0
    value_norm = v.mean(1).abs().sum(-1)  # [N, n]: L1 norm of the head-mean value
    # Padding has probability 0 in both rows, so its score is 0 as well.
    s = (probs / probs.sum(-1, keepdim=True)).sum(1) * value_norm
    return s, probs[:, 0]


def adaptive_keep(a: torch.Tensor, valid: torch.Tensor, target: int, rpl: int) -> torch.Tensor:
    """Tokens (CLS included) each image keeps after this stage: long [N]."""
    lengths = valid.sum(-1)
    if rpl == 0:
        return torch.full_like(lengths, target)
    patches = (lengths - 1).clamp(min=2)
    p = a[:, 1:] / a[:, 1:].sum(-1, keepdim=True)
    entropy = -(p * torch.log(p + EPS)).sum(-1) / torch.log(patches.float())
    excess = (lengths - target).float()  # = N - (T_keep - 1) with N patches
    prune = torch.round(excess / math.sqrt(rpl) * (1 - entropy**2)).long()
    return torch.maximum(lengths - prune, torch.full_like(lengths, target))


def keep_top(score: torch.Tensor, valid: torch.Tensor, n_keep: torch.Tensor) -> torch.Tensor:
    """keep bool [N, n]: CLS plus the n_keep-1 best patches of each image (stable ties)."""
    ranked = score.masked_fill(~valid, float("-inf"))
    ranked[:, 0] = float("inf")  # CLS always first
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return valid & (rank < n_keep[:, None])


@dataclass(frozen=True)
class _FlowCutStage:
    budget: int  # tokens per image (per crop for anyres) that survive the tower
    grid: GridRestore | None = None  # anyres: how the survivors reach the LLM

    def after_layer(self, call: VisionLayerCall) -> torch.Tensor | None:
        if call.read_layer < 0:
            raise ValueError("flowcut needs a single vision_feature_layer")
        # The forced cut lands on the layer before the read layer, so the read layer already
        # runs on the budget; a tower that reads its first layer gets that one cut on its output.
        last = max(call.read_layer - 1, 0)
        if call.layer > last:
            return None
        target = self.budget if call.keeps_cls else self.budget + 1  # tokens incl. CLS
        s, a = flow_scores(call)
        current = self._accumulate(call, s)
        rpl = last - call.layer
        # Images are packed, so the widest holds valid.shape[1] tokens: no sync needed to see
        # that every image is within the target already.
        if rpl % 2 == 1 or call.valid.shape[1] <= target:
            return None
        lengths = call.valid.sum(-1)
        n_keep = torch.minimum(adaptive_keep(a, call.valid, target, rpl), lengths)
        return keep_top(current, call.valid, n_keep)

    @staticmethod
    def _accumulate(call: VisionLayerCall, s: torch.Tensor) -> torch.Tensor:
        """EMA (0.5) of the scores, aligned with the current tokens: [N, n] (fp32)."""
        scratch = call.ctx.scratch
        ids = scratch["vision.patch_ids"]  # original token id of each current token
        previous = scratch.get("flowcut.flow")  # (ids, scores) of the previous layer
        if previous is None:
            current = s
        elif previous[0] is ids:  # no cut since: the same tokens in the same slots
            current = (previous[1] + s).mul_(0.5)  # = 0.5 a + 0.5 b exactly, one op less
        else:  # a cut: find each survivor's score through its original token id
            n_tokens = scratch["vision.tokens"]  # tokens per image before any cut
            by_id = previous[1].new_zeros(ids.shape[0], n_tokens)
            by_id.scatter_(1, previous[0], previous[1])
            current = (by_id.gather(1, ids) + s).mul_(0.5)
        scratch["flowcut.flow"] = (ids, current)
        return current


_NEXT_ONLY = frozenset({"crop_budget", "llm_layer", "keep_newlines", "positions"})
# On LLaVA-NeXT: OPERA's attention row and VAR's sink masks live in the unpruned prompt's columns.
_NEXT_CONFLICTS = frozenset({"opera", "var"})


@register
class FlowCut(Intervention):
    """Prune vision-tower patches down to a budget, by accumulated attention flow (FlowCut)."""

    name: ClassVar[str] = "flowcut"
    hooks: ClassVar[frozenset] = frozenset({"vision", "attention", "prune"})

    budget: int = Field(
        64,
        ge=1,
        le=1 << 20,
        description="visual tokens given to the LLM: per image (LLaVA-1.5), per sample after "
        "LLM layer llm_layer (LLaVA-NeXT); >= all visual tokens = off",
    )
    crop_budget: int | None = Field(
        None,
        ge=1,
        le=1 << 20,
        description="LLaVA-NeXT: patches each crop keeps in the vision tower (None = budget // 2;"
        " >= patches per crop = no tower cut)",
    )
    llm_layer: int = Field(
        1,
        ge=0,
        le=1024,
        description="LLaVA-NeXT: the LLM layer whose attention scores the visual tokens",
    )
    keep_newlines: bool = Field(
        False,
        description="LLaVA-NeXT: keep image_newline tokens (False = the reference, dropped; True "
        "with budgets >= all tokens = the unpruned model)",
    )
    positions: Literal["compact", "original"] = Field(
        "compact",
        description="LLaVA-NeXT: 'compact' renumbers positions after each cut (the reference); "
        "'original' keeps each token's position, like FastV",
    )

    def contribute(self, model: ModelInfo) -> Contribution:
        if model.family == "llava":
            fields = type(self).model_fields
            names = sorted(n for n in _NEXT_ONLY if getattr(self, n) != fields[n].default)
            if names:  # (their defaults are fine: catalogues send every field)
                raise ValueError(f"flowcut fields {names} apply to LLaVA-NeXT only")
            return Contribution(vision=_FlowCutStage(self.budget))
        if model.family != "llava_next":
            raise ValueError(
                f"flowcut supports LLaVA-1.5 and LLaVA-NeXT, not {model.family!r}: its vision "
                "scores come from the CLS token's attention, and OneVision's SigLIP tower has no "
                "CLS token (nor is there a reference FlowCut for it)"
            )
        if self.llm_layer + 1 >= model.num_layers:
            raise ValueError(
                f"flowcut llm_layer={self.llm_layer} must be below {model.num_layers - 1} "
                f"(the cut applies to the layers after it, of {model.num_layers})"
            )
        renumber = self.positions == "compact"
        crop = self.crop_budget or max(self.budget // 2, 1)
        stage = _FlowCutStage(crop, GridRestore(self.keep_newlines, renumber))
        hook = FlowCutLLMHook(self.llm_layer, self.budget, renumber)
        return Contribution(vision=stage, attention=hook, prune=hook, conflicts=_NEXT_CONFLICTS)
