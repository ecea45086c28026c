"""Ray Serve: a model deployment with dynamic batching, and an ingress wrapping the same app.

    ModelServer  - loads the LVLM once per replica (`__init__`); `@serve.batch` collects queued
                   jobs and runs those whose plans agree as one `LVLM.generate` call.
    Ingress      - the FastAPI app of app.py (`@serve.ingress`, built at replica start) over a
                   `RayEngine` that forwards jobs to ModelServer through its handle.

Requests are validated (images decoded, plans compiled) in the ingress, so a bad request never
reaches a model replica. `build(AppArgs)` is the app builder (`serve run module:build k=v`).

A client that disconnects makes Serve cancel its request in the ingress and in the model replica;
the replica's stream then stops decoding at the next step. A replica that dies under a request
answers it with 503 + Retry-After; `/ready` says 503 until the controller has a replica running.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from typing import Any

import ray
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from lvlm_fix.lvlm import LVLM, Generation
from lvlm_fix.model import ModelInfo
from lvlm_fix.service.app import build_app
from lvlm_fix.service.config import ServeConfig
from lvlm_fix.service.engine import EngineResult, Job, run_grouped, stream_job
from lvlm_fix.service.serving import ServiceError

HEALTH_CHECK_PERIOD_S = 2.0
RETRY_AFTER_S = 5  # a dead replica's restart: the controller notices, then loads the model


class BatchSettings(BaseModel):
    """The model deployment's `user_config`: changed at runtime through `reconfigure`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_batch_size: int = Field(
        8, ge=1, description="Requests per batch at most (1 = no batching)."
    )
    batch_wait_ms: float = Field(10.0, ge=0, description="Wait for more requests (0 = never).")


class AppArgs(BaseModel):
    """Arguments of the Serve application (also the schema of `serve.yaml`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = Field(None, description="Checkpoint path or id (None = bundled model).")
    device: str = Field("cpu", description="cpu, cuda, ...")
    num_replicas: int | str = Field(1, description="Model replicas, or 'auto' (see autoscaling).")
    autoscaling: dict[str, Any] | None = Field(
        None, description="Serve autoscaling_config, e.g. {min_replicas: 1, max_replicas: 4}."
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs per model replica (fractions allowed).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per model replica (1 = one per GPU).")
    ingress_cpus: float = Field(0.25, gt=0, description="CPUs per ingress replica.")
    batch: BatchSettings = BatchSettings()
    service: ServeConfig = ServeConfig()


@serve.deployment
class ModelServer:
    def __init__(self, model: str | None, device: str, batch: dict):
        keep_replica_grpc_on_loopback()
        self.lvlm = LVLM.from_pretrained(model, device=device)
        self.reconfigure(batch)

    def reconfigure(self, config: dict) -> None:
        settings = BatchSettings.model_validate(config)
        self._batched.set_max_batch_size(settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(settings.batch_wait_ms / 1000)

    def info(self) -> ModelInfo:
        return self.lvlm.info

    async def generate(self, job: Job) -> EngineResult:
        result = await self._batched(job)
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, jobs: list[Job]) -> list[EngineResult | Exception]:
        # Groups of agreeing plans run one after another on a worker thread, so the replica's
        # event loop keeps queueing the next batch meanwhile.
        return await asyncio.to_thread(run_grouped, self.lvlm, jobs)

    async def stream(self, job: Job) -> AsyncIterator[str | Generation]:
        async for item in stream_job(self.lvlm, job):
            yield item


class RayEngine:
    """The `Engine` the ingress uses: jobs go to ModelServer replicas through a handle."""

    def __init__(self, handle: DeploymentHandle, info: ModelInfo):
        self.handle, self.info = handle, info

    async def generate(self, job: Job) -> EngineResult:
        try:
            return await self.handle.generate.remote(job)
        except RayActorError:
            raise _replica_lost() from None

    async def stream(self, job: Job) -> AsyncIterator[str | Generation]:
        try:
            async for item in self.handle.options(stream=True).stream.remote(job):
                yield item
        except RayActorError:
            raise _replica_lost() from None

    async def ready(self) -> bool:
        """Whether Serve's controller counts a RUNNING replica of the model deployment."""
        status = await asyncio.to_thread(serve.status)  # a blocking call to the controller
        app = status.applications.get(self.handle.app_name)
        model = app.deployments.get(self.handle.deployment_name) if app else None
        return model is not None and model.replica_states.get("RUNNING", 0) > 0


def _replica_lost() -> ServiceError:
    # Ray's exception names actors and nodes: the client gets what to do instead.
    return ServiceError(
        503,
        "the model replica serving this request stopped; retry shortly",
        code="replica_unavailable",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def keep_replica_grpc_on_loopback() -> None:
    """Bind this replica's inter-deployment gRPC server to loopback when the node's is.

    Ray 2.60 starts it on `[::]:0`, every interface, with no setting to change that
    (`ray.serve._private.replica`, `_on_initialized`); it is unauthenticated and unpickles what it
    receives. Serve only uses it when RAY_SERVE_USE_GRPC_BY_DEFAULT=1, at the node's address, so
    on a node whose address is loopback nothing else can need it elsewhere. Call it in the
    deployment's `__init__`: the server starts right after.
    """
    if not ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback:
        return
    from ray.serve._private import replica

    add_port = replica.add_port_to_grpc_server

    def add_loopback_port(server, address: str) -> int:
        return add_port(server, address.replace("[::]", "127.0.0.1"))

    if add_port.__name__ != add_loopback_port.__name__:  # once per process
        replica.add_port_to_grpc_server = add_loopback_port


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(self, model: DeploymentHandle, config: ServeConfig):
        keep_replica_grpc_on_loopback()
        self.model, self.config = model, config

    async def __serve_build_asgi_app__(self):
        info = await self.model.info.remote()
        # Serve's proxy echoes X-Request-Id itself (the client's, or one it made up).
        engine = RayEngine(self.model, info)
        return build_app(engine, self.config, proxy_echoes_request_id=True)


def build(args: AppArgs | dict) -> serve.Application:
    """The Serve app builder: `serve.run(build(AppArgs(...)))` or `serve run ...:build`."""
    args = AppArgs.model_validate(args)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
        "user_config": args.batch.model_dump(),
        # Let the batcher see a full batch's worth of requests at once.
        "max_ongoing_requests": max(args.batch.max_batch_size * 2, 8),
        # A dead replica is noticed (/ready says 503) and replaced within seconds, not Serve's 10.
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
    }
    if args.autoscaling is not None:
        options["autoscaling_config"] = args.autoscaling
    else:
        options["num_replicas"] = args.num_replicas
    model = ModelServer.options(**options).bind(args.model, args.device, args.batch.model_dump())
    ingress = Ingress.options(
        ray_actor_options={"num_cpus": args.ingress_cpus}, max_ongoing_requests=1000
    )
    return ingress.bind(model, args.service)
