"""The engine seam between the HTTP layer and a model: in-process (`LocalEngine`) or Ray.

A `Job` is one validated request: its samples (one per choice, seeds set), interventions, params
and the plan's config id. Engines run jobs off the event loop so /health stays responsive. A
stream whose consumer goes away (the client disconnected) stops decoding at the next step.
`run_grouped` is the batching rule shared by every engine: jobs whose plans agree (same config
id, same params but the seed) become one `LVLM.generate` call.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from lvlm_fix.decoding import Sample
from lvlm_fix.lvlm import LVLM, Generation
from lvlm_fix.model import ModelInfo
from lvlm_fix.params import GenerationParams


@dataclass(frozen=True)
class Job:
    samples: tuple[Sample, ...]  # one per choice, each with its own seed
    interventions: tuple[dict[str, Any], ...]
    params: GenerationParams
    config_id: str  # from LVLM.plan: jobs batch together only when these agree

    def batch_key(self) -> tuple[str, GenerationParams]:
        # Seeds live on the samples, so the params' seed never splits a batch.
        return self.config_id, self.params.model_copy(update={"seed": None})


@dataclass(frozen=True)
class EngineResult:
    generations: list[Generation]
    batch_size: int  # requests that shared this job's LVLM.generate call


class Engine(Protocol):
    info: ModelInfo

    async def generate(self, job: Job) -> EngineResult: ...

    def stream(self, job: Job) -> AsyncIterator[str | Generation]: ...

    async def ready(self) -> bool:
        """True while a model can take requests (the readiness probe)."""
        ...


def run_grouped(lvlm: LVLM, jobs: list[Job]) -> list[EngineResult | Exception]:
    """Run jobs as few `generate` calls as their plans allow; one result (or error) per job."""
    groups: dict[tuple, list[int]] = {}
    for index, job in enumerate(jobs):
        groups.setdefault(job.batch_key(), []).append(index)
    results: list[EngineResult | Exception] = [RuntimeError("job not run")] * len(jobs)
    for members in groups.values():
        first = jobs[members[0]]
        samples = [sample for i in members for sample in jobs[i].samples]
        try:
            outputs = lvlm.generate(samples, first.interventions, first.params)
        except Exception as error:  # one bad group must not fail the others
            for i in members:
                results[i] = error
            continue
        start = 0
        for i in members:
            count = len(jobs[i].samples)
            results[i] = EngineResult(outputs[start : start + count], len(members))
            start += count
    return results


async def stream_job(
    lvlm: LVLM, job: Job, executor: Executor | None = None
) -> AsyncIterator[str | Generation]:
    """Text pieces of a one-sample job, then its final `Generation` (finish reason, usage).

    Decodes on `executor`'s thread (default: a thread of its own). Closing or cancelling this
    generator (the client left) ends the decoding at its next step.
    """
    [sample] = job.samples
    cancel = threading.Event()
    pieces = lvlm.stream(sample, job.interventions, job.params, cancel=cancel)
    async for item in iterate_in_thread(pieces, cancel, executor):
        yield item


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

    def __init__(self, lvlm: LVLM):
        self.lvlm = lvlm
        self.info = lvlm.info
        # One job at a time (batching is the Ray deployment's job). A single worker thread, not a
        # lock on the event loop, so the next job starts only once the previous one has really
        # finished, also one whose client left (it stops at its next decode step).
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="lvlm-engine")

    async def generate(self, job: Job) -> EngineResult:
        loop = asyncio.get_running_loop()
        [result] = await loop.run_in_executor(self._worker, run_grouped, self.lvlm, [job])
        if isinstance(result, Exception):
            raise result
        return result

    async def stream(self, job: Job) -> AsyncIterator[str | Generation]:
        async for item in stream_job(self.lvlm, job, self._worker):
            yield item

    async def ready(self) -> bool:
        return True  # the model was loaded before the app was built
