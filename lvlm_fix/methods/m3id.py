"""M3ID (as re-implemented by RITUAL): contrast with the text-only prompt, more as t grows.

z = l0 + c_t * (l0 - lu) with c_t = (1 - gamma_t) / gamma_t and gamma_t = exp(-decay * t), t the
number of tokens generated so far (specs/ritual.md §5). At t = 0 the weight is 0, so the first
token is plain decoding. Then the plausibility cut on l0.

The text-only row (`text_only`, see `methods.base.TextOnly`): the M3ID paper conditions on the
text alone without saying how the prompt is built; RITUAL's code, our reference, drops the image
placeholder from the prompt ids (`drop_image_tokens`, the default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from pydantic import Field

from lvlm_fix.methods.base import (
    Contribution,
    HookPoint,
    Intervention,
    TextOnly,
    View,
    register,
)
from lvlm_fix.model import ModelInfo


def m3id_weight(step: int, decay: float) -> float:
    """c_t = (1 - gamma_t) / gamma_t = exp(decay * t) - 1.

    The exponent is capped at 69 (c_t ~ 1e30) so that weight * logits stays finite in fp32 on
    very long generations instead of turning into inf - inf = nan.
    """
    return math.expm1(min(decay * step, 69.0))


@dataclass(frozen=True)
class M3IDWeight:
    """`sign * c_t` as a logit weight: +1 raises the original view, -1 is the text-only view's."""

    decay: float
    sign: float

    def __call__(self, step: int) -> float:
        return self.sign * m3id_weight(step, self.decay)


@register
class M3ID(Intervention):
    """Multi-modal mutual-information decoding, RITUAL's baseline form."""

    name: ClassVar[str] = "m3id"
    hooks: ClassVar[frozenset[HookPoint]] = frozenset({"views"})

    decay: float = Field(
        0.02, ge=0.0, le=1.0, description="lambda in gamma_t = exp(-lambda * t) (0 = off)."
    )
    beta: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Plausibility cut: keep tokens with p0 >= beta * max p0 (0 = no cut).",
    )
    text_only: TextOnly

    def is_neutral(self) -> bool:
        return self.decay == 0

    def contribute(self, model: ModelInfo) -> Contribution:
        view = View(
            "m3id.text_only",
            weight=M3IDWeight(self.decay, sign=-1.0),
            drop_image=True,
            text_only=self.text_only,
        )
        return Contribution(
            views=(view,),
            base_weight=M3IDWeight(self.decay, sign=1.0),
            plausibility_beta=self.beta,
        )
