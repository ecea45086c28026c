"""PAI's classifier-free-guidance step: subtract the text-only prior from the logits.

out = gamma * lc - (gamma - 1) * lu, then the plausibility cut on lc (specs/vhr.md §2.2). The
reference combines log_softmax outputs; we combine raw logits. The two differ by one constant per
row, which greedy, sampling (softmax, temperature, top-k, top-p) and beam search (log_softmax) all
ignore. The text-only view runs with attention edits off (`edited=False`), as the reference's
unconditional pass runs the plain model.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from lvlm_fix.methods.base import Contribution, HookPoint, Intervention, View, register
from lvlm_fix.model import ModelInfo


@register
class PAICFG(Intervention):
    """PAI's logit refinement against the text-only prompt (PAI attention is `pai`)."""

    name: ClassVar[str] = "pai_cfg"
    hooks: ClassVar[frozenset[HookPoint]] = frozenset({"views"})

    gamma: float = Field(
        1.1, ge=1.0, le=100.0, description="Guidance scale (1 = off; README POPE/CHAIR value 1.1)."
    )
    beta: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Plausibility cut: keep tokens with p_cond >= beta * max p_cond (0 = no cut).",
    )

    def is_neutral(self) -> bool:
        return self.gamma == 1

    def contribute(self, model: ModelInfo) -> Contribution:
        gamma = self.gamma
        view = View(
            "pai_cfg.text_only", weight=lambda t: -(gamma - 1), drop_image=True, edited=False
        )
        return Contribution(
            views=(view,), base_weight=lambda t: gamma - 1, plausibility_beta=self.beta
        )
