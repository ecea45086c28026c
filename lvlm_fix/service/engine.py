"""The engine seam between the HTTP layer and a model: in-process (`LocalEngine`) or Ray.

A `Job` is one validated request: its samples (one per choice, seeds set), interventions, params
and the plan's config id. Engines run jobs off the event loop so /health stays responsive. A
stream whose consumer goes away (the client disconnected) stops decoding at the next step.
`run_grouped` is the batching rule shared by every engine: jobs whose plans agree (same config
id, same params but the seed) become one `LVLM.generate` call.

Engines time each job on their own clock (`Timing`: queue, prefill, decode, step gaps), so the
numbers hold when the engine runs in another process or on another node, and keep the waiting
and running gauges of their process.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from lvlm_fix.decoding import Sample
from lvlm_fix.lvlm import LVLM, Generation
from lvlm_fix.model import ModelInfo
from lvlm_fix.params import GenerationParams
from lvlm_fix.service.metrics import Gauges


@dataclass(frozen=True)
class Job:
    samples: tuple[Sample, ...]  # one per choice, each with its own seed
    interventions: tuple[dict[str, Any], ...]
    params: GenerationParams
    config_id: str  # from LVLM.plan: jobs batch together only when these agree
    model: str = ""  # the model id (preset) asked for: the metrics' model_name
    arrived: float = 0.0  # time.monotonic() when the engine received it (its own clock)

    def batch_key(self) -> tuple[str, GenerationParams]:
        # Seeds live on the samples, so the params' seed never splits a batch.
        return self.config_id, self.params.model_copy(update={"seed": None})


@dataclass(frozen=True)
class Timing:
    """One job's time in the engine, as vLLM reports a request's."""

    queued_s: float  # arrival at the engine to the model starting on it
    prefill_s: float  # model start to the first token
    decode_s: float  # first token to the last
    step_gaps: tuple[float, ...] = ()  # between consecutive tokens (inter-token latency)


@dataclass
class Clock:
    """Marks of one model run: arrival, start, and each token (decode step or streamed piece)."""

    arrived: float
    started: float = 0.0
    tokens: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.started = time.monotonic()

    def token(self) -> None:
        self.tokens.append(time.monotonic())

    def timing(self, arrived: float | None = None) -> Timing:
        """`arrived`: another job's arrival, for a job that shared this run."""
        first = self.tokens[0] if self.tokens else self.started
        last = self.tokens[-1] if self.tokens else self.started
        gaps = tuple(b - a for a, b in zip(self.tokens, self.tokens[1:], strict=False))
        queued = self.started - (self.arrived if arrived is None else arrived)
        return Timing(max(queued, 0.0), first - self.started, last - first, gaps)


@dataclass(frozen=True)
class EngineResult:
    generations: list[Generation]
    batch_size: int  # requests that shared this job's LVLM.generate call
    timing: Timing | None = None


class Engine(Protocol):
    info: ModelInfo

    async def generate(self, job: Job) -> EngineResult: ...

    def stream(self, job: Job) -> AsyncIterator[str | Generation | Timing]: ...

    async def ready(self) -> bool:
        """True while a model can take requests (the readiness probe)."""
        ...


def arrive(job: Job, gauges: Gauges) -> Job:
    """Stamp a job's arrival at the engine; it waits until `run_grouped` starts it."""
    gauges.add("waiting", job.model, 1)
    return replace(job, arrived=time.monotonic())


@contextmanager
def running(gauges: Gauges, models: Sequence[str]) -> Iterator[None]:
    """Jobs (by model id) move from waiting to running for the length of their model run."""
    for model in models:
        gauges.add("waiting", model, -1)
        gauges.add("running", model, 1)
    try:
        yield
    finally:
        for model in models:
            gauges.add("running", model, -1)


