"""Named hook points and the per-forward context that carries a request's Plan into the model.

The decode loop (and only it) sets `ForwardContext` in a context variable around each forward.
The attention function and the layer-input pre-hooks, installed once per loaded model, read it.
With no context (plain use of the model) or an empty plan, every hook point is a no-op, so the
model behaves exactly like stock transformers. Context variables are per thread and per asyncio
task, so concurrent requests never see each other's plan.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from lvlm_fix.model import ImageLayout, resolve

if TYPE_CHECKING:
    from lvlm_fix.methods.base import RowState
    from lvlm_fix.plan import Plan

Phase = Literal["prefill", "decode"]


@dataclass
class ForwardContext:
    """What hooks may read during one forward of one request."""

    plan: Plan
    state: RowState  # per-row tensors: "row.view", "row.edited", "row.sample", method entries
    layout: ImageLayout  # image columns of the prompt, per row
    phase: Phase
    num_layers: int


_CURRENT: ContextVar[ForwardContext | None] = ContextVar("lvlm_fix_forward", default=None)


def current() -> ForwardContext | None:
    return _CURRENT.get()


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


@dataclass
class AttentionCall:
    """One attention call of one decoder layer, as hooks see it.

    query [R, H, Q, D] (after RoPE), key/value [R, Hkv, K, D] (the whole cache, this step
    included). Query row i sits at key column K - Q + i.
    """

    layer: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scaling: float
    ctx: ForwardContext

    @property
    def query_columns(self) -> torch.Tensor:
        """Key column of each query row: long [Q]."""
        q_len, k_len = self.query.shape[2], self.key.shape[2]
        return torch.arange(k_len - q_len, k_len, device=self.query.device)

    def image_columns(self) -> torch.Tensor:
        """bool [R, K]: prompt image tokens, padded with False over generated columns."""
        mask = self.ctx.layout.image_mask
        extra = self.key.shape[2] - mask.shape[1]
        return torch.nn.functional.pad(mask, (0, extra), value=False) if extra > 0 else mask


class AttentionHook(Protocol):
    """An intervention's view of attention: edits before the kernel, a look after it."""

    def edits(self, call: AttentionCall) -> dict[str, Any] | None:
        """Fields of `kernels.AttentionEdits` to set for this call (None = nothing here)."""

    def after(self, call: AttentionCall, out: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        """See the result: out [R, Q, H, D] and requested stats; may edit `out` in place."""


class LayerInputHook(Protocol):
    """Sees the residual stream entering decoder layer `layer`: hidden [R, S, D]."""

    def __call__(self, layer: int, hidden: torch.Tensor, ctx: ForwardContext) -> None: ...


def _layer_input(layer: int, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    ctx = _CURRENT.get()
    if ctx is None or not ctx.plan.layer_input_hooks:
        return None
    hidden = args[0] if args else kwargs["hidden_states"]
    for hook in ctx.plan.layer_input_hooks:
        hook(layer, hidden, ctx)
    return None


def install_hook_points(model: torch.nn.Module, decoder_layers: str) -> None:
    """Attach the layer-input hook point to every decoder layer of this model instance.

    The hooks hold no state: they dispatch to the plan of the current forward, if any.
    """
    for index, layer in enumerate(resolve(model, decoder_layers)):
        layer.register_forward_pre_hook(partial(_layer_input, index), with_kwargs=True)
