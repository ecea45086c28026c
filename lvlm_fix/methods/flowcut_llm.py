"""FlowCut's LLM stage (LLaVA-NeXT anyres): cut each sample's visual tokens to the budget once,
scored from one decoder layer's attention, for every later layer.

At decoder layer `layer`, the last prompt token scores every visual key of its row:
    rel   = mean_h softmax(q_last . K_v / sqrt d)        softmax over the visual keys only
    sem   = mean_h softmax(v_last . V_v / sqrt d)        the same for the values
    score = (rel / sum rel + sem / sum sem) * || mean_h V_v ||_1
(q post-RoPE, the tensors the layer's attention used; a cheap side row after that attention,
any kernel). Layers > `layer` keep the `budget` best visual tokens of each row, in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lvlm_fix.hooks import AttentionCall, ForwardContext
from lvlm_fix.methods.fastv import top_image_columns


def visual_scores(call: AttentionCall) -> torch.Tensor:
    """Score of each key column [R, K] (fp32); only image columns are meaningful."""
    query = call.query[:, :, -1].float()  # [R, H, D]: the last prompt token
    key, value = call.key.float(), call.value.float()  # [R, Hkv, K, D]
    rows, heads, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    # GQA: query head h reads KV head h // groups.
    rel = query.view(rows, kv_heads, -1, dim) @ key.transpose(-1, -2)  # [R, Hkv, g, K]
    rel = rel.view(rows, heads, k_len) * call.scaling
    sem = (value[:, :, -1:] @ value.transpose(-1, -2))[:, :, 0] * call.scaling  # [R, Hkv, K]
    image = call.layout.image_mask[:, None]  # [R, 1, K]
    # Softmax over the visual keys only; a finite fill keeps rows without images finite.
    fill = torch.finfo(torch.float32).min
    rel = rel.masked_fill(~image, fill).softmax(-1).mean(1) * image[:, 0]  # [R, K]
    sem = sem.masked_fill(~image, fill).softmax(-1).mean(1) * image[:, 0]
    norm = value.mean(1).abs().sum(-1)  # [R, K]: L1 norm of the head-mean value
    total = rel.sum(-1, keepdim=True).clamp(min=1e-30), sem.sum(-1, keepdim=True).clamp(min=1e-30)
    return (rel / total[0] + sem / total[1]) * norm


@dataclass(frozen=True)
class FlowCutLLMHook:
    """Score at decoder layer `layer` (attention side row), cut at the input of `layer` + 1."""

    layer: int
    budget: int  # visual tokens each row keeps
    renumber: bool  # layers > `layer` number their prompt columns compactly (the reference)

    def edits(self, call: AttentionCall) -> None:
        return None

    def after(self, call: AttentionCall, out: torch.Tensor, stats: dict) -> None:
        if call.ctx.phase == "prefill" and call.layer == self.layer:
            call.ctx.scratch["flowcut.llm_score"] = visual_scores(call)

    def select(self, layer: int, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        if layer != self.layer + 1:
            return None
        image = ctx.layout.at_layer(layer - 1).image_mask  # columns of `hidden`
        n_keep = image.sum(-1).clamp(max=self.budget)  # rows within the budget keep everything
        return top_image_columns(ctx.scratch.pop("flowcut.llm_score"), image, n_keep)
