"""The attention function registered with transformers for the language model.

It has transformers' attention signature. With no plan, or a plan whose hooks edit nothing in
this layer, it calls `sdpa_attention_forward` untouched (bit-identical to stock SDPA). Otherwise
it merges the hooks' edits into one `AttentionEdits` and runs the fused kernel once, or the
plain-torch path when a hook's edits hold modifiers. It records which path ran in the forward
context (`ForwardContext.paths`): "sdpa", "fused" or "modifiers".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lvlm_fix.hooks import AttentionCall, current
from lvlm_fix.kernels import AttentionEdits, edited_attention

NAME = "lvlm_fix"

# Fields that several hooks may request at once, and how their values merge.
_FLAGS = ("want_group_mass", "want_last_row")
_MODIFIERS = ("score_mods", "prob_mods")  # applied in the plan's hook order


def register() -> None:
    """Make `attn_implementation="lvlm_fix"` available (idempotent)."""
    AttentionInterface.register(NAME, lvlm_attention)
    # Without a mask factory under the same name, transformers would pass mask=None (no padding).
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_for_text_model(model: torch.nn.Module) -> None:
    """Switch a loaded model's language model to our attention (its vision tower keeps its own).

    Attention hooks (VAR, VHR, PAI, OPERA) and LLM-side pruning act only inside `lvlm_attention`:
    a text model left on another implementation would silently run stock attention.
    """
    register()
    model.set_attn_implementation({"text_config": NAME})
    # transformers only logs a warning when a model cannot switch implementations at run time
    actual = model.config.text_config._attn_implementation
    if actual != NAME:
        raise ValueError(
            f"cannot switch {type(model).__name__}'s language model to the {NAME!r} attention "
            f"(it stays on {actual!r}), so interventions would silently do nothing"
        )


def merge_edits(call: AttentionCall, requests: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge per-hook edit requests; head scales multiply, flags OR, anything else must agree."""
    if len(requests) == 1 and ("col_group" in requests[0] or not _needs_columns(requests[0])):
        return requests[0]  # the common single-hook case: nothing to merge or fill in
    merged: dict[str, Any] = {}
    for request in requests:
        for key, value in request.items():
            if key not in merged:
                merged[key] = value
            elif key == "head_scale":
                merged[key] = merged[key] * value
            elif key in _FLAGS:
                merged[key] = merged[key] or value
            elif key in _MODIFIERS:
                merged[key] = merged[key] + value
            else:
                raise ValueError(f"two interventions both set attention field {key!r}")
    if "col_group" not in merged and _needs_columns(merged):
        # 3 = image, no sinks; prompt-wide: the generated columns past it are group 0 (rest)
        merged["col_group"] = (call.layout.image_mask * 3).to(torch.int8)
    return merged


@dataclass(frozen=True)
class HiddenColumns:
    """Score modifier: the columns a request's mask hides past its first column (OPERA's replay
    holes), which the fused kernels' [key_start, key_end) window cannot state."""

    mask: torch.Tensor  # [R, K'] 0 = hidden; columns past K' are visible

    def __call__(self, score, b, h, q_idx, kv_idx):
        width = score.shape[-1]
        visible = self.mask[:, :width].bool()
        visible = torch.nn.functional.pad(visible, (0, width - visible.shape[1]), value=True)
        return score.masked_fill(~visible[b, kv_idx], float("-inf"))


def _needs_columns(edits: dict[str, Any]) -> bool:
    return "image_gain" in edits or "var_rows" in edits or bool(edits.get("want_group_mass"))


def lvlm_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    ctx = current()
    # A step over a cache whose filled columns end at key_end (the engine's slots, a static
    # decode step) runs our kernel even without edits: it reads each row from its key_start
    # to key_end, where stock SDPA would read every column of the cache.
    if ctx is None or (not ctx.plan.attention_hooks and ctx.key_end is None):
        if ctx is not None:
            ctx.paths.add("sdpa")
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    ctx = ctx.on(query.device)  # a split model's layer on another GPU: the context's copies there
    call = AttentionCall(module.layer_idx, query, key, value, scale, ctx)
    requests = [r for hook in ctx.plan.attention_hooks if (r := hook.edits(call))]
    if requests and ctx.holes:
        requests.append({"score_mods": (HiddenColumns(ctx.attention_mask),)})
    if requests or ctx.key_end is not None:
        edits = AttentionEdits(**merge_edits(call, requests)) if requests else AttentionEdits()
        ctx.paths.add("fused" if edits.fused else "modifiers")
        # Our hooks build the edits to the kernel's contract, so the hot loop skips re-checking
        # it (tests hold the methods to it); public callers of edited_attention keep the checks.
        out, stats = edited_attention(
            query, key, value, scale=scale, key_start=call.layout.key_start, edits=edits,
            key_end=ctx.key_end, validate=False,
        )  # fmt: skip
    else:
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
        ctx.paths.add("sdpa")
        stats = {}
    for hook in ctx.plan.attention_hooks:
        hook.after(call, out, stats)
    return out, None
