"""Ray Serve: a model deployment with one engine per replica, and an ingress wrapping the same app.

    ModelServer  - loads the LVLM once per replica (`__init__`) and starts its engine, which
                   batches every request the replica takes continuously, whatever its
                   interventions; streams come from it token by token.
    Ingress      - the FastAPI app of app.py (`@serve.ingress`, built at replica start) over a
                   `RayEngine` that forwards jobs to ModelServer through its handle.

Requests are validated (images decoded, plans compiled) in the ingress, so a bad request never
reaches a model replica; the compiled plan travels with the job. `build(AppArgs)` is the app
builder (`serve run module:build k=v`).

A client that disconnects makes Serve cancel its request in the ingress and in the model replica;
the replica cancels it in the engine, which drops it at its next step. A replica that dies under
a request answers it with 503 + Retry-After; `/ready` says 503 until the controller has a replica
running. A replica's health check runs a one-token generation when it is idle (`check_health`).

Metrics go through Ray's (`metrics.RayBackend`): the ingress records request latencies and
tokens, each model replica its waiting/running gauges; Ray's agents export them per node.

Serve-native deployment (`serve run` / `serve deploy`, e.g. docker/serve-config.yaml):
`import_path: lvlm_fix.service.deployment:build` with `args:` in `AppArgs`' schema.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from typing import Any, Literal

import ray
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from lvlm_fix.decoding import Sample
from lvlm_fix.engine import Timing
from lvlm_fix.generation import Generation
from lvlm_fix.lvlm import LVLM
from lvlm_fix.model import ModelInfo, torch_dtype
from lvlm_fix.params import GenerationParams
from lvlm_fix.service.app import build_app
from lvlm_fix.service.config import EngineSettings, ServeConfig
from lvlm_fix.service.engine import EngineResult, Job, LocalEngine
from lvlm_fix.service.metrics import Gauges, Metrics, RayBackend
from lvlm_fix.service.serving import ServiceError

HEALTH_CHECK_PERIOD_S = 2.0
RETRY_AFTER_S = 5  # a dead replica's restart: the controller notices, then loads the model


class AppArgs(BaseModel):
    """Arguments of the Serve application (also the schema of `serve.yaml`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = Field(None, description="Checkpoint path or id (None = bundled model).")
    device: str = Field("cpu", description="cpu, cuda, ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="The weights' dtype (auto = the checkpoint's)."
    )
    device_map: str | dict[str, int | str] | None = Field(
        None,
        description="Instead of device: transformers' device_map, e.g. 'auto' or 'balanced' to "
        "split a model too large for one GPU over the GPUs of its replica (num_gpus: 2 or more).",
    )
    num_replicas: int | str = Field(1, description="Model replicas, or 'auto' (see autoscaling).")
    autoscaling: dict[str, Any] | None = Field(
        None, description="Serve autoscaling_config, e.g. {min_replicas: 1, max_replicas: 4}."
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs per model replica (fractions allowed).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per model replica (1 = one per GPU).")
    accelerator_type: str | None = Field(
        None, description="Place model replicas on nodes with this accelerator (e.g. H100)."
    )
    max_ongoing_requests: int = Field(
        256,
        ge=1,
        description="Requests a model replica takes at once; its engine queues those its slots "
        "cannot hold yet. Past this, Serve queues them (or routes them to another replica).",
    )
    ingress_cpus: float = Field(0.25, gt=0, description="CPUs per ingress replica.")
    ingress_replicas: int = Field(1, ge=1, description="Ingress (HTTP app) replicas.")
    runtime_env: dict[str, Any] | None = Field(
        None, description="Ray runtime_env of every replica (env_vars, pip, working_dir, ...)."
    )
    engine: EngineSettings = EngineSettings()
    service: ServeConfig = ServeConfig()


@serve.deployment
class ModelServer:
    def __init__(self, model: str | None, device: str, engine: EngineSettings,
                 dtype: str = "auto", device_map: str | dict | None = None):  # fmt: skip
        keep_replica_grpc_on_loopback()
        self.lvlm = LVLM.from_pretrained(model, device=device, dtype=torch_dtype(dtype),
                                         engine=engine.config(), device_map=device_map)  # fmt: skip
        self.engine = LocalEngine(self.lvlm, Gauges(Metrics(RayBackend())))
        self._probe = LocalEngine(self.lvlm)  # health checks: not requests, so not counted
        params = GenerationParams(max_new_tokens=1)
        self._probe_job = Job((Sample("Hi"),), self.lvlm.plan((), params), params)

    def info(self) -> ModelInfo:
        return self.lvlm.info

    async def generate(self, job: Job) -> EngineResult:
        return await self.engine.generate(job)

    async def stream(self, job: Job) -> AsyncIterator[str | Generation | Timing]:
        async for item in self.engine.stream(job):
            yield item

    async def check_health(self) -> None:
        """Serve's health check: a one-token generation on a tiny text-only prompt, so a
        replica whose model or device broke is replaced. Skipped while the engine holds
        requests: they exercise the model, and the check would wait behind the queued ones
        past its timeout."""
        engine = self.lvlm.engine
        if engine.running or engine.waiting:
            return
        await self._probe.generate(self._probe_job)


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
        metrics = Metrics(RayBackend())
        return build_app(engine, self.config, metrics=metrics, proxy_echoes_request_id=True)


def build(args: AppArgs | dict) -> serve.Application:
    """The Serve app builder: `serve.run(build(AppArgs(...)))` or `serve run ...:build`."""
    args = AppArgs.model_validate(args)
    actor = {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus}
    if args.accelerator_type is not None:
        actor["accelerator_type"] = args.accelerator_type
    env = {} if args.runtime_env is None else {"runtime_env": args.runtime_env}
    options: dict[str, Any] = {
        "ray_actor_options": {**actor, **env},
        "max_ongoing_requests": args.max_ongoing_requests,
        # A dead replica is noticed (/ready says 503) and replaced within seconds, not Serve's 10.
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
    }
    if args.autoscaling is not None:
        options["autoscaling_config"] = args.autoscaling
    else:
        options["num_replicas"] = args.num_replicas
    model = ModelServer.options(**options).bind(
        args.model, args.device, args.engine, args.dtype, args.device_map
    )
    ingress = Ingress.options(
        num_replicas=args.ingress_replicas,
        ray_actor_options={"num_cpus": args.ingress_cpus, **env},
        max_ongoing_requests=1000,
    )
    return ingress.bind(model, args.service)
