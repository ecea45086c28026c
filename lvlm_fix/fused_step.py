"""The engine's shared decode step written out as one compact decoder, like gpt-fast's.

Run through transformers' forward, a one-token step costs every decoder layer some forty small
kernels (three projections, norms, rotary, residuals, each several elementwise ops); inside a
CUDA graph that count, not the weights' bytes, sets the step's time at small batches. Here the
step of the decoder layer transformers' Llama, Mistral and Qwen2 share is written out:

    x = RMSNorm(h)                                   (fused into the previous layer's end)
    q, k, v = x @ Wqkv (+ bias)                      one matmul
    rotary on q, k; k, v written into the slot cache
    h = h + edited_attention(q, cache) @ Wo          the layer's edits (VAR, VHR, PAI) as given
    gate, up = RMSNorm(h) @ Wgate_up                 one matmul
    h = h + (act(gate) * up) @ Wdown;  x' = the next layer's RMSNorm(h)

The fused projections are made once per model, when `LVLM` wraps it (`fused_layers`): the
concatenated weight becomes the storage of the transformers modules' own weights, each module's
`weight` re-pointed to its rows, so prefill and the own lane (transformers' forward) run on the
same memory and nothing is copied. Made at load, before any CUDA graph is captured: a graph
captured over the old tensors would read freed memory. (A decoder holds the weights it was
built on: move the model to another device or dtype before wrapping it.) The arithmetic is
transformers', op for op; only the fused matmuls may round differently from separate ones.

Compiled (on a GPU, for the CUDA graphs SlotBatch captures), inductor fuses the norms, rotary,
cache writes, residual adds and activation around the matmuls and our attention op
`lvlm_fix::edited_attention`. Every layer runs one compiled function, its weights arguments, so
compile time does not grow with depth; each layer ends with the next one's input norm so that
the residual add and the norm stay one kernel across the layer boundary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.cache_utils import get_layer_types_and_kwargs

from lvlm_fix.kernels import AttentionEdits, edited_attention
from lvlm_fix.model import FAMILIES, ModelInfo, layer_devices, resolve

# Text models whose decoder layer is the one above (Qwen2 adds q/k/v biases).
ARCHITECTURES = ("llama", "mistral", "qwen2")


class Weights(NamedTuple):
    """One decoder layer's weights, all views of the transformers modules' own."""

    qkv: Tensor  # [(H + 2 Hkv) D, hidden]: q_proj, k_proj, v_proj
    qkv_bias: Tensor | None  # Qwen2's
    o: Tensor
    mlp_norm: Tensor
    gate_up: Tensor  # [2 I, hidden]: gate_proj, up_proj
    down: Tensor
    next_norm: Tensor  # the next layer's input norm (the final norm after the last layer)


@dataclass(frozen=True)
class Shape:
    heads: int
    kv_heads: int
    head_dim: int
    eps: float  # every RMSNorm's
    columns: int  # the slot cache's columns per row


def unsupported(model, info: ModelInfo) -> str | None:
    """Why the fused step cannot run this model's language model (None: it can)."""
    if len(set(layer_devices(model, info.family)) | {model.device}) > 1:
        # One compact decoder over every layer cannot follow accelerate's moves between GPUs.
        return "its layers are split over devices (device_map)"
    text = model.config.get_text_config(decoder=True)
    if text.model_type not in ARCHITECTURES:
        return f"its language model is {text.model_type!r}, not one of {ARCHITECTURES}"
    layer_types, _ = get_layer_types_and_kwargs(text)
    if any(kind != "full_attention" for kind in layer_types):
        return "it has sliding-window layers"
    lm = resolve(model, FAMILIES[info.family].language_model)
    rope = getattr(lm.rotary_emb, "rope_type", "default")
    if "dynamic" in rope or rope == "longrope":  # frequencies recomputed from the positions
        return "its rotary frequencies change with the sequence length"
    layer = lm.layers[0]
    unbiased = (layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                layer.mlp.down_proj)  # fmt: skip
    if any(linear.bias is not None for linear in unbiased):
        return "its o/gate/up/down projections have biases"
    return None


