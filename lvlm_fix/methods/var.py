"""VAR: Visual Attention Redistribution (Kang et al., ICLR 2025, "See What You Are Told").

At prefill, a token is a *sink* at layer l when its residual stream entering l has a massive
activation in the model's sink dimensions: phi(x) = max_{d in D_sink} |x_d| / RMS(x) > tau
(fp32, bare RMS without the learned gain, strict >). Sinks inside the image are *visual sinks*,
the others (BOS, punctuation) *text sinks*. Then, in attention rows after the image that look at
the image enough (A_V >= min_image_mass) and not mostly at its sinks (A_Sv / A_V <= max_sink_share),
a `recycle_fraction` of the sink mass (text and visual) moves to the non-sink image tokens, in
proportion to their own attention. The kernel does the redistribution (`AttentionEdits.var_*`);
this file finds the sinks and says which columns and rows it applies to.

Layers: 2 .. L-2 by default, as the paper says (the last layer is left alone). The released code
(seilk/VisAttnSink) edits the last layer too: its `except_last_layer` is shadowed by a class
attribute set to False (specs/var.md §1). `skip_last_layer=False` reproduces that.

Conventions (paper vs code, issue #5 of seilk/VisAttnSink): the code's `p` is the fraction of sink
mass *kept* (`recycle_fraction = 1 - p_code`); the code's `rho` bounds the visual-*sink* share
(`max_sink_share = rho_code = 1 - rho_paper`). Defaults are the released LLaVA-1.5-7B config.

Sink dimensions: a table for the backbones where they are known (keyed by the language model
type and hidden size); `discover_sink_dims` finds them for any checkpoint from a few prompts.
With `sink_dims="auto"` on a model not in the table, each request discovers its own: at layer l
the dims are every channel d with |x_d| / RMS(x) > tau in the first prompt token's (BOS's) residual
stream at any layer 2..min(l, L-2) so far. Those are the massive-activation channels the paper
describes; the first token always carries them, which is why it is the probe.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator

from lvlm_fix.methods.base import Contribution, Intervention, register
from lvlm_fix.model import ModelInfo

if TYPE_CHECKING:
    from PIL import Image

    from lvlm_fix.hooks import AttentionCall, ForwardContext

log = logging.getLogger(__name__)

# (language model type, hidden size) -> sink dimensions. Sources: VisAttnSink constants.py
# (LLaMA-2/Vicuna 7B and 13B) and the paper (Qwen2-7B, also LLaVA-OneVision-7B's backbone).
KNOWN_SINK_DIMS: dict[tuple[str, int], tuple[int, ...]] = {
    ("llama", 4096): (1415, 2533),
    ("llama", 5120): (2100, 4743),
    ("qwen2", 3584): (458, 2570),
}

FIRST_SINK_LAYER = 2  # massive activations appear at layer 2; layers 0 and 1 are never edited
TEXT_SINK, VISUAL_SINK, IMAGE = 1, 2, 3  # col_group values (see kernels.edits)


@register
class VAR(Intervention):
    """Visual Attention Redistribution: recycle sink attention to non-sink image tokens."""

    name: ClassVar[str] = "var"
    hooks: ClassVar[frozenset] = frozenset({"attention", "layer_input"})

    recycle_fraction: float = Field(
        0.4, ge=0.0, le=1.0, description="Sink mass share moved to the image (1 - p_code; 0 = off)."
    )
    max_sink_share: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="rho_code: edit a row only if A_Sv/A_V <= this (1 - rho_paper).",
    )
    min_image_mass: float = Field(
        0.2, ge=0.0, le=2.0, description="summ: edit a row only if A_V >= this (> 1 = off)."
    )
    tau: float = Field(
        20.0, gt=0.0, le=1e6, description="Sink threshold on max |x_d|/RMS(x) (strict >)."
    )
    skip_last_layer: bool = Field(
        True, description="Leave the last layer alone (paper); False = edit it too (released code)."
    )
    sink_dims: Literal["auto"] | list[int] = Field(
        "auto",
        max_length=64,
        description="Massive-activation channels, or 'auto' (table, else per request).",
    )

    @field_validator("sink_dims")
    @classmethod
    def _dims(cls, dims: Literal["auto"] | list[int]) -> Literal["auto"] | list[int]:
        if isinstance(dims, list) and any(d < 0 for d in dims):
            raise ValueError(f"sink_dims must be channel indices >= 0, got {dims}")
        return dims

    def is_neutral(self) -> bool:
        return self.recycle_fraction == 0 or self.min_image_mass > 1 or self.sink_dims == []

    def contribute(self, model: ModelInfo) -> Contribution:
        dims = resolve_sink_dims(self.sink_dims, model)
        last = model.num_layers - 1 if self.skip_last_layer else model.num_layers
        layers = frozenset(range(FIRST_SINK_LAYER, last))
        finder = SinkFinder(dims, self.tau, model.num_layers)
        redistribute = Redistribute(
            layers, 1.0 - self.recycle_fraction, self.max_sink_share, self.min_image_mass
        )
        return Contribution(attention=redistribute, layer_input=finder)


def resolve_sink_dims(dims: str | list[int], model: ModelInfo) -> tuple[int, ...] | None:
    """Explicit dims, the table's dims for this backbone, or None (= discover per request)."""
    if dims != "auto":
        bad = [d for d in dims if d >= model.hidden_size]
        if bad:
            raise ValueError(f"sink_dims {bad} are outside the hidden size {model.hidden_size}")
        return tuple(dims)
    return KNOWN_SINK_DIMS.get((model.text_model_type, model.hidden_size))


