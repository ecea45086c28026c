"""The decode loop: build rows, prefill, then step until the search is done.

Rows of the batch are laid out sample-major, then beam, then view: row = (b * G + g) * V + v.
Views (RITUAL's transformed image, VCD's noised image, the text-only row of PAI-CFG) are extra rows
with their own KV cache rows; their logits are combined per step with the plan's weights. A
Runner owns the model forward, the cache and the per-row state; it is the handle a search gets
when it must run forwards itself (OPERA).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from PIL import Image
from transformers import DynamicCache

from lvlm_fix.compat import cache_kwargs
from lvlm_fix.devices import DeviceCopies
from lvlm_fix.hooks import ForwardContext, Phase, forward_context
from lvlm_fix.methods.base import RowState
from lvlm_fix.model import (
    ImageLayout,
    PromptBatch,
    Turn,
    drop_image_tokens,
    encode_rows,
    render_chat,
    render_prompt,
    shrink_image_runs,
)
from lvlm_fix.plan import Plan
from lvlm_fix.search import Limits, SearchResult


@dataclass(frozen=True)
class Sample:
    """One prompt: the user's text and its images (zero or more).

    `chat`: a whole conversation (system, user and assistant turns) rendered through the chat
    template instead of `text`; its image slots take `images` in order.
    """

    text: str
    images: tuple[Image.Image, ...] = ()
    seed: int | None = None
    chat: tuple[Turn, ...] = ()

    def prompt(self, processor, with_images: bool = True) -> str:
        """The rendered prompt, with this sample's image slots or (text-only views) none."""
        if self.chat:
            return render_chat(processor, self.chat, with_images)
        return render_prompt(processor, self.text, len(self.images) if with_images else 0)


