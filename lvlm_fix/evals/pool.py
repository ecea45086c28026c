"""Who runs the batches: one in-process worker, or a pool of Ray actors (one model each).

Both pools take the same list of batches and yield (batch index, generations) pairs; the runner
does not care which one it talks to. Ray actors get batches round-robin (batch i -> actor
i % n), so the shard of every actor is fixed by the input alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from lvlm_fix.lvlm import Generation
from lvlm_fix.params import GenerationParams

DTYPES = ("auto", "float32", "bfloat16", "float16")


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


class EvalWorker:
    """Loads the model once and generates batches of WorkUnits."""

    def __init__(self, spec: ModelSpec, threads: int | None = None):
        import torch

        from lvlm_fix.lvlm import LVLM

        if threads is not None:
            # Inside a Ray actor process only: keep actors sharing a CPU from oversubscribing it.
            torch.set_num_threads(threads)
        dtype = None if spec.dtype == "auto" else getattr(torch, spec.dtype)
        self.lvlm = LVLM.from_pretrained(spec.path, device=spec.device, dtype=dtype)

    def check(self, interventions: list[dict[str, Any]], params: GenerationParams) -> str:
        """Compile the plan for this model (ValueError names any problem); returns config_id."""
        return self.lvlm.plan(interventions, params).config_id

    def generate(
        self,
        units: Sequence[WorkUnit],
        interventions: list[dict[str, Any]],
        params: GenerationParams,
    ) -> list[Generation]:
        from PIL import Image

        from lvlm_fix.decoding import Sample

        samples = []
        for unit in units:
            with Image.open(unit.image) as image:
                samples.append(Sample(unit.prompt, (image.convert("RGB"),), seed=unit.seed))
        return self.lvlm.generate(samples, interventions, params)


class LocalPool:
    """One worker in this process; batches run in order."""

    def __init__(self, spec: ModelSpec):
        self.worker = EvalWorker(spec)
        self.size = 1

    def check(self, interventions: list[dict[str, Any]], params: GenerationParams) -> str:
        return self.worker.check(interventions, params)

    def run(
        self,
        batches: Sequence[Sequence[WorkUnit]],
        interventions: list[dict[str, Any]],
        params: GenerationParams,
    ) -> Iterator[tuple[int, list[Generation]]]:
        for index, batch in enumerate(batches):
            yield index, self.worker.generate(batch, interventions, params)

    def close(self) -> None:
        pass


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
            spec = ModelSpec(spec.path, "cuda", spec.dtype)  # each actor sees its own GPU as 0
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
        batches: Sequence[Sequence[WorkUnit]],
        interventions: list[dict[str, Any]],
        params: GenerationParams,
    ) -> Iterator[tuple[int, list[Generation]]]:
        pending = {
            self.actors[i % self.size].generate.remote(list(batch), interventions, params): i
            for i, batch in enumerate(batches)
        }
        while pending:
            [done], _ = self.ray.wait(list(pending), num_returns=1)
            yield pending.pop(done), self.ray.get(done)

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
