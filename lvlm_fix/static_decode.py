"""One-token decode steps over a static KV cache, replayed from a CUDA graph.

Run eagerly, a batch-1 decode step of a 7B model spends about 20 ms of host time in the model's
Python against a few milliseconds of GPU work. Captured once per request as a CUDA graph, a
step costs one replay. A graph fixes every shape and address, so the steps run over a static
cache: the prompt's keys and values are copied into buffers sized for the whole generation,
each step writes its token, position and mask column into fixed input tensors, and edited
attention reads `key_end` (the columns filled so far) from the forward context instead of the
key tensor's length. The first step runs eagerly (it compiles kernels and lets hooks build
their per-request tensors); the graph is captured after it.

Everything the captured hooks read must stay where it is, so the static steps serve a run of
plain steps only: selecting rows or cropping (beams, OPERA) first hands the cache back as a
DynamicCache (`Runner` does that). On CPU the same static steps run without a graph, which is
how the tests check them.
"""

from __future__ import annotations

import logging

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import get_layer_types_and_kwargs

from lvlm_fix.compat import cache_kwargs
from lvlm_fix.hooks import ForwardContext, forward_context

log = logging.getLogger(__name__)

# By default a request captures a graph only when it may run this many steps: a capture costs
# about as much host time as a few eager steps (measured in BENCHMARKS.md), which short answers
# (POPE's "Yes"/"No") would never earn back.
MIN_GRAPH_STEPS = 8


class StaticDecode:
    """Decode steps of all R rows over a static cache of `S + steps` columns."""

    def __init__(
        self, model, cache: DynamicCache, attention_mask: torch.Tensor, steps: int,
        context: ForwardContext, capture: bool,
    ):  # fmt: skip
        rows, prompt = attention_mask.shape
        device = attention_mask.device
        self.model, self.capture = model, capture
        self.filled = prompt  # columns written so far
        self.length = prompt + steps
        self.cache = StaticCache(config=model.config.get_text_config(), max_cache_len=self.length)
        for layer, held in enumerate(cache.layers):  # allocates each layer, copies the prompt
            self.cache.update(held.keys, held.values, layer)
        # The step's inputs: written before each step, read by the graph in place.
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(rows, 1, 1, self.length, dtype=torch.bool, device=device)
        self.mask[:, 0, 0, :prompt] = attention_mask.bool()
        self.key_end = torch.full((1,), prompt, dtype=torch.long, device=device)
        self.context = context
        context.key_end = self.key_end
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the graph's output buffer

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, positions long [R, 1] -> logits [R, 1, V] (fp32)."""
        if self.filled >= self.length:
            raise RuntimeError(f"the static cache holds {self.length} columns; all are filled")
        column = self.filled
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.mask[..., column] = True
        self.key_end.fill_(column + 1)
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._forward()
            if self.capture:  # after one eager step: kernels compiled, hooks' tensors built
                self._capture()
        self.filled += 1
        return logits.to(torch.float32, copy=True)  # the next replay overwrites the buffer

    def _capture(self) -> None:
        """Record one step. Not torch.cuda.graph: its synchronize and empty_cache would cost
        more host time than the capture. thread_local: other requests' threads may use the GPU
        meanwhile (PyTorch's side streams never synchronize implicitly with them)."""
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(self.tokens.device)
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    logits = self._forward()
                finally:
                    graph.capture_end()
        except RuntimeError as error:  # e.g. a hook that syncs with the host: stay eager
            log.warning("decode step capture failed, running steps eagerly: %s", error)
            self.capture = False
            return
        torch.cuda.current_stream().wait_stream(stream)
        self.graph, self.logits = graph, logits

    def _forward(self) -> torch.Tensor:
        with forward_context(self.context):
            out = self.model(
                input_ids=self.tokens,
                attention_mask=self.mask,  # 4-D: transformers passes it to the layers as is
                position_ids=self.positions,
                **cache_kwargs(self.cache),
                use_cache=True,
            )
        return out.logits

    def dynamic_cache(self) -> DynamicCache:
        """The filled columns as a DynamicCache, for a runner that leaves static steps."""
        cache = DynamicCache(config=self.model.config.get_text_config())
        for layer, held in enumerate(self.cache.layers):
            keys, values = held.keys[:, :, : self.filled], held.values[:, :, : self.filled]
            cache.update(keys.clone(), values.clone(), layer)
        return cache


def fits_in_memory(cache: DynamicCache, steps: int) -> bool:
    """Whether a static cache for `steps` more columns takes at most half the free GPU memory
    (it is allocated up front, for the longest generation the request allows)."""
    layers = cache.layers
    if not layers or not layers[0].keys.is_cuda:
        return True
    needed = 0
    for layer in layers:
        for held in (layer.keys, layer.values):  # [R, Hkv, columns, D]
            per_column = held.numel() // held.shape[2] * held.element_size()
            needed += per_column * (held.shape[2] + steps)
    free, _ = torch.cuda.mem_get_info(layers[0].keys.device)
    return needed <= free // 2


def static_steps(
    static: bool | None, device: torch.device, model, plan, layout, max_new_tokens: int
) -> int:
    """How many decode steps of a request may run static (0 = none), after its prefill.

    static None: on a GPU, for requests of MIN_GRAPH_STEPS tokens or more; True: whenever
    there is a step to take (on CPU without a graph); False: never. And the request must
    allow it: graph-safe hooks, cached steps (no recompute), one row per sample and view (no
    beams), every layer holding every prompt column (no pruning) and full attention in every
    layer.
    """
    if static is None:
        wanted = device.type == "cuda" and max_new_tokens >= MIN_GRAPH_STEPS
    else:
        wanted = static and max_new_tokens > 1
    layer_types, _ = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    full = all(kind == "full_attention" for kind in layer_types)  # what StaticCache would build
    pruned = any(c is not None for c in layout.columns)
    steps = plan.graph_safe and plan.search.width == 1 and not plan.recompute
    allowed = steps and full and not pruned
    return max_new_tokens if wanted and allowed else 0