class Runner:
    """Model forward + KV cache + per-row state for one request (rows as described above).

    The engine decodes most requests in its shared batch (slots.py) and uses a Runner for
    their prefill; a request in a lane of its own (beams, OPERA, pruning) decodes here too.
    """

    def __init__(self, model, batch: PromptBatch, plan: Plan, state: RowState, num_layers: int):
        self.model, self.plan, self.state = model, plan, state
        self.batch = batch
        self.layout = batch.layout
        self.num_layers = num_layers
        self.cache = DynamicCache(config=model.config.get_text_config())
        self.attention_mask = batch.attention_mask
        self.positions = batch.position_ids[:, -1]  # long [R]: position of the last column
        self.paths: set[str] = set()  # the attention paths its forwards ran (attention.py)
        self.holes = False  # a forward was given hole columns (see `forward`)
        self.copies = DeviceCopies()  # a split model's: layout and mask on its other devices

    def _context(self, phase: Phase, layout: ImageLayout | None = None) -> ForwardContext:
        layout = self.layout if layout is None else layout
        return ForwardContext(self.plan, self.state, layout, phase, self.num_layers,
                              paths=self.paths, copies=self.copies)  # fmt: skip

    def prefill(self) -> torch.Tensor:
        """Run the prompt rows; returns next-token logits [R, V] in fp32."""
        if self.plan.recompute:  # no cache to fill: later steps re-run whole rows (_rerun)
            rows = self.batch.input_ids.shape[0]
            self.state["rerun.rows"] = torch.arange(rows, device=self.batch.input_ids.device)
            self.state["rerun.tokens"] = self.batch.input_ids[:, :0]
        cache = None if self.plan.recompute else self.cache
        logits, self.layout = self._whole_rows(self.batch, cache)
        return logits

    def _whole_rows(self, b: PromptBatch, cache) -> tuple[torch.Tensor, ImageLayout]:
        """A prefill forward of rows `b` (filling `cache` unless None): the last position's
        logits [R, V] (fp32) and the layout, where prune hooks record per-layer kept columns."""
        extra = image_kwargs(self.model, b)
        ctx = self._context("prefill", b.layout)
        ctx.image_sizes = b.image_sizes  # an anyres vision stage maps the packed crops with it
        with forward_context(ctx), torch.inference_mode():
            out = self.model(
                input_ids=b.input_ids,
                attention_mask=b.attention_mask,
                position_ids=b.position_ids,
                pixel_values=b.pixel_values,
                **cache_kwargs(cache),
                use_cache=cache is not None,
                logits_to_keep=1,
                **extra,
            )
        return out.logits[:, -1].float(), ctx.layout

    def _rerun(self, tokens: torch.Tensor) -> torch.Tensor:
        """plan.recompute: append tokens [R, n], then run each row's whole sequence (its prompt
        row and every token fed so far) as one prefill without a cache. Logits [R, 1, V]."""
        fed = torch.cat([self.state["rerun.tokens"], tokens], 1)
        self.state["rerun.tokens"] = fed  # RowState entries follow the rows (beams, views)
        prompt = self.batch.index_rows(self.state["rerun.rows"])
        n = fed.shape[1]
        image = torch.nn.functional.pad(prompt.layout.image_mask, (0, n), value=False)
        rows = replace(
            prompt,
            input_ids=torch.cat([prompt.input_ids, fed], 1),
            attention_mask=torch.nn.functional.pad(prompt.attention_mask, (0, n), value=1),
            layout=ImageLayout(image_mask=image, key_start=prompt.layout.key_start),
        )
        return self._whole_rows(rows, None)[0][:, None]

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Append tokens [R, n] to every row's cache; returns logits [R, n, V] (fp32).

        mask [R, n] (default all ones) marks columns that are real; 0 columns are holes that no
        query ever sees and that take no position (OPERA replays rows of unequal length).
        A plan that recomputes (`Plan.recompute`) keeps no cache: see `_rerun`.
        """
        if self.plan.recompute:
            return self._rerun(tokens)
        if mask is None:
            mask = self.attention_mask.new_ones(tokens.shape)
        else:  # one host sync, on replays only
            self.holes = self.holes or not bool(mask.all())
        self.attention_mask = torch.cat([self.attention_mask, mask.to(self.attention_mask)], 1)
        positions = self.positions[:, None] + mask.long().cumsum(1)
        self.positions = positions[:, -1]
        ctx = self._context("decode")
        ctx.attention_mask = self.attention_mask  # pruned layers read generated columns here
        ctx.holes = self.holes
        with forward_context(ctx), torch.inference_mode():
            out = self.model(
                input_ids=tokens,
                attention_mask=self.attention_mask,
                position_ids=positions,
                **cache_kwargs(self.cache),
                use_cache=True,
            )
        return out.logits.float()

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep/duplicate/reorder rows (long [R']): cache, mask, positions, layout and state."""
        self.cache.reorder_cache(rows)
        self.attention_mask = self.attention_mask[rows]
        self.positions = self.positions[rows]
        self.layout = self.layout.index_rows(rows)
        self.state.index_rows(rows)

    def crop(self, length: int) -> None:
        """Forget every cache column from `length` on (OPERA's rollback)."""
        removed = self.attention_mask[:, length:].sum(-1)  # real columns only: holes take none
        # transformers 5: negative = remove. Every layer loses the same trailing (generated)
        # columns, pruned layers included: they hold fewer prompt columns, not fewer generated.
        self.cache.crop(length - self.attention_mask.shape[1])
        self.attention_mask = self.attention_mask[:, :length]
        self.positions = self.positions - removed


def image_kwargs(model, batch: PromptBatch) -> dict:
    """The family-specific image arguments of a prefill forward (NeXT / OneVision)."""
    extra = {"image_sizes": batch.image_sizes} if batch.image_sizes is not None else {}
    if batch.pixel_values is not None and model.config.model_type == "llava_onevision":
        counts = torch.bincount(batch.image_rows, minlength=batch.input_ids.shape[0])
        extra["batch_num_images"] = counts[counts > 0]
    return extra


