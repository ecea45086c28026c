"""The engine seam between the HTTP layer and a model: in-process (`LocalEngine`) or Ray.

A `Job` is one validated request: its samples (one per choice, seeds set), interventions, params
and the plan's config id. Engines run jobs off the event loop so /health stays responsive.
`run_grouped` is the batching rule shared by every engine: jobs whose plans agree (same config
id, same params but the seed) become one `LVLM.generate` call.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
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


def stream_job(lvlm: LVLM, job: Job) -> Iterator[str | Generation]:
    """Text pieces of a one-sample job, then its final `Generation` (finish reason, usage)."""
    [sample] = job.samples
    return lvlm.stream(sample, job.interventions, job.params)


async def iterate_in_thread(items: Iterator) -> AsyncIterator:
    """Drive a blocking iterator on a worker thread, yielding its items on the event loop."""
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

    threading.Thread(target=pump, daemon=True).start()
    while (item := await queue.get()) is not done:
        if isinstance(item, Exception):
            raise item
        yield item


class LocalEngine:
    """An in-process LVLM. Jobs run one at a time on a worker thread (no dynamic batching)."""

    def __init__(self, lvlm: LVLM):
        self.lvlm = lvlm
        self.info = lvlm.info
        self._lock = asyncio.Lock()  # one job at a time: batching is the Ray deployment's job

    async def generate(self, job: Job) -> EngineResult:
        async with self._lock:
            [result] = await asyncio.to_thread(run_grouped, self.lvlm, [job])
        if isinstance(result, Exception):
            raise result
        return result

    async def stream(self, job: Job) -> AsyncIterator[str | Generation]:
        async with self._lock:
            async for item in iterate_in_thread(stream_job(self.lvlm, job)):
                yield item
