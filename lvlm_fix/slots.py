"""The engine's shared decode batch: rows of many requests, whatever their interventions, take
one decode step together in one forward.

Each decoding row holds a slot: one row of a KV cache of `slots` rows by `max_len` columns,
allocated once. Every row writes the same column each step (`column`), so a row's keys are one
run of columns [key_start, column): a request joins with its prompt's keys copied so that they
end at `column` (its left padding kept). When a new prompt does not fit before `column`, or its
generation would not fit after it, all rows shift together (`fit`). Attention reads each row
from its key_start to key_end (the edited-attention kernel with per-row starts), so a step costs
the columns rows hold, not the cache's width, and free slots cost one column.

Interventions are per-slot data. When a request joins, its attention hooks are asked once, per
layer, for their decode edits (fixed once prefill is done: `Contribution.shared_decode`), and the
answers are written into `EditTables` at the request's slots; rows of other requests hold
neutral values there (PAI gain 0, head scale 1, VAR rows off). A step hands each layer its
slice of the tables.

On a GPU each batch-size bucket's step is captured as a CUDA graph when the engine starts, once
with the edit tables and once without (a batch where no row has an edit runs plain attention);
a step replays the smallest bucket that covers the highest occupied slot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from lvlm_fix.attention import merge_edits
from lvlm_fix.compat import cache_kwargs
from lvlm_fix.decoding import Prefilled
from lvlm_fix.hooks import AttentionCall, ForwardContext, forward_context
from lvlm_fix.methods.base import RowState
from lvlm_fix.model import ImageLayout, ModelInfo
from lvlm_fix.params import GenerationParams
from lvlm_fix.plan import Plan, compile_plan

log = logging.getLogger(__name__)

# The attention edit fields a slot can hold. A request whose decode edits use another field
# (or ask the kernel for statistics) decodes on its own instead.
TABLE_FIELDS = frozenset(
    {"col_group", "image_gain", "gain_rows", "var_rows", "var_keep", "var_rho", "var_summ",
     "n_image", "head_scale"}
)  # fmt: skip


class SlotLayer(CacheLayerMixin):
    """One decoder layer's keys and values [slots, Hkv, max_len, D]; a step's forward of N rows
    writes column `column` of slots 0..N-1 and attends over those slots' whole rows."""

    is_compileable = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, column: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.column = keys, values, column
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        return None  # allocated up front

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        rows = key_states.shape[0]
        keys, values = self.keys[:rows], self.values[:rows]
        keys.index_copy_(2, self.column, key_states)
        values.index_copy_(2, self.column, value_states)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_seq_length(self) -> int:
        return 0  # positions are per row (the engine passes them); no caller may infer them

    def get_max_length(self) -> int:
        return self.keys.shape[2]


@dataclass
class EditTables:
    """Per-slot attention edits (see kernels.AttentionEdits), L layers, S slots, C columns."""

    col_group: torch.Tensor  # int8 [L, S, C], in cache columns (a joining prompt's, shifted)
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
        for name, value in (("col_group", 0), ("image_gain", 0.0), ("var_rows", False),
                            ("head_scale", 1.0)):  # fmt: skip
            getattr(self, name)[:, slots] = value
        self.var_keep[slots], self.n_image[slots] = 1.0, 0.0

    def write(self, layer: int, slots: torch.Tensor, offset: int, edits: dict[str, Any]) -> None:
        """One layer's merged decode edits of a request's rows (at `slots`, prompt column 0 at
        cache column `offset`)."""
        if "col_group" in edits:
            groups = edits["col_group"]
            self.col_group[layer, slots, offset : offset + groups.shape[1]] = groups
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


