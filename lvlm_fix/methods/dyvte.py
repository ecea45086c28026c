"""DyVTE (arXiv 2411.19628): a small router per LLM layer decides when the image is no longer
needed; from then on every image token leaves the sequence and the KV cache of later layers.

Router l reads the output of decoder layer l: concat(mean of the text tokens after the image,
excluding the last; the last prompt token) [R, 2D] -> Linear(2D, hidden) -> GELU -> Linear(2)
-> (keep, exit). A row exits after the first layer with p(exit) > threshold, once, at prefill
(never during decode). Rows of a batch may exit at different layers: the core then keeps a
row's image columns as masked fillers until every row has exited (see lvlm_fix/pruning.py), so
each row equals its solo run. Text tokens keep their original position ids.

Routers are trained on a frozen model (`python -m lvlm_fix.methods.dyvte_train`) and stored
next to the checkpoint as `dyvte_router.safetensors` (w1 [L, hidden, 2D], w2 [L, 2, hidden]).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import Field
from safetensors.torch import load_file

from lvlm_fix.hooks import ForwardContext
from lvlm_fix.methods.base import Contribution, Intervention, register
from lvlm_fix.model import ModelInfo

ROUTER_FILE = "dyvte_router.safetensors"


def router_input(
    hidden: torch.Tensor, image: torch.Tensor, real: torch.Tensor, last: torch.Tensor
) -> torch.Tensor:
    """[R, 2D] (fp32): mean of the text after the last image token (excluding the token at
    column `last`), and the state at `last`. With no such text the mean is the last state.
    hidden [R, W, D], image/real bool [R, W], last long [R]."""
    columns = torch.arange(hidden.shape[1], device=hidden.device)[None]
    last_image = torch.where(image, columns, -1).max(-1).values
    after = real & (columns > last_image[:, None]) & (columns < last[:, None])
    h = hidden.float()
    final = h.gather(1, last[:, None, None].expand(-1, 1, h.shape[-1]))[:, 0]
    count = after.sum(-1, keepdim=True)
    mean = (h * after[..., None]).sum(1) / count.clamp(min=1)
    mean = torch.where(count > 0, mean, final)
    return torch.cat([mean, final], -1)


def router_logits(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One layer's router: x [R, 2D] -> logits [R, 2] = (keep, exit)."""
    return torch.nn.functional.gelu(x @ w1.T) @ w2.T


def load_routers(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if not path.is_file():
        raise ValueError(
            f"dyvte needs trained routers, but {path} does not exist; train them with "
            f"`python -m lvlm_fix.methods.dyvte_train --model MODEL_DIR --out {path}`"
        )
    tensors = load_file(str(path))
    return tensors["w1"].float(), tensors["w2"].float()


@dataclass(frozen=True)
class _DyVTEHook:
    """PruneHook with the routers. Equal by value (`torch.equal` on the routers: the generated
    __eq__ would compare them elementwise, into a tensor); hashed without them, as a tensor
    hashes by identity."""

    w1: torch.Tensor = field(hash=False)  # [L, hidden, 2D]
    w2: torch.Tensor = field(hash=False)  # [L, 2, hidden]
    threshold: float

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _DyVTEHook):
            return NotImplemented
        return (
            self.threshold == other.threshold
            and torch.equal(self.w1, other.w1)
            and torch.equal(self.w2, other.w2)
        )

    def select(self, layer: int, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        rows, width = hidden.shape[:2]
        if "dyvte.exit_layer" not in ctx.state:
            ctx.state["dyvte.exit_layer"] = torch.full((rows,), -1, device=hidden.device)
        if layer - 1 >= self.w1.shape[0]:
            return None
        view = ctx.layout.at_layer(layer - 1)  # the columns of `hidden`
        image = view.image_mask
        if not bool(image.any()):
            return None  # every row exited already (or has no image)
        columns = torch.arange(width, device=hidden.device)[None]
        real = columns >= view.key_start[:, None]
        last = torch.full((rows,), width - 1, device=hidden.device)
        x = router_input(hidden, image, real, last)
        w1, w2 = self.w1[layer - 1].to(x.device), self.w2[layer - 1].to(x.device)
        p_exit = router_logits(x, w1, w2).softmax(-1)[:, 1]
        exits = image.any(-1) & (p_exit > self.threshold)
        if not bool(exits.any()):
            return None
        exit_layer = ctx.state["dyvte.exit_layer"]
        ctx.state["dyvte.exit_layer"] = torch.where(exits, layer - 1, exit_layer)
        return ~(image & exits[:, None])


@register
class DyVTE(Intervention):
    """Drop every visual token after the layer a trained router picks (DyVTE)."""

    name: ClassVar[str] = "dyvte"
    hooks: ClassVar[frozenset] = frozenset({"prune"})
    # OPERA's attention row and VAR's sink masks are kept in the unpruned prompt's columns;
    # they compose once they read the per-layer layout (`ctx.layout.at_layer(layer)`).
    conflicts: ClassVar[frozenset[str]] = frozenset({"opera", "var"})

    threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="exit when p(exit) > threshold (1 = never: off)"
    )
    # Required: a method that needs trained weights has no defaults that run on any model.
    router: str = Field(
        max_length=4096,
        description=f"router file, or 'auto' = {ROUTER_FILE} in the model's directory",
    )

    def is_neutral(self) -> bool:
        return self.threshold >= 1.0

    def contribute(self, model: ModelInfo) -> Contribution:
        auto = self.router == "auto"
        path = Path(model.path or ".") / ROUTER_FILE if auto else Path(self.router)
        w1, w2 = load_routers(path)
        if w1.shape[-1] != 2 * model.hidden_size:
            raise ValueError(
                f"router {path} expects hidden size {w1.shape[-1] // 2}, "
                f"the model has {model.hidden_size}"
            )
        return Contribution(prune=_DyVTEHook(w1, w2, self.threshold))
