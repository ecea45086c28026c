"""The engine seam between the HTTP layer and a model: in-process (`LocalEngine`) or Ray.

A `Job` is one validated request: its samples (one per choice, seeds set), its plan (compiled
once, by `Serving`) and params. `LocalEngine` submits it to the model's engine
(`lvlm_fix.engine.Engine`), which batches it continuously with whatever else is running, and
brings the engine's events from its scheduler thread onto the event loop. The Ray deployment's
replicas each run one `LocalEngine` over their own model. Cancelling the task that awaits a job,
or closing its stream (the client left), cancels the request: it leaves the batch at the
engine's next step.

The engine times each request (`Timing`: queue, prefill, decode, step gaps) in its own process,
so the numbers hold when it runs on another node; the waiting and running gauges are counted in
that process too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from lvlm_fix.decoding import Sample
from lvlm_fix.engine import Event, Timing
from lvlm_fix.generation import Generation, TextPieces
from lvlm_fix.lvlm import LVLM
from lvlm_fix.model import ModelInfo
from lvlm_fix.params import GenerationParams
from lvlm_fix.plan import Plan
from lvlm_fix.service.metrics import Gauges


@dataclass(frozen=True)
class Job:
    samples: tuple[Sample, ...]  # one per choice, each with its own seed
    plan: Plan  # compiled for the engine's model; pickled when the job crosses to a Ray replica
    params: GenerationParams
    model: str = ""  # the model id (preset) asked for: the metrics' model_name


@dataclass(frozen=True)
class EngineResult:
    generations: list[Generation]
    timing: Timing


class Engine(Protocol):
    info: ModelInfo

    async def generate(self, job: Job) -> EngineResult: ...

    def stream(self, job: Job) -> AsyncIterator[str | Generation | Timing]: ...

    async def ready(self) -> bool:
        """True while a model can take requests (the readiness probe)."""
        ...


_END = object()  # after a request's last item


class LocalEngine:
    """An in-process LVLM's engine, driven from the event loop. `gauges`: where its jobs are
    counted as waiting (submitted, no event yet) and running (until done); None = uncounted."""

    def __init__(self, lvlm: LVLM, gauges: Gauges | None = None):
        self.lvlm, self.gauges = lvlm, gauges
        self.info = lvlm.info
        lvlm.engine  # noqa: B018  (started now: on a GPU it captures its graphs before any request)

    async def generate(self, job: Job) -> EngineResult:
        [generations, timing] = [item async for item in self._run(job, _generations)]
        return EngineResult(generations, timing)

    async def stream(self, job: Job) -> AsyncIterator[str | Generation | Timing]:
        """Text pieces of a one-sample job, its final `Generation` (finish reason, usage), then
        its `Timing`. A piece is sent once later tokens cannot change it (`TextPieces`)."""
        pieces = TextPieces(self.lvlm.processor.tokenizer, job.params)
        async for item in self._run(job, pieces.take):
            yield item

    async def ready(self) -> bool:
        return True  # the model is loaded and its engine started

    async def _run(self, job: Job, translate: Callable[[Event], list]) -> AsyncIterator:
        """Submit `job`; yield what `translate` makes of each of its events, then its `Timing`.

        `translate` runs in the engine's listener, on its scheduler thread: the one thread that
        may use the model's tokenizer. An error event (or a failing `translate`) is raised here.
        """
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[list] = asyncio.Queue()
        count = _Counter(self.gauges, job.model)

        def listener(event: Event) -> None:
            count(event)
            try:
                items = [event.error] if event.error is not None else translate(event)
            except Exception as error:  # must still end the wait below (which cancels the job)
                items = [error]
            if event.done:
                items.append(_END)
            if items and not loop.is_closed():  # a closed loop: its waiter is long gone
                loop.call_soon_threadsafe(inbox.put_nowait, items)

        count.submitted()
        try:
            request = self.lvlm.submit(job.samples, params=job.params, plan=job.plan,
                                       listener=listener)  # fmt: skip
        except BaseException:
            count.refused()
            raise
        try:
            while True:
                items = await inbox.get()
                while not inbox.empty():  # fallen behind the engine: take the backlog at once
                    items += inbox.get_nowait()
                for item in _joined(items):
                    if item is _END:
                        yield request.timing
                        return
                    if isinstance(item, BaseException):
                        raise item
                    yield item
        finally:
            request.cancel()  # a no-op once done; else it leaves the batch at the next step


def _joined(items: list) -> list:
    """`items` with adjacent text pieces joined into one. A stream whose reader fell behind (a
    busy event loop; on Ray, each item is one object through Serve's streaming and its proxy)
    then catches up in one item, not one per decode step; one that keeps up is unchanged."""
    joined: list = []
    for item in items:
        if isinstance(item, str) and joined and isinstance(joined[-1], str):
            joined[-1] += item
        else:
            joined.append(item)
    return joined


def _generations(event: Event) -> list:
    return [event.generations] if event.generations is not None else []


class _Counter:
    """One job on the gauges: waiting from submit to its first event, then running until done.
    Moved by the engine's events, so a cancelled job counts until the engine has let it go."""

    def __init__(self, gauges: Gauges | None, model: str):
        self.gauges, self.model = gauges, model
        self.state = "waiting"

    def _add(self, state: str, delta: int) -> None:
        if self.gauges is not None:
            self.gauges.add(state, self.model, delta)

    def submitted(self) -> None:
        self._add("waiting", 1)

    def refused(self) -> None:
        self._add("waiting", -1)

    def __call__(self, event: Event) -> None:
        if event.done:
            self._add(self.state, -1)
        elif self.state == "waiting":
            self._add("waiting", -1)
            self._add("running", 1)
            self.state = "running"
