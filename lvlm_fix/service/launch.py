"""`lvlm-fix serve`: the REST API on Ray Serve (default) or on plain uvicorn (`--no-ray`).

serve.yaml (all keys optional; the schema is `deployment.AppArgs` plus `address`, `host`, `port`):

    address: auto            # join a running Ray cluster (`ray start --head`); omit = local Ray
    host: 127.0.0.1          # 0.0.0.0 to listen on every interface
    port: 8000
    model: llava-hf/llava-1.5-7b-hf
    device: cuda
    # device_map: auto       # instead of device: split the model over the replica's GPUs
    # dtype: bfloat16        # the weights' dtype (default: the checkpoint's)
    num_gpus: 1              # per model replica: one replica per GPU
    num_replicas: 2          # or, instead:
    # autoscaling: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 32}
    accelerator_type: H100   # model replicas only on such nodes (omit = any)
    ingress_replicas: 1      # HTTP app replicas
    runtime_env: {env_vars: {HF_HOME: /models}}   # every replica's Ray runtime_env
    max_ongoing_requests: 256   # per model replica; its engine queues what it cannot hold yet
    engine: {slots: 32, max_len: 2048}   # each model's engine, --no-ray too (config.EngineSettings)
    service:                 # lvlm_fix.service.config.ServeConfig
      api_key: change-me
      max_image_bytes: 10485760
      default_interventions: [{name: vhr}]       # the model id `lvlm-fix`
      presets: {lvlm-fix+ritual+vcd: [{name: ritual}, {name: vcd}]}   # more model ids

Command-line flags override the file.

Listeners. Without `address`, `serve` starts a private Ray cluster whose node address is
127.0.0.1, whatever `host` is: every Ray process (GCS, raylet, object manager, agents, workers,
Serve's controller, proxy and replicas) listens on loopback only, and only the HTTP proxy listens
on `host`. With `address`, the node is the cluster's: Ray's ports listen on the node's address, and
the replicas' gRPC servers on every interface (other nodes call them), so that network must be
trusted (or use Ray's TLS). On exit, a joined cluster loses only this app; Ray stays up.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
# A private cluster keeps Serve's opt-in listeners on every interface (HAProxy, replicas' own
# HTTP and gRPC ingress ports) off, whatever the environment says.
PRIVATE_RAY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
APP_NAME = "lvlm-fix"


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="listen port (default 8000)")
    parser.add_argument("--no-ray", action="store_true", help="one process under uvicorn")
    parser.add_argument("--config", type=Path, default=None, help="serve.yaml (see module doc)")
    parser.add_argument("--replicas", type=int, default=None, help="model replicas (Ray)")
    parser.add_argument(
        "--slots", type=int, default=None, help="decode rows of each model's engine"
    )
    parser.add_argument(
        "--max-len", type=int, default=None, help="prompt + new tokens per engine row"
    )
    parser.add_argument("--num-cpus", type=float, default=None, help="CPUs given to local Ray")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="local Ray: the port its metrics agent exports every process's metrics on "
        "(Prometheus; loopback like the rest of the private cluster); default: one Ray picks",
    )
    parser.add_argument("--api-key", default=None, help="require this Bearer key")
    parser.epilog = (
        "--intervention here sets the default interventions, applied when a request sends no "
        "`interventions` field."
    )


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """serve.yaml merged with the command line (the command line wins)."""
    import yaml

    from lvlm_fix.methods import parse_intervention

    settings: dict[str, Any] = {}
    if args.config is not None:
        settings = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(settings, dict):
            raise ValueError(f"{args.config}: expected a mapping at the top level")
    service = dict(settings.get("service") or {})
    engine = dict(settings.get("engine") or {})
    overrides = {
        "model": args.model,
        "host": args.host,
        "port": args.port,
        "num_replicas": args.replicas,
        "device_map": args.device_map,
        "dtype": args.dtype,
    }
    if args.device != "cpu" or "device" not in settings:
        overrides["device"] = args.device
    settings.update({k: v for k, v in overrides.items() if v is not None})
    engine.update(
        {k: v for k, v in {"slots": args.slots, "max_len": args.max_len}.items() if v is not None}
    )
    if args.intervention:
        service["default_interventions"] = args.intervention
    for spec in service.get("default_interventions", ()):
        parse_intervention(spec)  # fail now (ValueError naming it), not inside a replica
    if args.api_key:
        service["api_key"] = args.api_key
    settings["service"], settings["engine"] = service, engine
    settings.setdefault("host", "127.0.0.1")
    settings.setdefault("port", 8000)
    return settings


def serve_main(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
        address, host, port = (
            settings.pop("address", None),
            settings.pop("host"),
            settings.pop("port"),
        )
        if args.no_ray:
            return _serve_uvicorn(settings, host, port)
        return _serve_ray(settings, address, host, port, args.num_cpus, args.metrics_port)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _serve_uvicorn(settings: dict, host: str, port: int) -> int:
    import uvicorn

    from lvlm_fix.lvlm import LVLM
    from lvlm_fix.model import torch_dtype
    from lvlm_fix.service.app import build_app
    from lvlm_fix.service.config import EngineSettings, ServeConfig

    config = ServeConfig.model_validate(settings.get("service", {}))
    engine = EngineSettings.model_validate(settings.get("engine", {})).config()
    lvlm = LVLM.from_pretrained(
        settings.get("model"),
        device=settings.get("device", "cpu"),
        dtype=torch_dtype(settings.get("dtype")),
        device_map=settings.get("device_map"),
        engine=engine,
    )
    uvicorn.run(build_app(lvlm, config), host=host, port=port)
    return 0


def _serve_ray(
    settings: dict, address: str | None, host: str, port: int, cpus, metrics_port: int | None
) -> int:
    os.environ.update(RAY_ENV if address else {**RAY_ENV, **PRIVATE_RAY_ENV})  # read at import
    import ray
    from ray import serve

    from lvlm_fix.service.deployment import AppArgs, build

    app_args = AppArgs.model_validate(settings)
    if address:
        ray.init(address=address)
    else:
        # A private cluster on loopback: no Ray process listens beyond this machine.
        ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 _metrics_export_port=metrics_port)  # fmt: skip
    # `docker stop` sends SIGTERM: shut Serve and Ray down as for Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    serve.start(http_options={"host": host, "port": port})
    print(f"serving on http://{host}:{port} (docs at /docs); Ctrl-C stops", file=sys.stderr)
    try:
        serve.run(build(app_args), name=APP_NAME, route_prefix="/")  # returns once running
        replicas = "autoscaling" if app_args.autoscaling else app_args.num_replicas
        print(f"ready: {replicas} model replica(s) running", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if address:
            serve.delete(APP_NAME)  # serve.shutdown() would delete every app of the cluster
        else:
            serve.shutdown()
        ray.shutdown()  # stops a private cluster; only disconnects from a joined one
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
