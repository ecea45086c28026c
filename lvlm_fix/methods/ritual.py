"""RITUAL: add the logits of a randomly transformed copy of the image (a product of experts).

z = l0 + alpha_pos * lT, then the plausibility cut on l0 (specs/ritual.md §2). The transformed view
is an extra batch row with its own KV cache; one transform is drawn per sample from the sample's
view generator (specs/ritual.md §3), so it is the same for every step and independent of the batch.
The crop is the reference's `RandomResizedCrop(336)`: a square at the model's input side, which
the processor keeps whole (a crop resized back to a non-square input's size would be cut again).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from lvlm_fix.methods.base import (
    ConstantWeight,
    Contribution,
    HookPoint,
    Intervention,
    View,
    register,
)
from lvlm_fix.methods.transforms import RandomTransform
from lvlm_fix.model import ModelInfo


@register
class RITUAL(Intervention):
    """Random image transformations as a positive view (arXiv 2405.17821)."""

    name: ClassVar[str] = "ritual"
    hooks: ClassVar[frozenset[HookPoint]] = frozenset({"views"})

    alpha_pos: float = Field(
        3.0, ge=0.0, le=100.0, description="Weight of the transformed view's logits (0 = off)."
    )
    beta: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Plausibility cut: keep tokens with p0 >= beta * max p0 (0 = no cut).",
    )

    def is_neutral(self) -> bool:
        return self.alpha_pos == 0

    def contribute(self, model: ModelInfo) -> Contribution:
        view = View(
            "ritual.transformed",
            weight=ConstantWeight(self.alpha_pos),
            image_fn=RandomTransform(model.image_size),
        )
        return Contribution(views=(view,), plausibility_beta=self.beta)