def build_rows(processor, image_token_id: int, plan: Plan, samples: list[Sample], device):
    """All prefill rows: each sample's original view, then its extra views (prefill-only too)."""
    prompts: list[str] = []  # the rows to encode, with their images
    images: list[list[Image.Image]] = []
    # Each prefill row's encoded row: a text-only row made by dropping image tokens (see
    # View.text_only) is its sample's original row, stripped below (one image preprocessing).
    source: list[int] = []
    pixel_fns: list[tuple[int, object, torch.Generator]] = []
    stripped: list[int] = []
    notes: list[dict[str, list[str]]] = []
    for sample in samples:
        generator = torch.Generator().manual_seed(view_seed(sample.seed))
        original = len(prompts)
        source.append(original)
        prompts.append(sample.prompt(processor))
        images.append(list(sample.images))
        notes.append({})
        for view in plan.views:
            if view.drop_image and view.text_only == "drop_image_tokens":
                stripped.append(len(source))
                source.append(original)
                continue
            kept = [] if view.drop_image else list(sample.images)
            if view.image_fn is not None:
                applied = [view.image_fn(image, generator) for image in kept]
                kept = [image for image, _ in applied]
                if applied:
                    notes[-1][view.name] = [note for _, note in applied]
            if view.pixel_fn is not None and kept:
                pixel_fns.append((len(source), view.pixel_fn, generator))
            source.append(len(prompts))
            prompts.append(sample.prompt(processor, with_images=bool(kept)))
            images.append(kept)
    batch = encode_rows(processor, image_token_id, prompts, images, device)
    if stripped:
        batch = batch.index_rows(torch.tensor(source, device=device))
    image_tokens = tuple(batch.layout.n_image[:: len(plan.views) + 1].tolist())
    pad_id = processor.tokenizer.pad_token_id or 0
    if stripped:
        rows = torch.zeros(len(source), dtype=torch.bool, device=device)
        rows[stripped] = True
        batch = drop_image_tokens(batch, rows, pad_id)
    for stage in plan.vision_stages:  # a pruning vision tower emits `budget` features per image
        # (anyres keeps every placeholder: LLM layer 0 drops them; budget None only looks)
        if stage.grid is None and stage.budget is not None:
            batch = shrink_image_runs(batch, stage.budget, pad_id)
    if pixel_fns:
        pixels = batch.pixel_values.clone()
        for row, fn, generator in pixel_fns:
            where = (batch.image_rows == row).nonzero().flatten()
            pixels[where] = fn(pixels[where], generator).to(pixels.dtype)
        batch = replace(batch, pixel_values=pixels)
    return replace(batch, view_notes=tuple(notes), image_tokens=image_tokens)


def view_seed(seed: int | None) -> int:
    """Views draw their randomness from the sample's seed, apart from token sampling."""
    return 0 if seed is None else (seed * 1_000_003 + 17) % (2**63)


def combine_views(
    logits: torch.Tensor, plan: Plan, step: int, groups: int, held: tuple[int, ...] = ()
) -> torch.Tensor:
    """Per-view logits [R, V] -> combined scores [B, G, V] (the plausibility cut on view 0).

    held: tokens the search will mask (`Limits.held`). The cut is taken relative to the best
    token it may pick: one held token dominating would otherwise leave nothing plausible.
    """
    n_views = plan.n_views
    per_view = logits.view(-1, groups, n_views, logits.shape[-1])  # [B, G, views, V]
    original = per_view[:, :, 0]
    if not plan.combines_views:
        return original
    weights = torch.tensor(plan.view_weights(step), device=logits.device)
    scores = torch.einsum("v,bgvk->bgk", weights, per_view)
    if plan.plausibility_beta is not None:
        pickable = original
        if held:
            ids = torch.tensor(held, device=logits.device)
            pickable = original.index_fill(-1, ids, float("-inf"))
        cutoff = pickable.max(-1, keepdim=True).values + torch.log(
            torch.tensor(plan.plausibility_beta)
        )
        scores = scores.masked_fill(original < cutoff, float("-inf"))
    return scores


def _after_prefill_rows(plan: Plan, n_samples: int, width: int, device) -> torch.Tensor:
    """Drop prefill-only views, then repeat each sample's kept rows once per beam."""
    views = len(plan.views) + 1
    kept = [0] + [i + 1 for i, v in enumerate(plan.views) if not v.prefill_only]
    rows = [b * views + v for b in range(n_samples) for _ in range(width) for v in kept]
    return torch.tensor(rows, device=device)


