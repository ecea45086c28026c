"""The engine's shared decode batch: rows of many requests, whatever their interventions, take
one decode step together in one forward.

Each decoding row holds a slot: one row of a KV cache of `slots` rows by `max_len` columns,
allocated once. A row's keys always start at column 0: a request joins with each row's prompt
keys copied there (its left padding dropped), and each step writes every row's token at that
row's own length. Attention reads row b's columns [0, key_end[b]) (the edited-attention kernel
with per-row ends), so a step costs the columns rows hold, not the cache's width, and a row's
arithmetic does not depend on where, when or beside whom it joined.

Interventions are per-slot data. When a request joins, its attention hooks are asked once, per
layer, for their decode edits (fixed once prefill is done: `Contribution.shared_decode`), and the
answers are written into `EditTables` at the request's slots; rows of other requests hold
neutral values there (PAI gain 0, head scale 1, VAR rows off). A step hands each layer its
slice of the tables.

The step runs the compact decoder of fused_step.py (fused projections; compiled on a GPU) where
the language model allows, transformers' forward with our attention function elsewhere. On a GPU
each batch-size bucket's step is captured as a CUDA graph when the engine starts, once with the
edit tables and once without (a batch where no row has an edit runs plain attention); a step
replays the smallest bucket that covers the highest occupied slot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from lvlm_fix.attention import merge_edits
from lvlm_fix.compat import cache_kwargs
from lvlm_fix.decoding import Prefilled
from lvlm_fix.devices import DeviceCopies
from lvlm_fix.fused_step import FusedDecoder, compile_room, unsupported
from lvlm_fix.hooks import AttentionCall, ForwardContext, forward_context
from lvlm_fix.kernels import AttentionEdits
from lvlm_fix.methods.base import RowState
from lvlm_fix.model import ImageLayout, ModelInfo, layer_devices
from lvlm_fix.params import GenerationParams
from lvlm_fix.plan import Plan, compile_plan

log = logging.getLogger(__name__)

# The attention edit fields a slot can hold: the fused kernel's edits, no statistics. A request
# whose decode edits ask for statistics or hold modifiers decodes in a lane of its own instead.
TABLE_FIELDS = frozenset(f.name for f in fields(AttentionEdits)) - {
    "want_group_mass",
    "want_last_row",
    "score_mods",
    "prob_mods",
}


class SlotLayer(CacheLayerMixin):
    """One decoder layer's keys and values, stored flat [slots * max_len, Hkv, D] (`stores`)
    and seen as [slots, Hkv, max_len, D] (`keys`, `values`). A step's forward of N rows writes
    slot s's token at flat row `cells[s]` = s * max_len + its column (one `index_copy_`), and
    attends over those slots' rows: every column in a CUDA graph (the kernel stops at each row's
    key_end), the first `width` in an eager step."""

    is_compileable = True

    def __init__(self, shape: tuple[int, int, int, int], dtype, device, cells: torch.Tensor):
        super().__init__()
        slots, columns, heads, dim = shape
        # Flat, not views of a 4-d tensor: the compiled fused step writes into them in place.
        self.stores = tuple(
            torch.zeros(slots * columns, heads, dim, dtype=dtype, device=device) for _ in "kv"
        )
        self.keys, self.values = (t.view(shape).transpose(1, 2) for t in self.stores)
        self.cells = cells
        self.width: int | None = None  # eager steps: the longest row's columns (None = all)
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        return None  # allocated up front

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[0]
        cells = self.cells[:n]
        self.stores[0].index_copy_(0, cells, key_states[:, :, 0])  # [n, Hkv, D]: one token a row
        self.stores[1].index_copy_(0, cells, value_states[:, :, 0])
        return self.keys[:n, :, : self.width], self.values[:n, :, : self.width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_seq_length(self) -> int:
        return 0  # positions are per row (the engine passes them); no caller may infer them

    def get_max_length(self) -> int:
        return self.keys.shape[2]


@dataclass
class EditTables:
    """Per-slot attention edits (see kernels.AttentionEdits), L layers, S slots, C columns."""

    col_group: torch.Tensor  # int8 [L, S, C], in cache columns (a row's prompt from column 0)
    image_gain: torch.Tensor  # float32 [L, S, H]: PAI's gain, 0 where a row's gain is off
    var_rows: torch.Tensor  # bool [L, S, 1]
    var_keep: torch.Tensor  # float32 [S]
    var_rho: torch.Tensor  # float32 [S]
    var_summ: torch.Tensor  # float32 [S]
    n_image: torch.Tensor  # float32 [S]
    head_scale: torch.Tensor  # float32 [L, S, H]
    gain_rows: torch.Tensor  # bool [S, 1], all True (the gain itself is 0 where off)

    @classmethod
    def allocate(cls, layers: int, slots: int, columns: int, heads: int, device) -> EditTables:
        def zeros(*shape, dtype=torch.float32):
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(
            col_group=zeros(layers, slots, columns, dtype=torch.int8),
            image_gain=zeros(layers, slots, heads),
            var_rows=zeros(layers, slots, 1, dtype=torch.bool),
            var_keep=torch.ones(slots, device=device),
            var_rho=zeros(slots),
            var_summ=zeros(slots),
            n_image=zeros(slots),
            head_scale=torch.ones(layers, slots, heads, device=device),
            gain_rows=torch.ones(slots, 1, dtype=torch.bool, device=device),
        )

    def clear(self, slots: torch.Tensor) -> None:
        """Neutral values at these slots."""
        slots = slots.to(self.col_group.device, non_blocking=True)
        for name, value in (("col_group", 0), ("image_gain", 0.0), ("var_rows", False),
                            ("head_scale", 1.0)):  # fmt: skip
            getattr(self, name)[:, slots] = value
        self.var_keep[slots], self.n_image[slots] = 1.0, 0.0

    def write(self, layer: int, slots: torch.Tensor, starts: list[int], edits: dict[str, Any]):
        """One layer's merged decode edits of a request's rows (at `slots`; row r's prompt
        columns from starts[r] on sit at cache columns 0, 1, ...), from any device."""
        device = self.col_group.device
        slots = slots.to(device, non_blocking=True)
        edits = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                 for k, v in edits.items()}  # fmt: skip
        if "col_group" in edits:
            groups = edits["col_group"]
            for row, (slot, start) in enumerate(zip(slots.tolist(), starts, strict=True)):
                self.col_group[layer, slot, : max(groups.shape[1] - start, 0)] = groups[row, start:]
        if "image_gain" in edits:
            on = edits["gain_rows"][:, -1:].float()  # [R, 1]: the decode step's one query row
            self.image_gain[layer, slots] = edits["image_gain"] * on
        if "var_rows" in edits:
            self.var_rows[layer, slots] = edits["var_rows"][:, -1:]
            for name in ("var_keep", "var_rho", "var_summ"):
                getattr(self, name)[slots] = torch.as_tensor(edits[name]).float().to(slots.device)
        if "head_scale" in edits:
            self.head_scale[layer, slots] = edits["head_scale"]

    def layer_edits(self, layer: int, rows: int) -> dict[str, Any]:
        """AttentionEdits fields of one layer for slots 0..rows-1 (views: a graph reads them)."""
        return {
            "col_group": self.col_group[layer, :rows],
            "image_gain": self.image_gain[layer, :rows],
            "gain_rows": self.gain_rows[:rows],
            "var_rows": self.var_rows[layer, :rows],
            "var_keep": self.var_keep[:rows],
            "var_rho": self.var_rho[:rows],
            "var_summ": self.var_summ[:rows],
            "n_image": self.n_image[:rows],
            "head_scale": self.head_scale[layer, :rows],
        }


class SlotTables:
    """The edit tables of every layer: one `EditTables` per device that holds decoder layers
    (one on an unsplit model), each layer reading its own device's."""

    def __init__(self, devices: list[torch.device], slots: int, columns: int, heads: int):
        layers = len(devices)
        self.parts = {d: EditTables.allocate(layers, slots, columns, heads, d)
                      for d in dict.fromkeys(devices)}  # fmt: skip
        self.of_layer = [self.parts[d] for d in devices]

    def clear(self, slots: torch.Tensor) -> None:
        for part in self.parts.values():
            part.clear(slots)

    def write(self, layer: int, slots: torch.Tensor, starts: list[int], edits: dict[str, Any]):
        self.of_layer[layer].write(layer, slots, starts, edits)

    def set_n_image(self, slots: torch.Tensor, n_image: torch.Tensor) -> None:
        for part in self.parts.values():
            device = part.n_image.device
            part.n_image[slots.to(device)] = n_image.to(device, torch.float32)

    def layer_edits(self, layer: int, rows: int) -> dict[str, Any]:
        return self.of_layer[layer].layer_edits(layer, rows)


