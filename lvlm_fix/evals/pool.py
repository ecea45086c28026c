"""Who runs the samples: one in-process worker, or a pool of Ray actors (one model each).

Each worker's model has an engine (`lvlm_fix.engine`) that batches requests continuously: a
worker keeps up to `in_flight` samples submitted to it, one request each, and yields each
sample's generation as soon as it finishes, so no sample waits for a batch-mate. Both pools take
a method's whole list of WorkUnits and yield (index, generation) pairs in the order they finish;
the runner does not care which one it talks to. Ray actors get units round-robin (unit i ->
actor i % n) and stream their share back.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from lvlm_fix.generation import Generation
from lvlm_fix.params import GenerationParams

DTYPES = ("auto", "float32", "bfloat16", "float16")  # lvlm_fix.model.DTYPES (not imported: heavy)


@dataclass(frozen=True)
class WorkUnit:
    """One sample to generate: the user turn, the image file and the per-sample seed."""

    prompt: str
    image: str
    seed: int


@dataclass(frozen=True)
class ModelSpec:
    """What every worker loads."""

    path: str | None  # None = the bundled model
    device: str = "cpu"
    dtype: str = "auto"  # one of DTYPES; "auto" = the checkpoint's dtype
    device_map: str | dict[str, Any] | None = None  # instead of device: transformers' placement


class EvalWorker:
    """Loads the model once and runs WorkUnits on its engine."""

    def __init__(self, spec: ModelSpec, threads: int | None = None):
        import torch

        from lvlm_fix.engine import EngineConfig
        from lvlm_fix.lvlm import LVLM
        from lvlm_fix.model import torch_dtype

        if threads is not None:
            # Inside a Ray actor process only: keep actors sharing a CPU from oversubscribing it.
            torch.set_num_threads(threads)
        dtype = torch_dtype(spec.dtype)
        # Batch-invariant: which samples decode together depends on timing, and must not change
        # a result. With the queue full, the full-width steps it costs are taken anyway.
        engine = EngineConfig(batch_invariant=True)
        self.lvlm = LVLM.from_pretrained(spec.path, device=spec.device, dtype=dtype, engine=engine,
                                         device_map=spec.device_map)  # fmt: skip

    def check(self, interventions: list[dict[str, Any]], params: GenerationParams) -> str:
        """Compile the plan for this model (ValueError names any problem); returns config_id."""
        return self.lvlm.plan(interventions, params).config_id

    def run(
        self,
        units: Sequence[WorkUnit],
        interventions: list[dict[str, Any]],
        params: GenerationParams,
        in_flight: int,
    ) -> Iterator[tuple[int, Generation]]:
        """(index in `units`, generation) of each unit as it finishes. At most `in_flight` are
        submitted at once (each holds its image until it is done); one failing ends the run."""
        plan = self.lvlm.plan(interventions, params)  # once for all the units
        todo = iter(enumerate(units))
        finished: queue.SimpleQueue[int] = queue.SimpleQueue()
        running = {}

        def submit_next() -> None:
            index, unit = next(todo, (None, None))
            if unit is None:
                return

            def listener(event) -> None:  # on the engine's thread
                if event.done:
                    finished.put(index)

            sample = self._sample(unit)
            running[index] = self.lvlm.submit([sample], params=params, plan=plan,
                                              listener=listener)  # fmt: skip

        try:
            for _ in range(in_flight):
                submit_next()
            while running:
                index = finished.get()
                [generation] = running.pop(index).result()
                submit_next()  # before handing this one out: the engine never runs dry
                yield index, generation
        finally:
            for request in running.values():  # the run stopped early: free the engine
                request.cancel()

    def _sample(self, unit: WorkUnit):
        from PIL import Image

        from lvlm_fix.decoding import Sample

        with Image.open(unit.image) as image:
            return Sample(unit.prompt, (image.convert("RGB"),), seed=unit.seed)

    def close(self) -> None:
        self.lvlm.close()


class LocalPool:
    """One worker in this process."""

    def __init__(self, spec: ModelSpec):
        self.worker = EvalWorker(spec)
        self.size = 1

    def check(self, interventions: list[dict[str, Any]], params: GenerationParams) -> str:
        return self.worker.check(interventions, params)

    def run(
        self,
        units: Sequence[WorkUnit],
        interventions: list[dict[str, Any]],
        params: GenerationParams,
        in_flight: int,
    ) -> Iterator[tuple[int, Generation]]:
        return self.worker.run(units, interventions, params, in_flight)

    def close(self) -> None:
        self.worker.close()


class RayPool:
    """Ray actors, one per GPU with CUDA, else `workers` CPU actors."""

    def __init__(self, spec: ModelSpec, workers: int, address: str | None):
        # Ray reads these at import; set them before the first import, never globally at ours.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started and address:
            ray.init(address=address, include_dashboard=False)
        elif self.started:
            # A private local cluster bound to loopback. CPU actors: `workers` CPUs in all;
            # GPU actors: let Ray count this machine's CPUs and GPUs.
            cpus = None if spec.device.startswith("cuda") else workers
            ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1")
        try:
            self.actors = self._spawn(spec, workers)
        except BaseException:
            if self.started:
                ray.shutdown()
            raise
        self.size = len(self.actors)

    def _spawn(self, spec: ModelSpec, workers: int) -> list:
        """Start the actors: one per GPU with CUDA, else `workers` CPU actors."""
        resources = self.ray.cluster_resources()
        if spec.device.startswith("cuda"):
            gpus = int(resources.get("GPU", 0))
            if gpus < 1:
                raise ValueError("--device cuda with --ray needs GPUs in the Ray cluster")
            cpus = min(1.0, float(resources.get("CPU", 1)) / gpus)
            count, options, threads = gpus, {"num_gpus": 1, "num_cpus": cpus}, None
            spec = ModelSpec(spec.path, "cuda", spec.dtype, spec.device_map)  # its GPU is cuda:0
        else:
            count = workers
            cpus = min(1.0, float(resources.get("CPU", 1)) / workers)
            options, threads = {"num_cpus": cpus}, 1
        actor_class = self.ray.remote(EvalWorker).options(**options)
        return [actor_class.remote(spec, threads) for _ in range(count)]

    def check(self, interventions: list[dict[str, Any]], params: GenerationParams) -> str:
        return self.ray.get(self.actors[0].check.remote(interventions, params))

    def run(
        self,
        units: Sequence[WorkUnit],
        interventions: list[dict[str, Any]],
        params: GenerationParams,
        in_flight: int,
    ) -> Iterator[tuple[int, Generation]]:
        """Every actor runs its share at once (`in_flight` on each), streaming results back."""
        shards = {}  # an actor's stream of results -> its shard, units[shard::size]
        for shard, actor in enumerate(self.actors):
            share = list(units[shard :: self.size])
            shards[actor.run.remote(share, interventions, params, in_flight)] = shard
        while shards:
            [stream], _ = self.ray.wait(list(shards), num_returns=1)
            try:
                index, generation = self.ray.get(next(stream))
            except StopIteration:
                del shards[stream]
                continue
            yield shards[stream] + index * self.size, generation

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self.started:
            self.ray.shutdown()


def make_pool(spec: ModelSpec, use_ray: bool, workers: int, address: str | None):
    """LocalPool, or RayPool when `use_ray`."""
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    return RayPool(spec, workers, address) if use_ray else LocalPool(spec)