def fuse_projections(linears: list[nn.Linear]) -> tuple[Tensor, Tensor | None]:
    """One weight [sum of outputs, inputs] (and bias) holding these layers' rows in order.

    The first call concatenates them and re-points each module's weight (bias) to its rows of
    the result: the old tensors are freed, nothing is held twice. Later calls find the modules
    already sharing one block and return it.
    """
    has_bias = linears[0].bias is not None
    weight = _adjacent([m.weight for m in linears])
    bias = _adjacent([m.bias for m in linears]) if has_bias else None
    if weight is not None and (bias is not None or not has_bias):
        return weight, bias
    with torch.no_grad():
        weight = torch.cat([m.weight for m in linears])
        bias = torch.cat([m.bias for m in linears]) if has_bias else None
    start = 0
    for m in linears:
        rows = slice(start, start + m.out_features)
        m.weight = nn.Parameter(weight[rows], requires_grad=m.weight.requires_grad)
        if bias is not None:
            m.bias = nn.Parameter(bias[rows], requires_grad=m.bias.requires_grad)
        start += m.out_features
    return weight, bias


def _adjacent(tensors: list[Tensor]) -> Tensor | None:
    """The tensors as one, if they already lie back to back in one contiguous block."""
    first = tensors[0]
    storage, address = first.untyped_storage().data_ptr(), first.data_ptr()
    for t in tensors:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != storage:
            return None
        if t.data_ptr() != address:
            return None
        address += t.nbytes
    rows = sum(t.shape[0] for t in tensors)
    return first.detach().as_strided((rows, *first.shape[1:]), first.stride())