@dataclass(frozen=True)
class TableEdits:
    """AttentionHook of a shared step: every layer's edits are the tables' slice."""

    tables: SlotTables
    rows: int

    def edits(self, call: AttentionCall) -> dict[str, Any]:
        return self.tables.layer_edits(call.layer, self.rows)

    def after(self, call: AttentionCall, out: torch.Tensor, stats: dict) -> None:
        return None


def decode_edits(prefilled: Prefilled, plan: Plan, info: ModelInfo) -> list[dict | None] | None:
    """Each layer's merged decode edits of a prefilled request (None: no edit in that layer),
    asked once of its hooks; None when some edit cannot live in the tables."""
    runner = prefilled.runner
    rows, prompt = runner.attention_mask.shape
    ctx = ForwardContext(plan, runner.state, runner.layout, "decode", info.num_layers)
    ctx.attention_mask = runner.attention_mask
    device = runner.attention_mask.device
    # The hooks read shapes from these, never values (their decode edits are fixed by prefill).
    query = torch.empty(rows, info.num_heads, 1, 1, device=device)
    key = torch.empty(rows, info.num_kv_heads, prompt + 1, 1, device=device)
    per_layer: list[dict | None] = []
    for layer in range(info.num_layers):
        call = AttentionCall(layer, query, key, key, 1.0, ctx)
        requests = [r for hook in plan.attention_hooks if (r := hook.edits(call))]
        merged = merge_edits(call, requests) if requests else None
        if merged is not None and not set(merged) <= TABLE_FIELDS:
            return None
        per_layer.append(merged)
    return per_layer


