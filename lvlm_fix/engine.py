"""The engine: one per loaded model, continuously batching requests whose interventions differ.

Requests are submitted from any thread and return at once; one scheduler thread owns the model.
Each iteration it
  1. admits waiting requests in arrival order, within a prompt-token budget: builds their rows,
     runs each one's prefill (its own forward: its views and prefill hooks are its own), and
     places its decode rows in the shared batch or gives it a lane of its own;
  2. takes one decode step of the shared batch (`slots.SlotBatch`): every running row of every
     request in one forward, each row's attention edits read from per-slot tables;
  3. takes one step of each request in its own lane;
  4. chooses each sample's next token (its views combined, greedy or sampled with the
     sample's own generator), and retires finished or cancelled requests, freeing their slots.

Two lanes, because some strategies reorder, crop or re-run rows:
  - shared: greedy or sampling (one row per sample and view), decode edits fixed after prefill
    (VAR, VHR, PAI and the view methods RITUAL, VCD, M3ID, PAI-CFG), every layer holding every
    prompt column. Nearly all traffic.
  - own: beam search and OPERA (rows are reordered and cropped every step), LLM-side pruning
    (FastV, DyVTE, FlowCut on anyres: per-layer KV lengths), FastV's per-step re-run, and
    hooks whose edits change per step. Each such request runs `decoding.decode_steps` over
    its own cache, one step per iteration, interleaved with the shared batch, and admitted
    whenever it arrives.

A request's tokens do not depend on its batch-mates: its prefill is its own forward, the shared
step computes rows independently, and each sample samples from its own generator.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import get_layer_types_and_kwargs

from lvlm_fix.decoding import (
    DecodeEvent,
    Prefilled,
    Sample,
    build_rows,
    combine_views,
    decode_steps,
    prefill,
)
from lvlm_fix.generation import Generation, generation, sampling_generator, stop_hit
from lvlm_fix.model import concat_rows, layer_devices
from lvlm_fix.params import GenerationParams
from lvlm_fix.plan import Plan
from lvlm_fix.search import Limits, SingleSearch, _logprobs, _per_sample, warp
from lvlm_fix.slots import SlotBatch, decode_edits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """How much an engine holds at once. None = sized at start (see `Engine`)."""

    slots: int | None = None  # decode rows of the shared batch (a sample takes one per view)
    max_len: int | None = None  # cache columns per row: prompt + new tokens must fit
    prefill_tokens: int = 4096  # prompt tokens prefilled per iteration (at least one request)
    own_lane: int = 8  # requests decoding in lanes of their own at once
    graphs: bool | None = None  # CUDA graphs of the shared step (None = on a GPU)
    buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)  # captured batch sizes
    # Every shared step at full width with the edit tables, so a row's arithmetic never depends
    # on what else runs: bit-identical tokens alone or in company on a GPU too (bf16 matrix
    # kernels differ between batch sizes), at the cost of full-width steps at low load.
    batch_invariant: bool = False
    memory_share: float = 0.4  # of the free GPU memory at start, for the slots (slots None)
    # The shared step as a compact decoder with fused projections (fused_step.py), where the
    # language model is a Llama, Mistral or Qwen2 (else, or False: transformers' forward).
    fused_step: bool = True
    # torch.compile mode of the fused step where CUDA graphs capture it ("default" compiles in
    # about a minute at 7B; "max-autotune-no-cudagraphs" tunes its matmuls too; None: uncompiled).
    compile_mode: str | None = "default"


class Cancelled(Exception):
    """The request was cancelled before it finished."""


class EngineFailure(RuntimeError):
    """The engine failed, not the request (e.g. the shared step ran out of GPU memory): every
    request in that step gets it, chained to the cause."""


@dataclass(frozen=True)
class Timing:
    """One request's time in the engine, as vLLM reports a request's."""

    queued_s: float  # arrival at the engine to the start of its prefill
    prefill_s: float  # prefill start to the first token
    decode_s: float  # first token to the last
    step_gaps: tuple[float, ...] = ()  # between consecutive tokens (inter-token latency)


@dataclass
class Clock:
    """Marks of one request: arrival, start, and each token (decode step or streamed piece)."""

    arrived: float
    started: float = 0.0
    tokens: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.started = time.monotonic()

    def token(self) -> None:
        self.tokens.append(time.monotonic())

    def timing(self) -> Timing:
        first = self.tokens[0] if self.tokens else self.started
        last = self.tokens[-1] if self.tokens else self.started
        gaps = tuple(b - a for a, b in zip(self.tokens, self.tokens[1:], strict=False))
        return Timing(
            max(self.started - self.arrived, 0.0), first - self.started, last - first, gaps
        )


@dataclass(frozen=True)
class Event:
    """What a request's listener gets: after each step, the token each sample chose (None for
    a sample that finished before); once at the end, its generations or its error."""

    tokens: tuple[int | None, ...] = ()
    generations: list[Generation] | None = None
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.generations is not None or self.error is not None


Listener = Callable[[Event], None]


class Request:
    """A submitted request. `listener(event)` runs on the engine's thread (keep it short);
    `result()` waits for the generations; `cancel()` (any thread) ends it at the next step."""

    def __init__(self, samples: list[Sample], plan: Plan, params: GenerationParams,
                 listener: Listener | None):  # fmt: skip
        self.samples, self.plan, self.params = samples, plan, params
        self.clock = Clock(time.monotonic())
        self._listener = listener
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._outcome: Event | None = None

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> list[Generation]:
        if not self._done.wait(timeout):
            raise TimeoutError("the request is still running")
        if self._outcome.error is not None:
            raise self._outcome.error
        return self._outcome.generations

    @property
    def timing(self) -> Timing:
        return self.clock.timing()

    def _emit(self, event: Event) -> None:
        if event.done:
            self._outcome = event
        elif event.tokens:
            self.clock.token()
        if self._listener is not None:
            try:
                self._listener(event)
            except Exception:  # a consumer's bug must not stop the engine
                log.exception("a request listener failed")
        if event.done:
            self._done.set()


@dataclass
class _Seq:
    """One sample of a request in the shared batch: its slots (view 0 first) and tokens."""

    sample: int
    slots: list[int]
    position: int  # position of the next fed token
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    reason: str | None = None  # "stop" / "length" once finished


@dataclass
class _Job:
    request: Request
    batch: object | None = None  # the PromptBatch, built when it is first considered
    prefilled: Prefilled | None = None
    limits: Limits | None = None  # how its samples end, in either lane (set at prefill)
    seqs: list[_Seq] = field(default_factory=list)  # shared lane
    steps: object | None = None  # own lane: the decode_steps iterator
    step: int = 0  # tokens chosen so far
    attention_paths: frozenset[str] = frozenset()  # shared lane: its prefill's, and "fused"

    @property
    def plan(self) -> Plan:
        return self.request.plan

    @property
    def params(self) -> GenerationParams:
        return self.request.params


class Engine:
    """One model's scheduler (see the module docstring). `lvlm` is a loaded `LVLM`.

    Sizes (`EngineConfig`): max_len None = the model's context (at most 4096); slots None = as
    many as `memory_share` of the free GPU memory holds (at most 64), 8 on CPU.
    """

    def __init__(self, lvlm, config: EngineConfig | None = None):
        config = config or EngineConfig()
        self.lvlm, self.config = lvlm, config
        self.model, self.processor, self.info = lvlm.model, lvlm.processor, lvlm.info
        self.device = self.model.device
        tokenizer = self.processor.tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        text = self.model.config.get_text_config(decoder=True)
        layer_types, _ = get_layer_types_and_kwargs(text)
        self.full_attention = all(kind == "full_attention" for kind in layer_types)
        max_len = config.max_len or min(getattr(text, "max_position_embeddings", 4096), 4096)
        slots = config.slots or self._default_slots(max_len)
        graphs = self.device.type == "cuda" if config.graphs is None else config.graphs
        started = time.monotonic()
        buckets = (slots,) if config.batch_invariant else config.buckets
        self.slots = SlotBatch(self.model, self.info, slots, max_len, graphs, buckets,
                               always_edited=config.batch_invariant, fused=config.fused_step,
                               compile_mode=config.compile_mode)  # fmt: skip
        self.warmup_s = time.monotonic() - started
        self._inbox: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._waiting: deque[_Job] = deque()
        self._shared: list[_Job] = []
        self._own: list[_Job] = []
        self._closed = False
        self.iterations = 0
        self.prefills = 0  # prefill forwards (requests of one plan arriving together share one)
        self._admitting: list[_Job] = []  # in prefill: left the queue, maybe not in a lane yet
        self._thread = threading.Thread(target=self._loop, name="lvlm-engine", daemon=True)
        self._thread.start()
        # A daemon thread still inside a torch op when the interpreter finalises can abort the
        # process (seen as SIGABRT at exit): stop the scheduler before that, if nobody did.
        atexit.register(_close_at_exit, weakref.ref(self))

    def _default_slots(self, max_len: int) -> int:
        if self.device.type != "cuda":
            return 8
        # Per device: its decoder layers' share of a slot (a split model spreads them).
        devices = layer_devices(self.model, self.info.family)
        per_layer = 2 * self.info.num_kv_heads * self.info.head_dim * max_len
        slots = 64
        for device in {d for d in devices if d.type == "cuda"}:
            per_slot = per_layer * devices.count(device) * self.model.dtype.itemsize
            free, _ = torch.cuda.mem_get_info(device)
            slots = min(slots, int(free * self.config.memory_share) // per_slot)
        return max(1, slots)

    # ----- the public side (any thread) -----

    def submit(self, samples: Sequence[Sample], plan: Plan, params: GenerationParams,
               listener: Listener | None = None) -> Request:  # fmt: skip
        """Queue a request (samples with their seeds set, a compiled plan); returns at once."""
        if self._closed:
            raise RuntimeError("the engine is closed")
        if not samples:
            raise ValueError("no samples to generate for")
        request = Request(list(samples), plan, params, listener)
        self._inbox.put(request)
        return request

    @property
    def running(self) -> int:
        """Requests admitted (prefilling or decoding) and not finished."""
        lanes = self._shared + self._own
        prefilling = sum(job not in lanes for job in self._admitting)
        return len(self._shared) + len(self._own) + prefilling

    @property
    def waiting(self) -> int:
        return len(self._waiting) + self._inbox.qsize()

    def close(self) -> None:
        """Stop the scheduler; requests not finished end with `Cancelled`."""
        self._closed = True
        self._inbox.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # ----- the scheduler thread -----

    def _loop(self) -> None:
        while True:
            idle = not (self._waiting or self._shared or self._own)
            if not self._collect(block=idle):
                break
            try:
                self._iterate()
            except Exception as error:  # a bug of ours: fail what is in flight, keep serving
                log.exception("engine iteration failed; failing the requests in flight")
                failure = EngineFailure("the engine failed")
                failure.__cause__ = error
                for job in [*self._shared, *self._own]:
                    self._end(job, Event(error=failure))
        for job in [*self._waiting, *self._shared, *self._own]:
            self._end(job, Event(error=Cancelled("the engine was closed")))

    def _iterate(self) -> None:
        self.iterations += 1  # liveness: a busy engine's count moves
        self._retire_cancelled()
        self._admit()
        if self._shared:
            self._step_shared()
        for job in list(self._own):
            self._step_own(job)

    def _collect(self, block: bool) -> bool:
        """Move submitted requests to the waiting queue; False once the engine is closing."""
        while True:
            try:
                request = self._inbox.get(block=block)
            except queue.Empty:
                return True
            if request is None:
                return False
            self._waiting.append(_Job(request))
            block = False

    def _retire_cancelled(self) -> None:
        for job in [j for j in (*self._waiting, *self._shared, *self._own) if j.request.cancelled]:
            self._end(job, Event(error=Cancelled("the request was cancelled")))

    def _end(self, job: _Job, event: Event) -> None:
        """Take a job out of the engine (freeing its slots) and tell its listener."""
        for lane in (self._waiting, self._shared, self._own):
            if job in lane:
                lane.remove(job)
        self.slots.release([s for seq in job.seqs for s in seq.slots])
        job.seqs = []
        if job.steps is not None:
            job.steps.close()
        job.request._emit(event)

    def _shared_lane(self, plan: Plan) -> bool:
        """Before prefill: whether the plan can decode in the shared batch."""
        return (
            isinstance(plan.search, SingleSearch)
            and plan.shared_decode
            and not plan.recompute
            and not plan.prune_hooks
            and self.full_attention
        )

    def _admit(self) -> None:
        """Admit waiting requests in arrival order while the prompt-token budget, the free
        slots and the own lane allow. Consecutive requests of one plan bound for the shared
        batch prefill together, in one forward (unless the engine is batch-invariant)."""
        budget, admitted = self.config.prefill_tokens, 0
        while self._waiting:
            group: list[_Job] = []
            rows_free = self.slots.free_slots()
            shared = False
            for job in list(self._waiting):
                try:
                    fits, shared_job = self._fits(job, budget if admitted or group else None,
                                                  rows_free)  # fmt: skip
                except Exception as error:  # this request's fault: it alone fails
                    self._end(job, Event(error=error))
                    continue
                if not fits or (group and not (shared_job and job.plan == group[0].plan)):
                    break
                self._waiting.remove(job)
                group.append(job)
                shared = shared_job
                budget -= job.batch.input_ids.numel()
                rows_free -= len(job.request.samples) * job.plan.n_views if shared else 0
                if not shared or self.config.batch_invariant:
                    break  # own lane, or one prefill per request: rows' bits never depend on others
            if not group:
                return
            admitted += len(group)
            self._admitting = group
            try:
                self._start(group, shared)
            finally:
                self._admitting = []

    def _fits(self, job: _Job, budget: int | None, rows_free: int) -> tuple[bool, bool]:
        """(whether the job can be admitted now, whether it decodes in the shared batch).
        budget None: the first of this iteration, admitted whatever its size."""
        if job.batch is None:
            job.batch = build_rows(self.processor, self.info.image_token_id, job.plan,
                                   job.request.samples, self.device)  # fmt: skip
        rows, prompt = job.batch.input_ids.shape
        if budget is not None and rows * prompt > budget:
            return False, False
        decode_rows = len(job.request.samples) * job.plan.n_views
        if self._shared_lane(job.plan) and decode_rows <= self.slots.slots:
            self.slots.check_fits(prompt, job.params.max_new_tokens)
            return decode_rows <= rows_free, True  # first come, first served: later ones wait
        return len(self._own) < self.config.own_lane, False

    def _start(self, jobs: list[_Job], shared: bool) -> None:
        """Prefill jobs of one plan together, then place them in the shared batch, or each in
        a lane of its own. If the joint prefill fails, each runs alone: one bad request must
        not fail the others."""
        for job in jobs:
            job.request.clock.start()
        if len(jobs) > 1:
            try:
                prefilled = self._prefill(jobs)
                edits = decode_edits(prefilled, jobs[0].plan, self.info)
            except Exception:
                log.debug("joint prefill failed; prefilling each request alone", exc_info=True)
                edits = None
            if edits is not None:
                return self._place(jobs, prefilled, edits)
        for job in jobs:
            try:
                self._start_alone(job, shared)
            except Exception as error:
                log.debug("request failed at prefill", exc_info=True)
                self._end(job, Event(error=error))

    def _prefill(self, jobs: list[_Job]) -> Prefilled:
        batch = concat_rows([job.batch for job in jobs], self.pad_id)
        n = sum(len(job.request.samples) for job in jobs)
        self.prefills += 1
        return prefill(self.model, self.info, jobs[0].plan, batch, n)

    def _start_alone(self, job: _Job, shared: bool) -> None:
        prefilled = self._prefill([job])
        edits = None
        if shared and all(c is None for c in prefilled.runner.layout.columns):
            edits = decode_edits(prefilled, job.plan, self.info)
        if edits is None:  # a lane of its own
            job.batch, job.prefilled = None, prefilled
            job.limits = self._limits(job.request)
            job.steps = decode_steps(prefilled, job.plan, job.limits)
            self._own.append(job)
            return
        self._place([job], prefilled, edits)

    def _place(self, jobs: list[_Job], prefilled: Prefilled, edits: list[dict | None]) -> None:
        """Put prefilled rows (the jobs' samples in order, each sample's views together) in
        the shared batch and choose each sample's first token."""
        slots = self.slots.place(prefilled, edits)
        paths = frozenset(prefilled.runner.paths | {"fused"})  # the shared step's kernel
        positions = (prefilled.runner.positions + 1).tolist()
        views = jobs[0].plan.n_views
        first, pending = 0, []
        for job in jobs:
            n = len(job.request.samples)
            rows = slice(first * views, (first + n) * views)
            samples = slice(first, first + n)
            job.prefilled = Prefilled(None, prefilled.logits[rows],
                                      prefilled.prompt_tokens[samples],
                                      prefilled.view_notes[samples],
                                      prefilled.image_tokens_pruned[samples])  # fmt: skip
            job.limits = self._limits(job.request)
            job.attention_paths = paths
            for b in range(n):
                row = (first + b) * views
                generator = job.limits.generators[b]
                job.seqs.append(_Seq(b, slots[row : row + views], positions[row], generator))
            job.batch = None
            self._shared.append(job)
            pending += [(job, seq, job.prefilled.logits[b * views : (b + 1) * views])
                        for b, seq in enumerate(job.seqs)]  # fmt: skip
            first += n
        self._choose(pending)

    def _limits(self, request: Request) -> Limits:
        params, tokenizer = request.params, self.processor.tokenizer
        hit = None
        if params.stop:

            def hit(_: int, ids: list[int]) -> bool:
                return stop_hit(tokenizer, params.stop, ids, params.min_tokens)

        return Limits(
            eos_id=self.eos_id,
            pad_id=self.pad_id,
            max_new_tokens=params.max_new_tokens,
            generators=[
                sampling_generator(s.seed, self.device) if params.do_sample else None
                for s in request.samples
            ],
            stop_hit=hit,
            stop_token_ids=params.stop_token_ids,
            ignore_eos=params.ignore_eos,
            min_tokens=params.min_tokens,
        )

    def _step_shared(self) -> None:
        live = [(job, seq) for job in self._shared for seq in job.seqs if seq.reason is None]
        rows = self.slots.bucket()
        tokens, positions = [self.pad_id] * rows, [0] * rows
        for _, seq in live:
            for slot in seq.slots:
                tokens[slot], positions[slot] = seq.tokens[-1], seq.position
        try:
            logits = self.slots.step(tokens, positions)
        except Exception as error:  # the shared forward failed: every job in it fails
            log.exception("the shared decode step failed")
            failure = EngineFailure("the shared decode step failed")
            failure.__cause__ = error
            for job in list(self._shared):
                self._end(job, Event(error=failure))
            return
        for _, seq in live:
            seq.position += 1
        self._choose([(job, seq, logits[seq.slots]) for job, seq in live])

    def _choose(self, pending: list[tuple[_Job, _Seq, torch.Tensor]]) -> None:
        """Next tokens of shared-lane samples from their views' logits [views, V]: combined,
        then greedy or sampled. One host sync for all of them."""
        if not pending:
            return
        held = [job.limits.held(len(seq.tokens)) for job, seq, _ in pending]
        scores = torch.cat([
            combine_views(logits, job.plan, job.step, 1, ids)[:, 0] if job.plan.combines_views
            else logits[:1]
            for (job, _, logits), ids in zip(pending, held, strict=True)
        ])  # fmt: skip
        choice = scores  # what the tokens are chosen from; log-probs come from `scores`
        if any(held):  # min_tokens: rarely, so a row-by-row copy costs nothing that matters
            rows = zip(scores, pending, strict=True)
            choice = torch.cat([job.limits.hold(row[None], len(seq.tokens))
                                for row, (job, seq, _) in rows])  # fmt: skip
        chosen = choice.argmax(-1)
        for i, (job, seq, _) in enumerate(pending):
            params = job.params
            if params.do_sample:
                probs = warp(choice[i : i + 1], params).softmax(-1)
                chosen[i] = torch.multinomial(probs[0], 1, generator=seq.generator)[0]
            if params.logprobs is not None:
                seq.logprobs.append(
                    _logprobs(scores[i : i + 1], chosen[i : i + 1], params.logprobs)
                )
        ids = chosen.tolist()
        stepped: dict[int, tuple[_Job, dict[int, int]]] = {}  # job -> (job, sample -> token)
        for (job, seq, _), token in zip(pending, ids, strict=True):
            stepped.setdefault(id(job), (job, {}))[1][seq.sample] = token
            self._record(job, seq, token)
        for job, tokens in stepped.values():
            job.step += 1
            job.request._emit(Event(tokens=tuple(tokens.get(s.sample) for s in job.seqs)))
            if all(seq.reason is not None for seq in job.seqs):
                self._end(job, Event(generations=self._generations(job)))

    def _record(self, job: _Job, seq: _Seq, token: int) -> None:
        """Append a sample's token; finish it at an ending token (EOS, a stop id; left out), a
        stop string or its length limit."""
        limits = job.limits
        if token in limits.ending:
            seq.reason = "stop"
        else:
            seq.tokens.append(token)
            if limits.stop_hit is not None and limits.stop_hit(seq.sample, seq.tokens):
                seq.reason = "stop"
            elif len(seq.tokens) >= limits.max_new_tokens:
                seq.reason = "length"
        if seq.reason is not None:
            self.slots.release(seq.slots)
            seq.slots = []

    def _generations(self, job: _Job) -> list[Generation]:
        prefilled, params, plan = job.prefilled, job.params, job.plan
        notes = prefilled.view_notes or ({},) * len(job.seqs)
        outputs = []
        for seq in job.seqs:
            logprobs = None
            if params.logprobs is not None:
                [logprobs] = _per_sample(seq.logprobs, [len(seq.tokens)])
            outputs.append(generation(
                self.processor.tokenizer, seq.tokens, seq.reason, params,
                prefilled.prompt_tokens[seq.sample], plan.config_id, notes[seq.sample], logprobs,
                prefilled.image_tokens_pruned[seq.sample], job.attention_paths,
            ))  # fmt: skip
        return outputs

    def _step_own(self, job: _Job) -> None:
        try:
            event: DecodeEvent = next(job.steps)
        except Exception as error:
            log.debug("own-lane step failed", exc_info=True)
            self._end(job, Event(error=error))
            return
        if event.result is None:
            job.step += 1
            job.request._emit(Event(tokens=tuple(event.tokens[:, 0].tolist())))
            return
        result, params = event.result, job.params
        notes = event.view_notes or ({},) * len(result.tokens)
        logprobs = result.logprobs or (None,) * len(result.tokens)
        tokenizer, config_id = self.processor.tokenizer, job.plan.config_id
        paths = frozenset(job.prefilled.runner.paths)
        rows = zip(result.tokens, result.finish_reasons, event.prompt_tokens, notes, logprobs,
                   event.image_tokens_pruned, strict=True)  # fmt: skip
        outputs = [
            generation(
                tokenizer, ids, reason, params, prompt, config_id, views, steps, pruned, paths
            )
            for ids, reason, prompt, views, steps, pruned in rows
        ]
        self._end(job, Event(generations=outputs))


def _close_at_exit(engine: weakref.ref[Engine]) -> None:
    alive = engine()
    if alive is not None and not alive._closed:
        alive.close()


__all__ = ["Cancelled", "Engine", "EngineConfig", "EngineFailure", "Event", "Request", "Timing"]