def fused_layers(model, info: ModelInfo) -> list[Weights]:
    """Each decoder layer's `Weights`, fusing q/k/v and gate/up in place where not yet done."""
    lm = resolve(model, FAMILIES[info.family].language_model)
    layers = list(lm.layers)
    norms = [layer.input_layernorm.weight for layer in layers] + [lm.norm.weight]
    weights = []
    for layer, next_norm in zip(layers, norms[1:], strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        qkv, qkv_bias = fuse_projections([attn.q_proj, attn.k_proj, attn.v_proj])
        gate_up, _ = fuse_projections([mlp.gate_proj, mlp.up_proj])
        weights.append(Weights(qkv, qkv_bias, attn.o_proj.weight,
                               layer.post_attention_layernorm.weight, gate_up,
                               mlp.down_proj.weight, next_norm))  # fmt: skip
    return weights


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """transformers' Llama/Mistral/Qwen2 RMSNorm, op for op."""
    normed = x.float()
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """transformers' apply_rotary_pos_emb on one tensor."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


class Rows(NamedTuple):
    """What every layer of a step shares about its n rows."""

    cos: Tensor  # [n, 1, 1, D]: the rotary tables at each row's position
    sin: Tensor
    cells: Tensor  # long [n]: the flat cache row each row's token is written to
    key_end: Tensor  # long [n]: the columns each row attends to, its token's included
    key_start: Tensor  # long [n]: zeros (a row's keys start at column 0)
    width: int | None  # the columns read of each row (None: all; the kernel stops at key_end)


def embed(tokens: Tensor, positions: Tensor, table: Tensor, rotary_emb: nn.Module,
          first_norm: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Tokens, positions [n, 1] -> residual stream h [n, hidden], its first norm, cos, sin."""
    h = F.embedding(tokens, table)  # [n, 1, hidden]
    cos, sin = rotary_emb(h, positions)  # [n, 1, D] from transformers' own module
    h = h[:, 0]
    return h, rms_norm(h, first_norm, eps), cos[:, None], sin[:, None]


def layer_step(h: Tensor, x: Tensor, w: Weights, rows: Rows, cache: tuple[Tensor, Tensor],
               edits: dict[str, Tensor] | None, shape: Shape,
               act: nn.Module) -> tuple[Tensor, Tensor]:  # fmt: skip
    """One decoder layer for n rows of one token each: h [n, hidden] is the residual stream, x
    its normed input. Writes the tokens' keys and values into the layer's flat stores
    [slots * columns, Hkv, D] (`cache`) and attends with the layer's `edits` (AttentionEdits
    fields; None: none). Returns h and the next layer's normed input."""
    n = h.shape[0]
    H, Hkv, D = shape.heads, shape.kv_heads, shape.head_dim
    q, k, v = F.linear(x, w.qkv, w.qkv_bias).split((H * D, Hkv * D, Hkv * D), -1)
    q = rotary(q.view(n, H, 1, D), rows.cos, rows.sin)
    k = rotary(k.view(n, Hkv, 1, D), rows.cos, rows.sin)
    cache[0].index_copy_(0, rows.cells, k[:, :, 0])
    cache[1].index_copy_(0, rows.cells, v.view(n, Hkv, D))
    keys, values = (store.view(-1, shape.columns, Hkv, D)[:n, : rows.width].transpose(1, 2)
                    for store in cache)  # fmt: skip
    out, _ = edited_attention(
        q, keys, values, scale=D**-0.5, key_start=rows.key_start,
        edits=AttentionEdits(**edits) if edits else AttentionEdits(), key_end=rows.key_end,
        validate=False,  # the tables are built to the kernel's contract (as in attention.py)
    )  # fmt: skip
    h = h + F.linear(out.reshape(n, H * D), w.o)
    gate, up = F.linear(rms_norm(h, w.mlp_norm, shape.eps), w.gate_up).chunk(2, -1)
    h = h + F.linear(act(gate) * up, w.down)
    return h, rms_norm(h, w.next_norm, shape.eps)


def compile_room():
    """A context in which dynamo may keep more compiled variants of one function than its
    default 8: a model's steps need up to 6 (the largest bucket, the dynamic-batch one and
    batch 1; with and without edits), and each model a process loads adds its own. Past the
    limit dynamo would run the step uncompiled, silently. (The name changed in torch 2.7.)"""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch({name: 64})


class FusedDecoder:
    """A loaded model's language model as the fused one-token step (see the module docstring)
    over slot caches of `columns` columns a row.

    `compile_mode`: torch.compile the step's parts in this mode (None: run them eagerly).
    """

    def __init__(self, model, info: ModelInfo, columns: int, compile_mode: str | None = None):
        if compile_mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"compile mode {compile_mode!r} captures CUDA graphs of its own; "
                             "the engine captures the step itself (use 'default' or "
                             "'max-autotune-no-cudagraphs')")  # fmt: skip
        self.weights = fused_layers(model, info)  # fused when LVLM wrapped the model
        lm = resolve(model, FAMILIES[info.family].language_model)
        first = lm.layers[0]
        self.first_norm = first.input_layernorm.weight
        self.table, self.rotary_emb = lm.embed_tokens.weight, lm.rotary_emb
        self.lm_head = model.get_output_embeddings()
        self.act = first.mlp.act_fn  # one module for every layer: one compiled function
        self.shape = Shape(info.num_heads, info.num_kv_heads, info.head_dim,
                           first.input_layernorm.variance_epsilon, columns)  # fmt: skip
        self._embed, self._layer = embed, layer_step
        if compile_mode is not None:
            self._embed = torch.compile(embed, mode=compile_mode, fullgraph=True)
            self._layer = torch.compile(layer_step, mode=compile_mode, fullgraph=True)

    def step(
        self, tokens: Tensor, positions: Tensor, caches: list[tuple[Tensor, Tensor]],
        cells: Tensor, key_end: Tensor, key_start: Tensor,
        layer_edits: Callable[[int], dict[str, Tensor]] | None, width: int | None = None,
    ) -> Tensor:  # fmt: skip
        """Logits [n, V] of one token per row (tokens, positions [n, 1]; the rest as `Rows`
        says); `layer_edits(layer)` gives a layer's AttentionEdits fields (None: no edits)."""
        h, x, cos, sin = self._embed(tokens, positions, self.table, self.rotary_emb,
                                     self.first_norm, self.shape.eps)  # fmt: skip
        rows = Rows(cos, sin, cells, key_end, key_start, width)
        for layer, (w, cache) in enumerate(zip(self.weights, caches, strict=True)):
            edits = None if layer_edits is None else layer_edits(layer)
            h, x = self._layer(h, x, w, rows, cache, edits, self.shape, self.act)
        return self.lm_head(x[:, None])[:, -1]  # [n, 1, hidden], as transformers calls the head