class SlotBatch:
    """The slot KV cache, the edit tables, the step's inputs and (GPU) its captured graphs.

    `fused`: step with the fused decoder where the language model allows, compiled in
    `compile_mode` where graphs capture it (None: uncompiled). Host-side bookkeeping per slot:
    occupied, its row's length (filled columns), edited.
    """

    def __init__(self, model, info: ModelInfo, slots: int, max_len: int, graphs: bool,
                 buckets: tuple[int, ...], always_edited: bool = False, fused: bool = True,
                 compile_mode: str | None = "default"):  # fmt: skip
        self.model, self.info = model, info
        self.slots, self.max_len = slots, max_len
        device, dtype = model.device, model.dtype
        self.device = device
        # A model split over GPUs (device_map): each layer's cache and tables on its device,
        # the step's cells and key_end copied there before each eager step (no graphs).
        devices = layer_devices(model, info.family)
        self.split = any(d != device for d in devices)
        if graphs and self.split:
            log.info("decoder layers on %s: shared steps run without CUDA graphs",
                     sorted({str(d) for d in devices}))  # fmt: skip
            graphs = False
        # The step's inputs (tokens, positions, columns where rows write), copied in once before
        # each step; a graph reads them in place and derives the rest itself.
        self.inputs = torch.zeros(3, slots, dtype=torch.long, device=device)
        self.tokens, self.positions = self.inputs[0, :, None], self.inputs[1, :, None]
        self.columns = self.inputs[2]
        self.key_end = torch.ones(slots, dtype=torch.long, device=device)  # columns + 1
        self.cells = torch.zeros(slots, dtype=torch.long, device=device)  # flat rows written
        self.row_base = torch.arange(slots, device=device) * max_len
        self.key_start = torch.zeros(slots, dtype=torch.long, device=device)  # always 0
        self.mask = torch.ones(slots, 1, 1, max_len, dtype=torch.bool, device=device)  # unread
        self._cells_on = {d: torch.zeros_like(self.cells, device=d)
                          for d in dict.fromkeys(devices) if d != device}  # fmt: skip
        self._key_end_on = {d: torch.ones_like(self.key_end, device=d) for d in self._cells_on}
        self.copies = DeviceCopies()  # the contexts' copies on the other devices
        self._layouts: dict[int, ImageLayout] = {}
        shape = (slots, max_len, info.num_kv_heads, info.head_dim)
        self.cache = Cache(
            layers=[SlotLayer(shape, dtype, d, self._cells_on.get(d, self.cells)) for d in devices]
        )
        self.tables = SlotTables(devices, slots, max_len, info.num_heads)
        self.occupied = [False] * slots
        self.lengths = [0] * slots  # filled columns of each slot's row
        self.edited = [False] * slots  # the slot's request has decode edits
        self.always_edited = always_edited  # every step with the tables (batch-invariant)
        self.buckets = tuple(sorted(b for b in buckets if b <= slots)) or (slots,)
        if self.buckets[-1] != slots:
            self.buckets += (slots,)
        base = compile_plan([], info, GenerationParams())
        self._plain_plan = replace(base, attention_hooks=())
        self._edited_plans = {n: replace(base, attention_hooks=(TableEdits(self.tables, n),))
                              for n in self.buckets}  # fmt: skip
        self.decoder: FusedDecoder | None = None
        why_not = unsupported(model, info) if fused else None
        if fused and why_not is None:
            self.decoder = FusedDecoder(model, info, max_len, compile_mode if graphs else None)
        elif why_not is not None:
            log.info("the shared step runs transformers' forward: %s", why_not)
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if graphs:
            self._capture_all()

    # ----- placing rows -----

    def free_slots(self) -> int:
        return self.occupied.count(False)

    def check_fits(self, prompt: int, new_tokens: int) -> None:
        """A row of `prompt` columns writes new_tokens - 1 more (the last token is never fed)."""
        if prompt + new_tokens - 1 > self.max_len:
            raise ValueError(f"a row of {prompt} prompt and {new_tokens} new tokens does not fit "
                             f"the engine's {self.max_len} cache columns")  # fmt: skip

    def place(self, prefilled: Prefilled, edits: list[dict | None]) -> list[int]:
        """Copy a prefilled request's decode rows into free slots; returns the slots in row
        order. Each row's prompt keys (left padding dropped) go to columns 0, 1, ..."""
        runner = prefilled.runner
        rows, prompt = runner.attention_mask.shape
        slots = [s for s in range(self.slots) if not self.occupied[s]][:rows]
        index = torch.tensor(slots, device=self.device)
        starts = runner.layout.key_start.tolist()
        for held, slot_layer in zip(runner.cache.layers, self.cache.layers, strict=True):
            for row, (slot, start) in enumerate(zip(slots, starts, strict=True)):
                slot_layer.keys[slot, :, : prompt - start] = held.keys[row, :, start:]
                slot_layer.values[slot, :, : prompt - start] = held.values[row, :, start:]
        self.tables.clear(index)
        edited = any(e is not None for e in edits)
        for layer, layer_edits in enumerate(edits):
            if layer_edits is not None:
                self.tables.write(layer, index, starts, layer_edits)
        self.tables.set_n_image(index, runner.layout.n_image)
        for slot, start in zip(slots, starts, strict=True):
            self.occupied[slot], self.edited[slot] = True, edited
            self.lengths[slot] = prompt - start
        return slots

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            self.occupied[slot], self.edited[slot], self.lengths[slot] = False, False, 0
        if slots:
            self.tables.clear(torch.tensor(slots, device=self.device))

    # ----- the step -----

    def bucket(self) -> int:
        highest = max(s for s in range(self.slots) if self.occupied[s]) + 1
        return next(b for b in self.buckets if b >= highest)

    def step(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One decode step of every slot up to the bucket: tokens and positions per slot (free
        slots anything). Returns logits [rows, V] (fp32); each occupied row grows by one."""
        rows = len(tokens)
        lengths = self.lengths[:rows]
        self.inputs[:, :rows] = torch.tensor([tokens, positions, lengths]).to(self.device)
        edited = self.always_edited or any(self.edited[:rows])
        graph = self.graphs.get((rows, edited))
        with torch.inference_mode():
            if graph is not None:
                graph[0].replay()
                logits = graph[1].float()  # a copy: the next replay overwrites the buffer
            else:  # read only up to the longest row
                logits = self._forward(rows, edited, width=max(lengths) + 1).float()
        for slot in range(rows):
            if self.occupied[slot]:
                self.lengths[slot] += 1
        return logits

    def _context(self, rows: int, edited: bool) -> ForwardContext:
        plan = self._edited_plans[rows] if edited else self._plain_plan
        layout = self._layouts.get(rows)
        if layout is None:
            layout = self._layouts[rows] = ImageLayout(
                image_mask=torch.zeros(rows, 0, dtype=torch.bool, device=self.device),
                key_start=self.key_start[:rows],
            )
        ctx = ForwardContext(plan, RowState(), layout, "decode", self.info.num_layers,
                             copies=self.copies)  # fmt: skip
        ctx.key_end = self.key_end[:rows]
        for device, key_end in self._key_end_on.items():  # copied there by _forward
            self.copies.put("key_end", ctx.key_end, device, key_end[:rows])
        return ctx

    def _forward(self, rows: int, edited: bool, width: int | None = None) -> torch.Tensor:
        """Logits [rows, V] of one step, reading each row's first `width` columns (None: all)."""
        torch.add(self.columns, 1, out=self.key_end)
        torch.add(self.row_base, self.columns, out=self.cells)
        for device, cells in self._cells_on.items():  # a split model's other devices
            cells.copy_(self.cells, non_blocking=True)
            self._key_end_on[device].copy_(self.key_end, non_blocking=True)
        if self.decoder is not None:
            tables = partial(self.tables.layer_edits, rows=rows) if edited else None
            return self.decoder.step(
                self.tokens[:rows], self.positions[:rows],
                [layer.stores for layer in self.cache.layers], self.cells[:rows],
                self.key_end[:rows], self.key_start[:rows], tables, width,
            )  # fmt: skip
        for layer in self.cache.layers:
            layer.width = width
        try:
            with forward_context(self._context(rows, edited)):
                out = self.model(
                    input_ids=self.tokens[:rows],
                    attention_mask=self.mask[:rows],  # 4-D, passed through; attention reads key_end
                    position_ids=self.positions[:rows],
                    **cache_kwargs(self.cache),
                    use_cache=True,
                )
        finally:
            for layer in self.cache.layers:
                layer.width = None
        return out.logits[:, -1]

    def _capture_all(self) -> None:
        """Capture every bucket's step, with and without edit tables (largest first, so the
        smaller graphs reuse the largest's memory pool)."""
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode(), compile_room():
            for rows in sorted(self.buckets, reverse=True):
                for edited in (True,) if self.always_edited else (False, True):
                    self._forward(rows, edited)  # compile kernels, settle allocations
                    self.graphs[(rows, edited)] = self._capture(rows, edited, pool)
        torch.cuda.synchronize()

    def _capture(self, rows: int, edited: bool, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            graph.capture_begin(pool=pool)
            try:
                logits = self._forward(rows, edited)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        return graph, logits