def run_grouped(lvlm: LVLM, jobs: list[Job], gauges: Gauges) -> list[EngineResult | Exception]:
    """Run jobs as few `generate` calls as their plans allow; one result (or error) per job."""
    groups: dict[tuple, list[int]] = {}
    for index, job in enumerate(jobs):
        groups.setdefault(job.batch_key(), []).append(index)
    results: list[EngineResult | Exception] = [RuntimeError("job not run")] * len(jobs)
    for members in groups.values():
        first = jobs[members[0]]
        samples = [sample for i in members for sample in jobs[i].samples]
        clock = Clock(first.arrived)
        clock.start()
        try:
            with running(gauges, [jobs[i].model for i in members]):
                outputs = lvlm.generate(
                    samples, first.interventions, first.params, on_step=clock.token
                )
        except Exception as error:  # one bad group must not fail the others
            for i in members:
                results[i] = error
            continue
        start = 0
        for i in members:
            count = len(jobs[i].samples)
            timing = clock.timing(jobs[i].arrived)
            results[i] = EngineResult(outputs[start : start + count], len(members), timing)
            start += count
    return results


async def stream_job(
    lvlm: LVLM, job: Job, gauges: Gauges, executor: Executor | None = None
) -> AsyncIterator[str | Generation | Timing]:
    """Text pieces of a one-sample job, its final `Generation` (finish reason, usage), then
    its `Timing` (tokens timed as the pieces come: a piece may hold several tokens).

    Decodes on `executor`'s thread (default: a thread of its own). Closing or cancelling this
    generator (the client left) ends the decoding at its next step.
    """
    [sample] = job.samples
    job = arrive(job, gauges)
    clock = Clock(job.arrived)
    cancel = threading.Event()

    def timed() -> Iterator[str | Generation]:
        clock.start()
        with running(gauges, [job.model]):
            for item in lvlm.stream(sample, job.interventions, job.params, cancel=cancel):
                if isinstance(item, str):
                    clock.token()
                yield item

    try:
        async for item in iterate_in_thread(timed(), cancel, executor):
            yield item
        yield clock.timing()
    finally:
        if not clock.started:  # never reached the model (the client left while it waited)
            gauges.add("waiting", job.model, -1)


async def iterate_in_thread(
    items: Iterator, cancel: threading.Event, executor: Executor | None = None
) -> AsyncIterator:
    """Drive a blocking iterator on a worker thread, yielding its items on the event loop.

    `cancel` must make `items` end at its next step: it is set when this generator is closed or
    cancelled, so an abandoned iterator does not run on beside the next request.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    def pump() -> None:
        try:
            for item in items:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            loop.call_soon_threadsafe(queue.put_nowait, done)
        except Exception as error:
            loop.call_soon_threadsafe(queue.put_nowait, error)

    if executor is None:
        threading.Thread(target=pump, daemon=True).start()
    else:
        executor.submit(pump)
    try:
        while (item := await queue.get()) is not done:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        cancel.set()


class LocalEngine:
    """An in-process LVLM. Jobs run one at a time on a worker thread (no dynamic batching)."""

    def __init__(self, lvlm: LVLM, gauges: Gauges):
        self.lvlm, self.gauges = lvlm, gauges
        self.info = lvlm.info
        # One job at a time (batching is the Ray deployment's job). A single worker thread, not a
        # lock on the event loop, so the next job starts only once the previous one has really
        # finished, also one whose client left (it stops at its next decode step).
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="lvlm-engine")

    async def generate(self, job: Job) -> EngineResult:
        loop = asyncio.get_running_loop()
        job = arrive(job, self.gauges)
        [result] = await loop.run_in_executor(
            self._worker, run_grouped, self.lvlm, [job], self.gauges
        )
        if isinstance(result, Exception):
            raise result
        return result

    async def stream(self, job: Job) -> AsyncIterator[str | Generation | Timing]:
        async for item in stream_job(self.lvlm, job, self.gauges, self._worker):
            yield item

    async def ready(self) -> bool:
        return True  # the model was loaded before the app was built
