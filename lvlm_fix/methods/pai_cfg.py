"""PAI's classifier-free-guidance step: subtract the text-only prior from the logits.

out = gamma * lc - (gamma - 1) * lu, then the plausibility cut on lc (specs/vhr.md §2.2). The
reference combines log_softmax outputs; we combine raw logits. Per row the two differ by one
constant, which greedy and sampling (softmax, temperature, top-k, top-p) ignore. Beam search need
not: the reference adds its combined scores to the beam scores unnormalised, so the constant
(gamma·log Z_c - (gamma-1)·log Z_u, different per beam) enters the ranking, and its text-only cache
is never reordered with the beams (specs/vhr.md §5.5). Ours log_softmaxes the combined scores
(the constant drops out: beams add log-probabilities of the combined distribution), and the
text-only row follows its beam like every view row. The text-only view runs with attention edits
off (`edited=False`), as the reference's unconditional pass runs the plain model.

The text-only prompt (`text_only`, see `methods.base.TextOnly`): the paper's p(y | X_I, X_H) is
the instruction and history without the image; the code (CFG.py) builds it as BOS + the tokens
before the image placeholder + the tokens after it (`drop_image_tokens`, the default).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from lvlm_fix.methods.base import (
    ConstantWeight,
    Contribution,
    HookPoint,
    Intervention,
    TextOnly,
    View,
    register,
)
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
    text_only: TextOnly

    def is_neutral(self) -> bool:
        return self.gamma == 1

    def contribute(self, model: ModelInfo) -> Contribution:
        gamma = self.gamma
        view = View(
            "pai_cfg.text_only",
            weight=ConstantWeight(-(gamma - 1)),
            drop_image=True,
            text_only=self.text_only,
            edited=False,
        )
        return Contribution(
            views=(view,), base_weight=ConstantWeight(gamma - 1), plausibility_beta=self.beta
        )
