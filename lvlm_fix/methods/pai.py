"""PAI's attention step (Liu et al., ECCV 2024, "Paying More Attention to Image").

In layers [start_layer, end_layer), on the last query row only, every image key's pre-softmax
score s becomes s + alpha * |s| (larger whatever its sign), in every head. Masked entries stay
masked. Only edited views' rows are touched, so PAI's text-only CFG row (`pai_cfg`, a separate
intervention) stays the plain model. The kernel applies the gain inside the online softmax.

The first generated token comes from the prefill's last row, which is edited too, as the paper
describes. The official `--use-attn --use-cfg` flow (LALBJ/PAI) leaves that token unedited;
`edit_first_token=False` reproduces it: the prefill runs plain, decode steps are edited.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import Field

from lvlm_fix.methods.base import Contribution, Intervention, layer_range, register
from lvlm_fix.model import ModelInfo

if TYPE_CHECKING:
    from lvlm_fix.hooks import AttentionCall


@register
class PAI(Intervention):
    """Pay more attention to the image: amplify the last row's image scores."""

    name: ClassVar[str] = "pai"
    hooks: ClassVar[frozenset] = frozenset({"attention"})

    alpha: float = Field(
        0.2, ge=0.0, le=100.0, description="Image score gain s + alpha*|s| (0 = off)."
    )
    start_layer: int = Field(
        2, ge=0, le=1024, description="First edited layer (the paper skips 0 and 1)."
    )
    end_layer: int | None = Field(
        None,
        ge=-1024,
        le=1024,
        description="Edited layers end before this; None = the model's depth, < 0 from it.",
    )
    edit_first_token: bool = Field(
        True, description="Edit the prefill's last row (paper); False = official code's flow."
    )

    def is_neutral(self) -> bool:
        return self.alpha == 0

    def contribute(self, model: ModelInfo) -> Contribution:
        layers = layer_range("PAI", self.start_layer, self.end_layer, model.num_layers)
        return Contribution(attention=ImageGain(layers, self.alpha, self.edit_first_token))


@dataclass(frozen=True)
class ImageGain:
    """AttentionHook: PAI's gain on the last query row of edited rows.

    state "pai.gain" float [R, H] and "pai.last_row" bool [R, 1] are built on the first call and
    re-indexed with the rows, so decode steps allocate nothing.
    """

    layers: frozenset[int]
    alpha: float
    edit_prefill: bool  # the prefill's last row, whose logits give the first token

    def edits(self, call: AttentionCall) -> dict[str, Any] | None:
        if call.layer not in self.layers:
            return None
        if call.ctx.phase == "prefill" and not self.edit_prefill:
            return None
        R, H, Q, _ = call.query.shape
        state = call.ctx.state
        if "pai.gain" not in state:  # the same for every layer and step: build it once
            edited = state["row.edited"]  # [R]
            gain = torch.where(edited, self.alpha, 0.0).float()[:, None].expand(R, H)
            state["pai.gain"] = gain.contiguous()  # [R, H]
            state["pai.last_row"] = edited[:, None]  # bool [R, 1]: gain_rows of one query row
        if Q == 1:  # decode: nothing new to build
            return {"image_gain": state["pai.gain"], "gain_rows": state["pai.last_row"]}
        rows = call.ctx.once(f"pai.rows{Q}", call.query.device, lambda: last_rows(state, R, Q))
        return {"image_gain": state["pai.gain"], "gain_rows": rows}

    def after(self, call: AttentionCall, out: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        return None


def last_rows(state, R: int, Q: int) -> torch.Tensor:
    """bool [R, Q]: the last query row of edited rows (the same at every prefill layer)."""
    rows = torch.zeros(R, Q, dtype=torch.bool, device=state["pai.last_row"].device)
    rows[:, -1:] = state["pai.last_row"]
    return rows