@dataclass(frozen=True)
class TableEdits:
    """AttentionHook of a shared step: every layer's edits are the tables' slice."""

    tables: EditTables
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

    Host-side bookkeeping per slot: occupied, key_start and the last column it may write.
    """

    def __init__(self, model, info: ModelInfo, slots: int, max_len: int, graphs: bool,
                 buckets: tuple[int, ...], always_edited: bool = False):  # fmt: skip
        self.model, self.info = model, info
        self.slots, self.max_len = slots, max_len
        device, dtype = model.device, model.dtype
        self.device = device
        self.column_t = torch.zeros(1, dtype=torch.long, device=device)  # the column a step writes
        shape = (slots, info.num_kv_heads, max_len, info.head_dim)
        self.cache = Cache(
            layers=[
                SlotLayer(torch.zeros(shape, dtype=dtype, device=device),
                          torch.zeros(shape, dtype=dtype, device=device), self.column_t)
                for _ in range(info.num_layers)
            ]
        )  # fmt: skip
        self.tables = EditTables.allocate(info.num_layers, slots, max_len, info.num_heads, device)
        # The step's inputs, written before each step (a graph reads them in place).
        self.tokens = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.key_start = torch.zeros(slots, dtype=torch.long, device=device)
        self.key_end = torch.ones(1, dtype=torch.long, device=device)
        self.mask = torch.ones(slots, 1, 1, max_len, dtype=torch.bool, device=device)  # unread
        self.column = 0  # host copy of column_t
        self.occupied = [False] * slots
        self.starts = [0] * slots  # host copy of key_start
        self.ends = [0] * slots  # the last column each occupied slot may write
        self.edited = [False] * slots  # the slot's request has decode edits
        self.shifts = 0  # how often rows moved to make room (a measure of a too-short cache)
        self.always_edited = always_edited  # every step with the tables (batch-invariant)
        self.buckets = tuple(sorted(b for b in buckets if b <= slots)) or (slots,)
        if self.buckets[-1] != slots:
            self.buckets += (slots,)
        base = compile_plan([], info, GenerationParams())
        self._plain_plan = replace(base, attention_hooks=())
        self._edited_plans = {n: replace(base, attention_hooks=(TableEdits(self.tables, n),))
                              for n in self.buckets}  # fmt: skip
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if graphs:
            self._capture_all()

    # ----- placing rows -----

    def free_slots(self) -> int:
        return self.occupied.count(False)

    def fit(self, prompt: int, new_tokens: int) -> bool:
        """Make room for a request of `prompt` columns and `new_tokens` steps (its prompt ends
        at `column`, its steps write column .. column + new_tokens - 2), shifting every row if
        needed. False: not now (running rows pin the window); True: place it."""
        need = new_tokens - 1  # the last token is chosen, never fed
        if prompt + need > self.max_len:
            raise ValueError(f"a row of {prompt} prompt and {new_tokens} new tokens does not fit "
                             f"the engine's {self.max_len} cache columns")  # fmt: skip
        live = [s for s in range(self.slots) if self.occupied[s]]
        if not live:
            self.column = prompt
            self.column_t.fill_(prompt)
            return True
        if self.column < prompt:  # too little room before the column: shift right
            delta = prompt - self.column
            if max(self.ends[s] for s in live) + delta >= self.max_len:
                return False
            self._shift(delta)
        if self.column + need > self.max_len:  # too little after it: shift left
            delta = -min(self.starts[s] for s in live)
            if self.column + delta < prompt or self.column + delta + need > self.max_len:
                return False
            self._shift(delta)
        return True

    def _shift(self, delta: int) -> None:
        """Move every row's columns by delta (the cache, col_group, starts, the column)."""
        if delta == 0:
            return
        self.shifts += 1
        width = self.max_len - abs(delta)
        src, dst = (0, delta) if delta > 0 else (-delta, 0)
        for layer in self.cache.layers:
            for held in (layer.keys, layer.values):
                held[:, :, dst : dst + width] = held[:, :, src : src + width].clone()
        groups = self.tables.col_group
        groups[:, :, dst : dst + width] = groups[:, :, src : src + width].clone()
        self.column += delta
        self.column_t.fill_(self.column)
        for s in range(self.slots):
            if self.occupied[s]:
                self.starts[s] += delta
                self.ends[s] += delta
        live = torch.tensor(self.occupied, device=self.device)
        self.key_start.add_(torch.where(live, delta, 0))

    def place(self, prefilled: Prefilled, edits: list[dict | None], new_tokens: int) -> list[int]:
        """Copy a prefilled request's decode rows into free slots (after `fit`); returns the
        slots in row order."""
        runner = prefilled.runner
        rows, prompt = runner.attention_mask.shape
        slots = [s for s in range(self.slots) if not self.occupied[s]][:rows]
        index = torch.tensor(slots, device=self.device)
        offset = self.column - prompt
        for held, slot_layer in zip(runner.cache.layers, self.cache.layers, strict=True):
            slot_layer.keys[index, :, offset : self.column] = held.keys
            slot_layer.values[index, :, offset : self.column] = held.values
        self.tables.clear(index)
        edited = any(e is not None for e in edits)
        for layer, layer_edits in enumerate(edits):
            if layer_edits is not None:
                self.tables.write(layer, index, offset, layer_edits)
        self.tables.n_image[index] = runner.layout.n_image.float()
        starts = (runner.layout.key_start + offset).tolist()
        self.key_start[index] = runner.layout.key_start + offset
        for slot, start in zip(slots, starts, strict=True):
            self.occupied[slot], self.edited[slot] = True, edited
            self.starts[slot], self.ends[slot] = start, self.column + new_tokens - 2
        return slots

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            self.occupied[slot], self.edited[slot] = False, False
        if slots:
            index = torch.tensor(slots, device=self.device)
            self.tables.clear(index)
            self.key_start[index] = 0  # a free row attends to column 0 (finite, unread)

    # ----- the step -----

    def bucket(self) -> int:
        highest = max(s for s in range(self.slots) if self.occupied[s]) + 1
        return next(b for b in self.buckets if b >= highest)

    def step(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One decode step of every slot up to the bucket: tokens and positions per slot (free
        slots anything). Returns logits [rows, V] (fp32) and advances the column."""
        rows = len(tokens)
        self.tokens[:rows, 0] = torch.tensor(tokens, device=self.device)
        self.positions[:rows, 0] = torch.tensor(positions, device=self.device)
        self.key_end.fill_(self.column + 1)
        edited = self.always_edited or any(self.edited[:rows])
        graph = self.graphs.get((rows, edited))
        with torch.inference_mode():
            if graph is not None:
                graph[0].replay()
                logits = graph[1].float()  # a copy: the next replay overwrites the buffer
            else:
                logits = self._forward(rows, edited).float()
        self.column += 1
        self.column_t.fill_(self.column)
        return logits

    def _context(self, rows: int, edited: bool) -> ForwardContext:
        plan = self._edited_plans[rows] if edited else self._plain_plan
        layout = ImageLayout(
            image_mask=torch.zeros(rows, 0, dtype=torch.bool, device=self.device),
            key_start=self.key_start[:rows],
        )
        ctx = ForwardContext(plan, RowState(), layout, "decode", self.info.num_layers)
        ctx.key_end = self.key_end
        return ctx

    def _forward(self, rows: int, edited: bool) -> torch.Tensor:
        with forward_context(self._context(rows, edited)):
            out = self.model(
                input_ids=self.tokens[:rows],
                attention_mask=self.mask[:rows],  # 4-D, passed through; attention reads key_start
                position_ids=self.positions[:rows],
                **cache_kwargs(self.cache),
                use_cache=True,
            )
        return out.logits[:, -1]

    def _capture_all(self) -> None:
        """Capture every bucket's step, with and without edit tables (largest first, so the
        smaller graphs reuse the largest's memory pool)."""
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
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
