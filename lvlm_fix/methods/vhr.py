"""VHR: Vision-aware Head Reinforcement (He et al., ACL 2025, "Cracking the Code of Hallucination").

Per sample and per reinforced layer, VHR compares each head's output (pre-o_proj context vector)
at the last prompt position with and without the image: VHD_h = ||A_h(with) - A_h(without)||_2.
Heads whose VHD is above the layer's median (after an outlier filter) are "vision-aware" and get
their output multiplied by `alpha` from then on. Selection runs layer by layer during prefill, so
layer l's choice already sees the reinforcement of layers < l.

The "without image" branch is a prefill-only text-only view, positions re-indexed as if the
prompt had no image. It runs in the same batch as the original row, so both are at layer l at the
same time. How it is built is `text_only` (see `methods.base.TextOnly`), and it decides which
heads are picked. The paper conditions on x_T only; the official `generate` takes the image
span's start and end indices, which fits slicing the span out of the ids: `drop_image_tokens`
(default, specs/vhr.md §1.2). `rerender` is the template without image slots. The spec's "mask"
(positions kept, image columns masked) is not offered (see TextOnly).

State: state["vhr.head_scale"] float [R, L, H] (1 = untouched), fixed after prefill; at decode
the head scale is an epilogue multiply inside the attention kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator

from lvlm_fix.methods.base import (
    ConstantWeight,
    Contribution,
    Intervention,
    TextOnly,
    View,
    register,
)
from lvlm_fix.model import ModelInfo

if TYPE_CHECKING:
    from lvlm_fix.hooks import AttentionCall, ForwardContext

# Official LLaVA-1.5-7B setting: layer 1 plus the last 14 of 32 layers.
LAST_LAYERS_SHARE = 14 / 32


@register
class VHR(Intervention):
    """Vision-aware Head Reinforcement: scale the heads that react most to the image."""

    name: ClassVar[str] = "vhr"
    hooks: ClassVar[frozenset] = frozenset({"views", "attention"})

    alpha: float = Field(
        2.0, gt=0.0, le=100.0, description="Output scale of selected heads (1 = off)."
    )
    layers: Literal["auto"] | list[int] = Field(
        "auto",
        max_length=1024,
        description="Reinforced layers; 'auto' = [1] + last round(14/32 * L) ([] = off).",
    )
    outlier_filter: bool = Field(
        True, description="Drop heads whose VHD and text-only norm both exceed mean + std."
    )
    prefill_scope: Literal["all", "last"] = Field(
        "all", description="Prompt rows scaled at prefill: every row, or only the last one."
    )
    vhd_reinforce_counterfactual: bool = Field(
        True, description="Scale the text-only branch's heads too, so both streams match."
    )
    text_only: TextOnly

    @field_validator("layers")
    @classmethod
    def _layers(cls, layers: Literal["auto"] | list[int]) -> Literal["auto"] | list[int]:
        if isinstance(layers, list) and any(layer < 0 for layer in layers):
            raise ValueError(f"layers must be indices >= 0, got {layers}")
        return layers

    def is_neutral(self) -> bool:
        return self.alpha == 1.0 or self.layers == []

    def contribute(self, model: ModelInfo) -> Contribution:
        layers = reinforced_layers(self.layers, model.num_layers)
        view = View(
            "vhr.text_only",
            weight=ConstantWeight(0.0),  # a prefill-only view never enters the logits
            drop_image=True,
            text_only=self.text_only,
            prefill_only=True,
            edited=False,
        )
        hook = Reinforce(
            view=view,
            layers=layers,
            alpha=self.alpha,
            outlier_filter=self.outlier_filter,
            last_only=self.prefill_scope == "last",
            scale_counterfactual=self.vhd_reinforce_counterfactual,
        )
        return Contribution(views=(view,), attention=hook)


def reinforced_layers(layers: Literal["auto"] | list[int], num_layers: int) -> frozenset[int]:
    """'auto' -> {1} + the last round(14/32 * L) layers; explicit lists are checked."""
    if layers == "auto":
        count = int(LAST_LAYERS_SHARE * num_layers + 0.5)
        return frozenset({1} & set(range(num_layers))) | frozenset(
            range(num_layers - count, num_layers)
        )
    bad = [layer for layer in layers if layer >= num_layers]
    if bad:
        raise ValueError(f"VHR layers {bad} do not exist: the model has {num_layers} layers")
    return frozenset(layers)


def head_scales(
    out: torch.Tensor, view: int, rows_per_sample: int, has_image: torch.Tensor,
    targets: torch.Tensor, alpha: float, outlier_filter: bool,
) -> torch.Tensor:  # fmt: skip
    """float32 [R, H]: one prefill layer's head scales. out [R, Q, H, D], rows sample-major
    (`rows_per_sample` a sample, its with-image row first, its text-only row at `view`);
    has_image bool [B], targets bool [R] (the rows VHR scales). On CUDA,
    kernels/triton_vhr.py does this in one launch."""
    last = out[:, -1].float().unflatten(0, (-1, rows_per_sample))  # [B, V+1, H, D]
    with_image, without = last[:, 0], last[:, view]  # [B, H, D] last prompt position
    vhd = (with_image - without).norm(dim=-1)  # [B, H]
    chosen = select_heads(vhd, without.norm(dim=-1), outlier_filter)
    sample_scale = torch.where(chosen & has_image[:, None], alpha, 1.0)  # [B, H]
    return torch.where(targets[:, None], sample_scale.repeat_interleave(rows_per_sample, 0), 1.0)


def select_heads(vhd: torch.Tensor, text_norm: torch.Tensor, outlier_filter: bool) -> torch.Tensor:
    """vhd, text_norm [B, H] -> bool [B, H]: heads with VHD > the layer's median.

    Outliers (VHD and text-only output norm both above mean + std, unbiased std) get VHD 0 first.
    torch.median semantics: the lower middle value for even H, so ties select fewer heads.
    """
    if outlier_filter:
        high = vhd > vhd.mean(-1, keepdim=True) + vhd.std(-1, keepdim=True)
        surge = text_norm > text_norm.mean(-1, keepdim=True) + text_norm.std(-1, keepdim=True)
        vhd = torch.where(high & surge, torch.zeros_like(vhd), vhd)
    return vhd > vhd.median(-1, keepdim=True).values


@dataclass(frozen=True)
class Reinforce:
    """AttentionHook: select heads at prefill (after), scale them at decode (edits)."""

    view: View
    layers: frozenset[int]
    alpha: float
    outlier_filter: bool
    last_only: bool
    scale_counterfactual: bool

    def edits(self, call: AttentionCall) -> dict[str, Any] | None:
        scale = call.ctx.state.get("vhr.head_scale")
        if call.ctx.phase != "decode" or call.layer not in self.layers or scale is None:
            return None
        return {"head_scale": scale[:, call.layer]}  # [R, H], a view (the kernel reads rows)

    def _row_masks(self, ctx: ForwardContext, view: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(bool [B]: samples with an image, without one VHR changes nothing; bool [R]: rows
        whose heads are scaled), the same at every layer."""
        state = ctx.state
        has_image = ctx.layout.n_image[:: len(ctx.plan.views) + 1] > 0
        targets = state["row.edited"] | ((state["row.view"] == view) & self.scale_counterfactual)
        return has_image, targets

    def after(self, call: AttentionCall, out: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        """Prefill: out [R, Q, H, D]. Choose this layer's heads and scale them in place."""
        ctx = call.ctx
        if ctx.phase != "prefill" or call.layer not in self.layers:
            return
        R, _, H, _ = out.shape
        state = ctx.state
        if "vhr.head_scale" not in state:
            state["vhr.head_scale"] = torch.ones(
                R, ctx.num_layers, H, dtype=torch.float32, device=out.device
            )
        view = 1 + next(i for i, v in enumerate(ctx.plan.views) if v is self.view)
        has_image, targets = ctx.once("vhr.rows", out.device, lambda: self._row_masks(ctx, view))
        # Prefill rows are in RowState.start's order, sample-major with views 0..V: reshaping
        # finds each sample's rows without a host sync (a nonzero() per layer would wait for
        # the GPU 2x15 times a prefill).
        args = (out, view, len(ctx.plan.views) + 1, has_image, targets, self.alpha,
                self.outlier_filter)  # fmt: skip
        if out.is_cuda:  # one kernel for the twenty small ops of head_scales
            from lvlm_fix.kernels import triton_vhr

            scale = triton_vhr.head_scales(*args)
        else:
            scale = head_scales(*args)
        state.write("vhr.head_scale", (slice(None), call.layer), scale)
        rows = out[:, -1:] if self.last_only else out
        rows.mul_(scale[:, None, :, None].to(out.dtype))