def sink_ratio(hidden: torch.Tensor) -> torch.Tensor:
    """|x_d| / RMS(x) in fp32, bare RMS (no learned gain): hidden [..., D] -> [..., D]."""
    x = hidden.float()
    rms = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    return x.abs() / rms


def sink_tokens(hidden: torch.Tensor, dims: Sequence[int], tau: float,
                filled: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """bool [R, S]: tokens whose phi = max over `dims` of sink_ratio exceeds tau, padding
    (filled False) excluded. On CUDA, kernels/triton_sinks.py does this in one launch."""
    ratio = sink_ratio(hidden)  # [R, S, D]
    # one slice per dim: indexing with the list would copy it to the GPU (a host sync)
    phi = torch.stack([ratio[..., d] for d in dims], -1).amax(-1)
    return (phi > tau) & filled


@dataclass(frozen=True)
class SinkFinder:
    """LayerInputHook: at prefill, mark each prompt token's sink status per layer.

    Writes state["var.sink_mask"] bool [R, L, S] and state["var.sink_count"] long [R, L, 2]
    (text sinks, visual sinks). With dims None, also state["var.auto_dims"] bool [R, D].
    """

    dims: tuple[int, ...] | None
    tau: float
    num_layers: int

    def __call__(self, layer: int, hidden: torch.Tensor, ctx: ForwardContext) -> None:
        if ctx.phase != "prefill" or layer < FIRST_SINK_LAYER:
            return
        state, (R, S, _) = ctx.state, hidden.shape
        if "var.sink_mask" not in state:
            state["var.sink_mask"] = torch.zeros(R, self.num_layers, S, dtype=torch.bool,
                                                 device=hidden.device)  # fmt: skip
        filled = ctx.layout.filled  # [R, S]: padding is never a sink
        if self.dims is None:
            ratio = sink_ratio(hidden)  # [R, S, D]
            phi = (ratio * self._auto_dims(layer, ratio, ctx)[:, None, :]).amax(-1)  # [R, S]
            sink = (phi > self.tau) & filled
        elif hidden.is_cuda:  # one kernel for the dozen ops of sink_tokens
            from lvlm_fix.kernels import triton_sinks

            dims = ctx.once("var.dims", hidden.device, lambda: _on_device(self.dims, hidden))
            sink = triton_sinks.sink_tokens(hidden, dims, self.tau, filled)
        else:
            sink = sink_tokens(hidden, self.dims, self.tau, filled)
        state.write("var.sink_mask", (slice(None), layer), sink)
        if layer == self.num_layers - 1:  # the counts of every layer at once (VAR never prunes)
            sinks, image = state["var.sink_mask"], ctx.layout.image_mask[:, None]
            state["var.sink_count"] = torch.stack(
                [(sinks & ~image).sum(-1), (sinks & image).sum(-1)], -1
            )
            if log.isEnabledFor(logging.DEBUG):
                log.debug("VAR sinks per layer (row 0, text/visual): %s",
                          state["var.sink_count"][0].tolist())  # fmt: skip

    def _auto_dims(self, layer: int, ratio: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """float [R, D]: 1 on dims where the first token exceeded tau at layers 2..min(l, L-2)."""
        state = ctx.state
        if "var.auto_dims" not in state:
            state["var.auto_dims"] = torch.zeros(ratio.shape[0], ratio.shape[2], dtype=torch.bool,
                                                 device=ratio.device)  # fmt: skip
        if layer <= self.num_layers - 2:
            rows = torch.arange(ratio.shape[0], device=ratio.device)
            first = ratio[rows, ctx.layout.key_start]  # [R, D] the BOS row
            state["var.auto_dims"] = state["var.auto_dims"] | (first > self.tau)
        return state["var.auto_dims"].float()


def _on_device(dims: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """int32 [n] on like's device, copied from pinned memory: asynchronously, no host sync."""
    host = torch.tensor(dims, dtype=torch.int32).pin_memory()
    return host.to(like.device, non_blocking=True)


@dataclass(frozen=True)
class Redistribute:
    """AttentionHook: VAR's column groups and eligible rows for one layer.

    A row is edited when it is an edited view's row and its sample has a visual sink in this
    layer. Eligible query rows: at prefill those after the last image column, at decode all.
    The decode edits never change after prefill, so the first decode step builds them for every
    layer at once (state "var.decode_groups" int8 [R, L, S], "var.decode_active" bool [R, L, 1];
    "var.n_image" float [R] is built by the first edited layer); later steps only slice them.
    col_group stays prompt-wide: the kernel reads generated columns as group 0.
    """

    layers: frozenset[int]
    keep: float  # p_code
    rho: float
    summ: float

    def edits(self, call: AttentionCall) -> dict[str, Any] | None:
        ctx = call.ctx
        if call.layer not in self.layers or "var.sink_mask" not in ctx.state:
            return None
        if "var.n_image" not in ctx.state:  # float [R], read by every edited layer and step
            ctx.state["var.n_image"] = ctx.layout.n_image.float()
        if ctx.phase == "decode" and call.query.shape[2] == 1:
            return self._decode_edits(call)
        image = ctx.layout.image_mask  # [R, S]
        sink = ctx.state["var.sink_mask"][:, call.layer]  # [R, S]
        active = ctx.state["row.edited"] & (sink & image).any(-1)  # [R]
        # No host check for layers without visual sinks: var_rows all False makes the kernel's
        # VAR a no-op, and a sync per layer would cost more than the kernel saves.
        codes = ctx.once("var.codes", image.device, lambda: _codes(image))
        return {
            "col_group": _groups(sink, codes, active[:, None]),  # generated columns: group 0
            "var_rows": self._rows(call, active),
            "var_keep": self.keep,
            "var_rho": self.rho,
            "var_summ": self.summ,
            "n_image": ctx.state["var.n_image"],
        }

    def _decode_edits(self, call: AttentionCall) -> dict[str, Any]:
        """One query row: views of the per-request tensors, built on the first decode step."""
        state = call.ctx.state
        if "var.decode_groups" not in state:
            sinks, image = state["var.sink_mask"], call.ctx.layout.image_mask  # [R, L, S], [R, S]
            active = state["row.edited"][:, None] & (sinks & image[:, None]).any(-1)  # [R, L]
            state["var.decode_groups"] = _groups(sinks, _codes(image[:, None]), active[..., None])
            state["var.decode_active"] = active[..., None]  # [R, L, 1]: the one query row
        return {
            "col_group": state["var.decode_groups"][:, call.layer],  # [R, S]
            "var_rows": state["var.decode_active"][:, call.layer],  # [R, 1]; no host sync
            "var_keep": self.keep,
            "var_rho": self.rho,
            "var_summ": self.summ,
            "n_image": state["var.n_image"],
        }

    def _rows(self, call: AttentionCall, active: torch.Tensor) -> torch.Tensor:
        """bool [R, Q]: query rows VAR may edit."""
        layout, Q = call.ctx.layout, call.query.shape[2]
        if call.ctx.phase == "decode":
            return active[:, None].expand(active.shape[0], Q)
        return layout.after_image[:, -Q:] & active[:, None]  # a prefill's Q rows end the prompt

    def after(self, call: AttentionCall, out: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        return None


def _codes(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 (group of a column if it is a sink, group if not): VISUAL_SINK / TEXT_SINK, and
    IMAGE / 0 (rest). The same at every layer: only which columns are sinks changes."""
    as_sink = torch.where(image, VISUAL_SINK, TEXT_SINK).to(torch.int8)
    return as_sink, torch.where(image, IMAGE, 0).to(torch.int8)


def _groups(
    sink: torch.Tensor, codes: tuple[torch.Tensor, torch.Tensor], active: torch.Tensor
) -> torch.Tensor:
    """int8 col_group: sinks of active rows are text/visual sinks, other image columns IMAGE.
    sink [..., S]; codes (`_codes`) and active broadcast to it (active has a trailing 1)."""
    return torch.where(active & sink, *codes)


def discover_sink_dims(
    lvlm: Any, samples: Sequence[tuple[str, Sequence[Image.Image]]], tau: float = 20.0,
    min_share: float = 0.9,
) -> list[int]:  # fmt: skip
    """Find a checkpoint's sink dimensions from about 20 prompts (text-only and with images).

    For every prompt and every layer l in 2..L-2, take the first prompt token's residual stream
    entering l and mark the channels with |x_d| / RMS(x) > tau. A channel is a sink dimension
    when it is marked in at least `min_share` of the (prompt, layer) pairs. Cache the result per
    checkpoint and pass it as `VAR(sink_dims=...)`. `lvlm` is a loaded `lvlm_fix.LVLM`.
    """
    from lvlm_fix.model import encode_rows, render_prompt

    if not samples:
        raise ValueError("discover_sink_dims needs at least one (text, images) sample")
    L = lvlm.info.num_layers
    if L < 4:
        raise ValueError(f"sink discovery needs layers 2..L-2, the model has only {L} layers")
    hits, seen = torch.zeros(lvlm.info.hidden_size), 0
    for text, images in samples:
        prompt = render_prompt(lvlm.processor, text, len(images))
        batch = encode_rows(lvlm.processor, lvlm.info.image_token_id, [prompt], [list(images)],
                            lvlm.device)  # fmt: skip
        extra = {"image_sizes": batch.image_sizes} if batch.image_sizes is not None else {}
        with torch.inference_mode():
            out = lvlm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             pixel_values=batch.pixel_values, output_hidden_states=True,
                             logits_to_keep=1, **extra)  # fmt: skip
        # hidden_states[l] enters decoder layer l (index 0 is the embeddings).
        for layer in range(FIRST_SINK_LAYER, L - 1):
            first = out.hidden_states[layer][0, 0]  # [D], one prompt: no padding
            hits += (sink_ratio(first) > tau).float().cpu()
            seen += 1
    return sorted(torch.nonzero(hits >= min_share * seen).flatten().tolist())