@dataclass(frozen=True)
class DecodeEvent:
    """After each step: the fed tokens [B, G]. Once at the end: the search's result."""

    tokens: torch.Tensor | None
    result: SearchResult | None = None
    prompt_tokens: tuple[int, ...] = ()  # per sample, original view, padding excluded
    view_notes: tuple[dict[str, list[str]], ...] = ()  # per sample, see PromptBatch
    image_tokens_pruned: tuple[int, ...] = ()  # per sample, see Prefilled


@dataclass
class Prefilled:
    """A request after its prefill: the Runner holds the decode rows (prefill-only views
    dropped, rows repeated per beam) and `logits` [R, V] (fp32) are their next-token logits."""

    runner: Runner
    logits: torch.Tensor
    prompt_tokens: tuple[int, ...]  # per sample, original view, padding excluded
    view_notes: tuple[dict[str, list[str]], ...]  # per sample, see PromptBatch
    # per sample: image tokens that pruning removed (a vision stage, or LLM layers: counted at
    # the last layer, the one that keeps fewest)
    image_tokens_pruned: tuple[int, ...] = ()


def prefill(model, info, plan: Plan, batch: PromptBatch, n_samples: int) -> Prefilled:
    """Run the prefill rows `batch` (from `build_rows`), then keep the rows that decode."""
    rows_per_sample = len(plan.views) + 1
    prompt_tokens = tuple(batch.attention_mask[::rows_per_sample].sum(-1).tolist())
    state = RowState.start(plan.views, n_samples, batch.input_ids.device)
    runner = Runner(model, batch, plan, state, info.num_layers)
    logits = runner.prefill()
    last = runner.layout.at_layer(info.num_layers - 1).image_mask[::rows_per_sample]
    kept = last.sum(-1).tolist()
    pruned = tuple(full - k for full, k in zip(batch.image_tokens, kept, strict=True))
    rows = _after_prefill_rows(plan, n_samples, plan.search.width, batch.input_ids.device)
    runner.select_rows(rows)
    return Prefilled(runner, logits[rows], prompt_tokens, batch.view_notes, pruned)


def decode_steps(prefilled: Prefilled, plan: Plan, limits: Limits) -> Iterator[DecodeEvent]:
    """One event per step of a prefilled request, then its result (the search drives it)."""
    runner, logits, search = prefilled.runner, prefilled.logits, plan.search
    n_samples = logits.shape[0] // (search.width * plan.n_views)
    state = search.start(n_samples, limits, logits.device)
    step_index = 0
    while True:
        # step_index: tokens generated so far (OPERA rolls back, but has no views to cut)
        scores = combine_views(logits, plan, step_index, search.width, limits.held(step_index))
        step = search.step(scores, state, runner)
        step_index += 1
        if step.parents is not None:
            runner.select_rows(_beam_rows(step.parents, plan.n_views))
        yield DecodeEvent(step.tokens)
        if step.done:
            break
        if step.next_logits is not None:
            logits = step.next_logits
        else:
            tokens = step.tokens.repeat_interleave(plan.n_views, dim=1).reshape(-1, 1)
            logits = runner.forward(tokens)[:, -1]
    result = search.result(state)
    yield DecodeEvent(
        None, result, prefilled.prompt_tokens, prefilled.view_notes, prefilled.image_tokens_pruned
    )


def decode(
    model, processor, info, plan: Plan, samples: list[Sample], limits: Limits
) -> Iterator[DecodeEvent]:
    """Run one request on its own, outside the engine: prefill, then one event per step, then
    the final result (the reference the engine's tests compare with)."""
    batch = build_rows(processor, info.image_token_id, plan, samples, model.device)
    yield from decode_steps(prefill(model, info, plan, batch, len(samples)), plan, limits)


def _beam_rows(parents: torch.Tensor, n_views: int) -> torch.Tensor:
    """parents [B, G] (beam index within its sample) -> cache rows to gather [B*G*V]."""
    B, G = parents.shape
    base = torch.arange(B, device=parents.device)[:, None] * G + parents  # [B, G] old beam row
    views = torch.arange(n_views, device=parents.device)
    return (base[:, :, None] * n_views + views).reshape(-1)
