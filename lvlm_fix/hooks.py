"""Named hook points and the per-forward context that carries a request's Plan into the model.

The decode loop (and only it) sets `ForwardContext` in a context variable around each forward.
The attention function and the layer-input pre-hooks, installed once per loaded model, read it.
With no context (plain use of the model) or an empty plan, every hook point is a no-op, so the
model behaves exactly like stock transformers. Context variables are per thread and per asyncio
task, so concurrent requests never see each other's plan.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from lvlm_fix import anyres, devices
from lvlm_fix.compat import layer_cache
from lvlm_fix.devices import DeviceCopies
from lvlm_fix.kernels.reference import masked_softmax, visibility
from lvlm_fix.model import Family, ImageLayout, resolve
from lvlm_fix.pruning import gather_columns, layer_mask, pack_kept

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
    # Per-forward scratch space for hooks (e.g. a vision stage's running scores); keys are
    # prefixed with the method name. Core entries: "vision.valid", "vision.patch_ids",
    # "vision.tokens" (tokens per image before any cut), "vision.mask" (the encoder's
    # key-padding mask after a cut), "vision.keep_columns" (anyres: the prompt columns LLM
    # layer 0 keeps), ("prune.kwargs", device).
    scratch: dict[str, Any] = field(default_factory=dict)
    image_sizes: torch.Tensor | None = None  # long [n_images, 2] (NeXT) at prefill
    attention_mask: torch.Tensor | None = None  # [R, S + generated]: the loop's mask at decode
    # A decode step over a preallocated cache (the engine's slots, slots.py): long [R] (or [1]
    # for every row), each row's cache columns filled so far, this step's included. The keys
    # past it are empty (or stale); the query sits at key_end - 1.
    key_end: torch.Tensor | None = None
    # The attention mask hides columns past key_start (OPERA's replay holes): edited attention,
    # whose kernels only know [key_start, key_end), then masks them with a modifier.
    holes: bool = False
    # Which attention paths ran ("sdpa", "fused", "modifiers"; see attention.py). A Runner
    # hands every forward of a request the same set, so the request can say what ran.
    paths: set[str] = field(default_factory=set)
    # Copies of the tensors above on the devices of a split model's other layers (`on`). Its
    # owner passes the same object to each forward (a request's Runner, the engine's slots), so
    # copies of what did not change since the last step are not made again.
    copies: DeviceCopies = field(default_factory=DeviceCopies, repr=False)
    _views: dict[torch.device, ForwardContextOn] = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        """Where this context's tensors live: the model's input device."""
        return self.layout.key_start.device

    def once(self, name: str, device: torch.device, make: Callable[[], Any]) -> Any:
        """scratch[(name, device)], made by `make()` the first time this forward asks: for what
        a hook would otherwise rebuild at every layer (each op costs host time at prefill)."""
        key = (name, device)
        if key not in self.scratch:
            self.scratch[key] = make()
        return self.scratch[key]

    def on(self, device: torch.device) -> ForwardContext:
        """This context as a layer on `device` sees it: itself on its own device; for a layer of
        a split model on another GPU, a view whose tensors are copies there (see
        `ForwardContextOn`)."""
        if device == self.layout.key_start.device and not _ALWAYS_VIEW:
            return self
        view = self._views.get(device)
        if view is None:
            view = self._views[device] = ForwardContextOn(self, device)
        return view


# Tests set this to run every hook through a `ForwardContextOn`, also on the context's own device.
_ALWAYS_VIEW = False


class ForwardContextOn:
    """A ForwardContext as a decoder layer on another device sees it (a model split over GPUs
    with `device_map`): hooks get this instead of the context, with the same attributes.

    Reading `layout`, `attention_mask`, `key_end` or `state` entries gives copies on this
    device, made once and reused while their source is unchanged (no host sync: device to
    device copies). Writing goes to the context on its own device: `layout = ...` and
    `state[key] = ...` are moved there, `state.write(key, index, value)` writes in place there.
    `scratch` is the context's own dict: a hook that reads an entry another layer wrote moves
    it to its own device.
    """

    def __init__(self, ctx: ForwardContext, device: torch.device):
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "state", ctx.state.on(device, home=ctx.device))

    def __getattr__(self, name: str) -> Any:  # plan, phase, num_layers, scratch, image_sizes
        return getattr(self._ctx, name)

    def __setattr__(self, name: str, value: Any) -> None:
        ctx = self._ctx
        if name == "layout":  # a prune cut: the context keeps it on its device, this one here
            ctx.layout = devices.moved(value, ctx.device)
            ctx.copies.put("layout", ctx.layout, self.device, value)
        elif name in ("state", "device"):
            raise AttributeError(f"a device view's {name} cannot be replaced")
        else:
            setattr(ctx, name, value)

    @property
    def layout(self) -> ImageLayout:
        return self._ctx.copies.get("layout", self._ctx.layout, self.device)

    @property
    def attention_mask(self) -> torch.Tensor | None:
        return self._ctx.copies.get("attention_mask", self._ctx.attention_mask, self.device)

    @property
    def key_end(self) -> torch.Tensor | None:
        return self._ctx.copies.get("key_end", self._ctx.key_end, self.device)

    def on(self, device: torch.device) -> ForwardContext:
        return self._ctx.on(device)


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
    included; with a static cache, its empty columns too). Query row i sits at key column
    E - Q + i, E = ctx.key_end or K.
    """

    layer: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scaling: float
    ctx: ForwardContext

    @cached_property
    def layout(self) -> ImageLayout:
        """The image layout of this layer's keys (differs from ctx.layout after pruning)."""
        return self.ctx.layout.at_layer(self.layer)

    @property
    def query_columns(self) -> torch.Tensor:
        """Key column of each query row: long [Q], the same for every row (with one key_end or
        none; hooks never see the engine's shared steps, whose rows end apart)."""
        q_len = self.query.shape[2]
        end = self.key.shape[2] if self.ctx.key_end is None else self.ctx.key_end
        return end - q_len + torch.arange(q_len, device=self.query.device)

    def probabilities(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 [R, H, n, K]: stock (unedited) attention probabilities of query rows `rows`
        (long [n]; default all) over the columns each sees. For hooks that look at attention,
        at the rows they need: the kernels never materialise probabilities."""
        q_len, width = self.query.shape[2], self.key.shape[2]
        rows = torch.arange(q_len, device=self.query.device) if rows is None else rows
        group = self.query.shape[1] // self.key.shape[1]
        keys = self.key.float().repeat_interleave(group, dim=1)  # [R, H, K, D]
        scores = self.scaling * (self.query[:, :, rows].float() @ keys.transpose(-1, -2))
        visible = visibility(self.layout.key_start, q_len, width, self.ctx.key_end)[:, :, rows]
        return masked_softmax(scores, visible)

    def image_columns(self) -> torch.Tensor:
        """bool [R, K]: prompt image tokens, padded with False over generated columns."""
        mask = self.layout.image_mask
        extra = self.key.shape[2] - mask.shape[1]
        return torch.nn.functional.pad(mask, (0, extra), value=False) if extra > 0 else mask


class AttentionHook(Protocol):
    """An intervention's view of attention: edits before the kernel, a look after it.

    In the engine's shared batch (greedy or sampling, the usual case) `edits` is asked once per
    layer for a request's decode steps, after prefill, and `after` is not called at decode:
    a hook whose decode edits change per step, or that looks at decode steps, sets
    `Contribution.shared_decode=False` and its requests decode in a lane of their own.
    """

    def edits(self, call: AttentionCall) -> dict[str, Any] | None:
        """Fields of `kernels.AttentionEdits` to set for this call (None = nothing here)."""

    def after(self, call: AttentionCall, out: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        """See the result: out [R, Q, H, D] and requested stats; may edit `out` in place."""


class LayerInputHook(Protocol):
    """Sees the residual stream entering decoder layer `layer`: hidden [R, S, D]."""

    def __call__(self, layer: int, hidden: torch.Tensor, ctx: ForwardContext) -> None: ...


class PruneHook(Protocol):
    """Token pruning inside the LLM (FastV, DyVTE): which columns enter decoder layer `layer`.

    Called at prefill at the input of every layer >= 1 with hidden [R, W, D], whose columns are
    `ctx.layout.at_layer(layer - 1)`. Returns keep bool [R, W] (None = keep all). The last
    column (the last prompt token) must be kept. The core drops the rest from the hidden states
    and from the KV cache of layers >= `layer`. Kept columns keep their original position ids,
    unless the hook has a true attribute `renumber`: then layers >= `layer` number their prompt
    columns 0, 1, ... and generated tokens continue from there (see ImageLayout.renumber_from).
    """

    def select(
        self, layer: int, hidden: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor | None: ...


@dataclass
class VisionLayerCall:
    """One vision-encoder layer as a vision hook sees it (prefill only)."""

    layer: int
    num_layers: int
    read_layer: int  # the layer whose output the LLM reads (vision_feature_layer)
    keeps_cls: bool  # the LLM also reads the CLS token (select strategy "full")
    module: torch.nn.Module  # the encoder layer: read its weights, never change it
    hidden_in: torch.Tensor  # [N, n, C] the layer's input (N images)
    hidden_out: torch.Tensor  # [N, n, C] its output
    valid: torch.Tensor  # bool [N, n]: real tokens (False = padding after per-image cuts)
    ctx: ForwardContext
    padded: bool = False  # some image holds fewer tokens than n (valid has False entries)
    # The layer attention's own q, k, v projections, each [N, n, C] (before the head split),
    # when the encoder layer has `self_attn.{q,k,v}_proj`; None otherwise.
    projections: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def heads(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer attention's q (times its scale), k and v per head, fp32 [N, H, n, d] each,
        from its own projections: what scoring the layer's attention needs (no second GEMM)."""
        if self.projections is None:
            raise ValueError("this vision encoder's attention has no q/k/v projections to read")
        attn = self.module.self_attn
        n_images, n, _ = self.projections[0].shape
        q, k, v = (p.reshape(n_images, n, attn.num_heads, attn.head_dim).transpose(1, 2).float()
                   for p in self.projections)  # fmt: skip
        return q * attn.scale, k, v


@dataclass(frozen=True)
class GridRestore:
    """How an anyres vision stage's survivors reach the LLM (see `lvlm_fix.anyres`)."""

    keep_newlines: bool  # keep the packed image_newline tokens (False: drop them all)
    renumber: bool  # the LLM numbers the kept columns compactly (else original positions)


class VisionHook(Protocol):
    """Token pruning inside the vision tower (FlowCut), or a look at it. One per plan.

    `budget` tokens per image (per crop for anyres) survive the tower; None: the hook only
    looks (at each layer's input, output and attention projections) and never cuts. With
    `grid` None the LLM receives exactly those (the prompt's placeholders are cut to match).
    With a `GridRestore` (LLaVA-NeXT) the prompt keeps every placeholder: the survivors go
    back into their crops' full grids before the projector, transformers packs them, and LLM
    layer 0 keeps only the placeholders of survivors. `after_layer` returns keep bool [N, n]
    over the layer's output tokens, or None; token 0 (CLS) must be kept. Every image must hold
    exactly the budget when
    `read_layer` runs.
    """

    budget: int | None
    grid: GridRestore | None

    def after_layer(self, call: VisionLayerCall) -> torch.Tensor | None: ...


_PROJECTIONS = ("q", "k", "v")


def _wanted(layer: int, hidden: torch.Tensor, ctx: ForwardContext):
    """(keep bool [R, W] or None, renumber) for the columns entering `layer`: at layer 0 the
    anyres vision stage's survivors, at later layers the prune hooks' choices."""
    if layer == 0:
        keep = ctx.scratch.pop("vision.keep_columns", None)
        keep = None if keep is None else keep.to(hidden.device, non_blocking=True)
        return keep, keep is not None and ctx.plan.vision_stages[0].grid.renumber
    keep, renumber = None, False
    for hook in ctx.plan.prune_hooks:
        wanted = hook.select(layer, hidden, ctx)
        if wanted is not None:
            keep = wanted if keep is None else keep & wanted
            renumber = renumber or getattr(hook, "renumber", False)
    return keep, renumber


def _prune(layer: int, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
    """Ask the prune hooks about the columns entering `layer`; compact hidden if any drop."""
    keep, renumber = _wanted(layer, hidden, ctx)
    if keep is None:
        return None
    if keep.shape != hidden.shape[:2] or keep.dtype != torch.bool:
        raise ValueError(f"a prune hook must return bool {tuple(hidden.shape[:2])}")
    rows, width = keep.shape
    cols = ctx.layout.columns_at(layer - 1) if layer > 0 else None
    if cols is None:
        cols = torch.arange(width, device=keep.device).expand(rows, -1)
    real = cols >= ctx.layout.key_start[:, None]
    kept = keep & real
    lengths = kept.sum(-1)
    # The only host-device sync of a cut: the sanity check, "did anything go", the new width.
    last_lost, dropped, new_width = torch.stack(
        [(real[:, -1] & ~keep[:, -1]).any(), (lengths < real.sum(-1)).any(), lengths.max()]
    ).tolist()
    if last_lost:
        raise ValueError("a prune hook dropped the last prompt token")
    if not dropped:
        return None  # nothing dropped: stay on the stock path
    order, slot = pack_kept(kept, left=True, width=new_width)
    new_cols = torch.where(slot, cols.gather(1, order), -1)
    ctx.layout = ctx.layout.with_columns(layer, new_cols, ctx.num_layers, renumber)
    return gather_columns(hidden, order)


def _pruned_kwargs(
    layer: int, hidden: torch.Tensor, kwargs: dict, ctx: ForwardContext, rotary
) -> dict:
    """Positions and mask of a layer whose cache holds only some prompt columns.

    Every layer after one cut holds the same columns, so they share one mask and one gathered
    rotary table: built at the first layer of the cut, reused (by identity) by the rest.
    """
    cols = ctx.layout.columns_at(layer)
    q_len = hidden.shape[1]
    cache = layer_cache(kwargs)
    past = cache.get_seq_length(layer) if cache is not None and ctx.phase == "decode" else 0
    like = kwargs.get("attention_mask")
    like = like if torch.is_tensor(like) else None
    rotary_in = kwargs.get("position_embeddings") if ctx.phase == "prefill" else None
    renumber = ctx.layout.renumbered(layer)
    # Tensors compare by identity: a forward hands every layer the same mask and rotary.
    tensors = (cols, like, None if rotary_in is None else rotary_in[0], kwargs.get("position_ids"))
    key = ("prune.kwargs", hidden.device)  # a split model's layers on each device share theirs
    shared = ctx.scratch.get(key)  # (tensors, sizes, replaced kwargs)
    if (
        shared is None
        or shared[1] != (q_len, past, renumber)
        or any(a is not b for a, b in zip(shared[0], tensors, strict=True))
    ):
        out = _pruned_inputs(cols, q_len, past, like, kwargs, ctx, renumber)
        if renumber and ctx.phase == "decode":
            out.update(_shifted_positions(cols, hidden, kwargs, ctx, rotary))
        shared = (tensors, (q_len, past, renumber), out)
        ctx.scratch[key] = shared
    return {**kwargs, **shared[2]}


def _pruned_inputs(
    cols: torch.Tensor, q_len: int, past: int, like, kwargs: dict, ctx: ForwardContext,
    renumber: bool,
) -> dict:  # fmt: skip
    """The replaced layer kwargs of one cut: mask, and at prefill the gathered positions."""
    out = {}
    if ctx.phase == "prefill":  # the loop hands every layer the full prompt's positions
        index = cols.clamp(min=0)
        if renumber:
            # Row r's full table holds position p at column key_start[r] + p, so the j-th kept
            # column (fillers first) takes position j - fillers from there.
            fillers = (cols < 0).sum(-1, keepdim=True)
            steps = torch.arange(cols.shape[1], device=cols.device)[None]
            index = (ctx.layout.key_start[:, None] + steps - fillers).clamp(min=0)
        cos, sin = (t.to(cols.device, non_blocking=True) for t in kwargs["position_embeddings"])
        out["position_embeddings"] = (gather_columns(cos, index), gather_columns(sin, index))
        if kwargs.get("position_ids") is not None:
            positions = kwargs["position_ids"].to(cols.device, non_blocking=True)
            out["position_ids"] = gather_columns(positions, index)
    out["attention_mask"] = layer_mask(
        cols, ctx.layout.key_start, q_len, past + q_len, like, ctx.attention_mask
    )
    return out


def _shifted_positions(
    cols: torch.Tensor, hidden: torch.Tensor, kwargs: dict, ctx: ForwardContext, rotary
) -> dict:
    """Decode positions of a renumbered layer: the loop's positions minus the prompt columns
    this layer dropped, with the rotary table recomputed for them."""
    if rotary is None:
        raise ValueError("this model has no rotary embedding module to renumber positions with")
    prompt = ctx.layout.image_mask.shape[1]
    dropped = (prompt - ctx.layout.key_start) - (cols >= 0).sum(-1)  # long [R]
    positions = kwargs["position_ids"].to(cols.device, non_blocking=True) - dropped[:, None]
    return {"position_ids": positions, "position_embeddings": rotary(hidden, positions)}


def _layer_input(layer: int, rotary, module: torch.nn.Module, args: tuple, kwargs: dict):
    ctx = _CURRENT.get()
    if ctx is None:
        return None
    hidden = args[0] if args else kwargs["hidden_states"]
    # A split model: the hooks work where `hidden` is (the previous layer's device; accelerate
    # moves what this returns to this layer's device after the pre-hooks).
    ctx = ctx.on(hidden.device)
    changed = False
    if ctx.phase == "prefill" and (ctx.plan.prune_hooks or ctx.plan.vision_stages):
        compacted = _prune(layer, hidden, ctx)
        if compacted is not None:
            hidden, changed = compacted, True
    if ctx.layout.columns_at(layer) is not None:
        kwargs, changed = _pruned_kwargs(layer, hidden, kwargs, ctx, rotary), True
    for hook in ctx.plan.layer_input_hooks:
        hook(layer, hidden, ctx)
    if not changed:
        return None
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _vision_input(layer: int, module: torch.nn.Module, args: tuple, kwargs: dict):
    """Later encoder layers of a cut batch: mask the padding of images that kept fewer."""
    ctx = _CURRENT.get()
    mask = None if ctx is None else ctx.scratch.get("vision.mask")  # built at the cut
    if mask is None:
        return None
    if len(args) > 1:
        return (args[0], mask, *args[2:]), kwargs
    return args, {**kwargs, "attention_mask": mask}


def _vision_projection(name: str, module: torch.nn.Module, args: tuple, out: torch.Tensor):
    """Keep the encoder attention's q/k/v projection [N, n, C] for this layer's vision stage,
    so that scoring reuses them instead of computing them again."""
    ctx = _CURRENT.get()
    if ctx is not None and ctx.plan.vision_stages:
        ctx.scratch[f"vision.{name}"] = out


def _vision_output(layer: int, where: tuple[int, int, bool], module, args, kwargs, out):
    ctx = _CURRENT.get()
    if ctx is None or not ctx.plan.vision_stages:
        return None
    num_layers, read_layer, keeps_cls = where
    hidden_in = args[0] if args else kwargs["hidden_states"]
    hidden = out[0] if isinstance(out, tuple) else out
    scratch = ctx.scratch
    valid = scratch.get("vision.valid")
    if valid is None:
        n_images, n = hidden.shape[:2]
        valid = torch.ones(n_images, n, dtype=torch.bool, device=hidden.device)
        scratch["vision.valid"], scratch["vision.mask"] = valid, None
        scratch["vision.tokens"] = n
        scratch["vision.patch_ids"] = torch.arange(n, device=hidden.device).expand(n_images, -1)
    if layer == read_layer and scratch["vision.mask"] is not None:
        raise ValueError("a vision stage must cut every image to its budget before the read layer")
    (stage,) = ctx.plan.vision_stages
    projections = tuple(scratch.pop(f"vision.{name}", None) for name in _PROJECTIONS)
    call = VisionLayerCall(
        layer, num_layers, read_layer, keeps_cls, module, hidden_in, hidden, valid, ctx,
        padded=scratch["vision.mask"] is not None,
        projections=None if any(p is None for p in projections) else projections,
    )  # fmt: skip
    keep = stage.after_layer(call)
    if keep is None:
        return None
    if stage.budget is None:
        raise ValueError("a vision hook without a budget looks and never cuts")
    kept = keep & valid
    lengths = kept.sum(-1)
    # The only host-device sync of a cut: "did anything go", the CLS check, the new widths.
    checks = [(lengths < valid.sum(-1)).any(), (~keep[:, 0]).any(), lengths.max(), lengths.min()]
    dropped, cls_lost, width, shortest = torch.stack(checks).tolist()
    if not dropped:
        return None
    if cls_lost:
        raise ValueError("a vision stage dropped the CLS token")
    order, slot = pack_kept(kept, left=False, width=width)
    scratch["vision.valid"] = slot
    scratch["vision.patch_ids"] = scratch["vision.patch_ids"].gather(1, order)
    hidden = gather_columns(hidden, order)
    # The key-padding mask of the later layers [N, 1, 1, n'] (None: every image is full).
    padding = torch.zeros(slot.shape, dtype=hidden.dtype, device=hidden.device)
    padding = padding.masked_fill(~slot, torch.finfo(hidden.dtype).min)[:, None, None, :]
    scratch["vision.mask"] = padding if shortest < width else None
    return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


def _projector_input(packer: torch.nn.Module, where: tuple[int, int, bool], module, args):
    """anyres: put each crop's survivors back into its full grid before the projector, and
    record which prompt columns LLM layer 0 keeps (see `lvlm_fix.anyres`)."""
    ctx = _CURRENT.get()
    if ctx is None or ctx.phase != "prefill" or not ctx.plan.vision_stages:
        return None
    grid = ctx.plan.vision_stages[0].grid
    if grid is None:
        return None
    if ctx.image_sizes is None:
        raise ValueError("an anyres vision stage needs the image sizes in the forward context")
    features = args[0]  # [N, W, C]: the read layer's survivors of each crop, as selected
    drop = 0 if where[2] else 1  # the "default" strategy drops CLS (token 0) before this
    full = ctx.scratch["vision.tokens"] - drop
    ids = ctx.scratch["vision.patch_ids"][:, drop:] - drop  # [N, W]: grid position of each
    alive = torch.zeros(ids.shape[0], full, dtype=torch.bool, device=ids.device)
    alive.scatter_(1, ids, True)
    strategy = "full" if where[2] else "default"
    packed = anyres.packed_ids(packer, ctx.image_sizes, full, strategy)
    ctx.scratch["vision.keep_columns"] = anyres.keep_columns(
        packed, alive, ctx.layout.image_mask, grid.keep_newlines
    )
    if features.shape[1] == full:
        return None  # nothing was cut: the features are the full grids already
    return (anyres.restore_grid(features, ids, full), *args[1:])


def _has_hook_points(layer: torch.nn.Module) -> bool:
    hooks = layer._forward_pre_hooks.values()
    return any(getattr(hook, "func", None) is _layer_input for hook in hooks)


def _vision_where(model: torch.nn.Module, num_layers: int) -> tuple[int, int, bool]:
    """(num_layers, the layer the LLM reads, whether it reads CLS) from the model's config."""
    feature_layer = getattr(model.config, "vision_feature_layer", -1)
    if not isinstance(feature_layer, int):
        return num_layers, -1, False  # several read layers: vision stages refuse (read = -1)
    read = num_layers + feature_layer if feature_layer < 0 else feature_layer - 1
    strategy = getattr(model.config, "vision_feature_select_strategy", "default")
    return num_layers, read, strategy == "full"


def install_hook_points(model: torch.nn.Module, family: Family) -> None:
    """Attach the layer-input (and pruning) hook points to every decoder layer of this model,
    the vision hook points to every vision-encoder layer, and (anyres) the projector's.

    The hooks hold no state: they dispatch to the plan of the current forward, if any.
    """
    layers = resolve(model, family.decoder_layers)
    if _has_hook_points(layers[0]):
        return  # wrapped before: a second set would run every hook twice
    try:
        rotary = resolve(model, family.rotary)
    except AttributeError:
        rotary = None  # renumbering cuts then refuse at decode
    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(partial(_layer_input, index, rotary), with_kwargs=True)
    encoder = resolve(model, family.vision_layers)
    where = _vision_where(model, len(encoder))
    for index, layer in enumerate(encoder):
        layer.register_forward_pre_hook(partial(_vision_input, index), with_kwargs=True)
        # prepend: transformers' hidden-state recorder must see the cut output
        layer.register_forward_hook(
            partial(_vision_output, index, where), with_kwargs=True, prepend=True
        )
        attn = getattr(layer, "self_attn", None)
        for name in _PROJECTIONS if attn is not None else ():
            projection = getattr(attn, f"{name}_proj", None)
            if projection is not None:
                projection.register_forward_hook(partial(_vision_projection, name))
    if family.packer is not None:
        packer = resolve(model, family.packer)
        projector = resolve(model, family.projector)
        projector.register_forward_pre_hook(partial(_projector_input, packer, where))
