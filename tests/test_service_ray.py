"""The REST service on a real local Ray Serve: ingress + a model deployment whose replica runs
its model's engine."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is imported
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import asyncio  # noqa: E402
import io  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import httpx  # noqa: E402
import openai  # noqa: E402
import psutil  # noqa: E402
import pytest  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402
from ray import serve  # noqa: E402
from service_helpers import BAD_REQUESTS, chat_body, chat_sample, free_port, png  # noqa: E402

from lvlm_fix import LVLM, GenerationParams, Sample  # noqa: E402
from lvlm_fix.engine import Cancelled  # noqa: E402
from lvlm_fix.methods import REGISTRY  # noqa: E402
from lvlm_fix.service import Client  # noqa: E402
from lvlm_fix.service.config import EngineSettings, ServeConfig  # noqa: E402
from lvlm_fix.service.deployment import AppArgs, ModelServer, build  # noqa: E402
from lvlm_fix.tiny import build_tiny  # noqa: E402

RITUAL = [{"name": "ritual"}]  # a view method: its plan crosses to the replica pickled
SERVICE = ServeConfig(
    max_image_bytes=50_000,
    max_image_pixels=256 * 256,
    max_prompt_chars=2000,
    max_tokens_limit=600,
    max_n=4,
)


def _args(path: str) -> AppArgs:
    return AppArgs(model=path, num_cpus=0.5, ingress_cpus=0.25, service=SERVICE)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-ray") / "llava"
    build_tiny("llava", path)
    return str(path)


@pytest.fixture(scope="module")
def lvlm(tiny_path) -> LVLM:
    return LVLM.from_pretrained(tiny_path)


@pytest.fixture(scope="module")
def url(tiny_path):
    # Workers report their metrics to the node's agent every 0.5 s instead of Ray's 10 s.
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _system_config={"metrics_report_interval_ms": 500},
    )
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(_args(tiny_path)), name="lvlm-fix", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client


def _solo(lvlm: LVLM, text: str, image: bytes, max_tokens: int = 6):
    """What a task route generates (the image, then the text)."""
    pil = Image.open(io.BytesIO(image)).convert("RGB")
    params = GenerationParams(max_new_tokens=max_tokens)
    return lvlm.generate([Sample(text, (pil,))], (), params)[0]


def _chat(lvlm: LVLM, text: str, image: bytes, max_tokens: int = 6, interventions=()):
    """What the chat route generates for `chat_body(text, image)` (text, then image)."""
    params = GenerationParams(max_new_tokens=max_tokens)
    return lvlm.generate([chat_sample(text, image)], interventions, params)[0]


def ray_metric(name: str, **labels: str) -> float:
    """A metric as Ray's metrics agent of this node exports it, summed over the processes
    (ingress and replicas) that recorded it: `lvlm_fix:x` is `ray_lvlm_fix_x` there."""
    port = ray._private.worker.global_worker.node.metrics_export_port
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    wanted = "ray_" + name.replace(":", "_")
    total = 0.0
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if line.startswith("#") or head.partition("{")[0] != wanted:
            continue
        if all(f'{key}="{val}"' in head for key, val in labels.items()):
            total += float(value)
    return total


def wait_for(predicate, seconds: float = 30.0) -> None:
    """Ray's metrics reach the agent on the workers' report interval: poll, bounded."""
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.25)


def test_every_endpoint(http, url, lvlm):
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/v1/models").json()["data"][0]["id"] == "lvlm-fix"
    assert [m["name"] for m in http.get("/v1/interventions").json()["data"]] == sorted(REGISTRY)
    assert http.get("/docs").status_code == 200
    image = png(color="red")
    reply = http.post(
        "/v1/chat/completions", json=chat_body(image=image), headers={"X-Request-Id": "ray-req-1"}
    )
    assert reply.status_code == 200 and reply.headers["x-request-id"] == "ray-req-1"
    expected = _chat(lvlm, "What is in the image?", image)
    assert reply.json()["choices"][0]["token_ids"] == expected.token_ids
    form = http.post(
        "/v1/vqa",
        files={"image": ("a.png", image, "image/png")},
        data={"question": "What is in the image?", "max_tokens": "6"},
    )
    assert form.json()["text"] == _solo(lvlm, "What is in the image?", image).text
    with Client(url) as client:
        assert client.caption(image, max_tokens=6) == _solo(
            lvlm, "Please describe this image in detail.", image
        )
        assert "".join(client.stream("What is in the image?", image, max_tokens=6)) == expected.text


def test_interventions_per_request(http):
    catalogue = http.get("/v1/interventions").json()["data"]
    for spec in [m["defaults"] for m in catalogue if m["defaults"]]:  # whatever is registered
        reply = http.post("/v1/chat/completions", json=chat_body(interventions=[spec]))
        assert reply.status_code == 200, spec
    unknown = http.post("/v1/chat/completions", json=chat_body(interventions=[{"name": "nope"}]))
    assert unknown.status_code == 400 and "nope" in unknown.json()["error"]["message"]


def test_openai_sdk(url, lvlm):
    image = png(color="blue")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    messages = chat_body(image=image)["messages"]
    reply = client.chat.completions.create(model="lvlm-fix", messages=messages, max_tokens=6)
    expected = _chat(lvlm, "What is in the image?", image)
    assert reply.choices[0].message.content == expected.text
    stream = client.chat.completions.create(
        model="lvlm-fix", messages=messages, max_tokens=6, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected.text


def test_concurrent_requests_with_different_plans(http, lvlm):
    """Twelve requests at once, two plans and two lengths: the replica's engine runs them side by
    side, and each gets the tokens it gets alone."""
    image = png(color="green")
    bodies = [
        chat_body(image=image, max_tokens=6 if i % 3 else 4, interventions=[] if i % 2 else RITUAL)
        for i in range(12)
    ]
    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(lambda b: http.post("/v1/chat/completions", json=b), bodies))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    for body, reply in zip(bodies, replies, strict=True):
        expected = _chat(
            lvlm, "What is in the image?", image, body["max_tokens"], body["interventions"]
        )
        assert reply.json()["choices"][0]["token_ids"] == expected.token_ids


def test_metrics_recorded_through_ray(http):
    """Ray's metrics agent exports what the ingress (latencies, tokens) and the model replica
    (its gauges) recorded, under vLLM's names with `ray_` in front and ':' as '_'."""
    before = ray_metric("lvlm_fix:request_success_total", model_name="lvlm-fix")
    reply = http.post("/v1/chat/completions", json=chat_body(image=png(), max_tokens=4)).json()
    reason = reply["choices"][0]["finish_reason"]
    wait_for(
        lambda: (
            ray_metric("lvlm_fix:request_success_total", finished_reason=reason) > 0
            # >=: earlier tests' requests may reach the agent only now, on its report interval
            and ray_metric("lvlm_fix:request_success_total", model_name="lvlm-fix") >= before + 1
        )
    )
    for name in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert ray_metric(f"lvlm_fix:{name}_seconds_count", model_name="lvlm-fix") >= 1, name
    assert ray_metric("lvlm_fix:generation_tokens_total") >= reply["usage"]["completion_tokens"]
    wait_for(lambda: ray_metric("lvlm_fix:num_requests_running", model_name="lvlm-fix") == 0)
    assert http.get("/metrics").status_code == 404  # not the ingress's: Ray's agents export


def test_bad_input_keeps_serving(http):
    for route, body, status, words in BAD_REQUESTS:
        reply = http.post(route, json=body)
        assert reply.status_code == status, (route, reply.text)
        assert words in reply.json()["error"]["message"]
    assert http.get("/health").status_code == 200
    assert http.post("/v1/chat/completions", json=chat_body(image=png())).status_code == 200


# Sampled at temperature 2, this request runs to max_tokens=600 (no EOS): seconds of decoding.
LONG = {"image": png(), "max_tokens": 600, "temperature": 2, "seed": 5}


def _model_replica() -> tuple[object, object]:
    """(actor handle, psutil process) of the one ModelServer replica."""
    [name] = [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if "ModelServer" in actor["name"]
    ]
    # This test's own Ray cluster: its processes descend from this one (not another run's).
    [process] = [
        p
        for p in psutil.Process().children(recursive=True)
        if "lvlm-fix:ModelServer" in " ".join(p.cmdline())
    ]
    return ray.get_actor(name, namespace="serve"), process


def _busy_cpu_seconds(process, seconds: float) -> float:
    before = sum(process.cpu_times()[:2])
    time.sleep(seconds)
    return sum(process.cpu_times()[:2]) - before


def test_abandoned_stream_stops_decoding(http):
    _, replica = _model_replica()
    body = chat_body(stream=True, **LONG)
    with http.stream("POST", "/v1/chat/completions", json=body) as reply:
        lines = (line for line in reply.iter_lines() if line)
        next(lines)  # the role chunk
        next(lines)  # the first piece of text: the replica is decoding
        decoding = _busy_cpu_seconds(replica, 0.5) / 0.5  # CPU-seconds per second
    time.sleep(0.4)  # Serve cancels the request in the ingress, then in the replica
    after = _busy_cpu_seconds(replica, 1.0) / 1.0
    # Rates, not absolute times: a loaded machine gives the replica less CPU while it decodes,
    # but an orphaned decode would keep using about as much as before.
    assert decoding > 0.05 and after < decoding / 4, (decoding, after)  # the replica went idle
    start = time.perf_counter()
    assert http.post("/v1/chat/completions", json=chat_body()).status_code == 200
    assert time.perf_counter() - start < 2.0


def test_dead_replica_gives_503_and_ready_follows(http):
    assert http.get("/ready").status_code == 200
    actor, _ = _model_replica()
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(http.post, "/v1/chat/completions", json=chat_body(**LONG))
        time.sleep(1.0)
        ray.kill(actor)
        reply = in_flight.result(timeout=60)
    assert reply.status_code == 503, reply.text
    assert reply.headers["retry-after"].isdigit()
    error = reply.json()["error"]
    assert error["type"] == "server_error" and "retry" in error["message"]
    assert "Actor" not in error["message"] and "Traceback" not in reply.text
    states = []  # /ready's answers: 503 once the controller saw the death, until a new replica
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (503 in states and states[-1] == 200):
        states.append(http.get("/ready").status_code)
        time.sleep(0.2)
    assert 503 in states and states[-1] == 200, states
    assert http.post("/v1/chat/completions", json=chat_body()).status_code == 200


def test_health_check_runs_a_one_token_generation(tiny_path, monkeypatch):
    """ModelServer's check_health, on the class itself in this process: a one-token generation
    through the replica's engine when it is idle, none while it holds requests, and an error once
    the model is broken."""
    server = ModelServer.func_or_class(tiny_path, "cpu", EngineSettings(slots=3))
    lvlm, submit, probes = server.lvlm, server.lvlm.submit, []
    assert lvlm.engine.slots.slots == 3  # the replica's engine has the sizes it was given

    def counted(*args, **kwargs):
        probes.append(submit(*args, **kwargs))
        return probes[-1]

    monkeypatch.setattr(lvlm, "submit", counted)
    forwards = []
    lvlm.model.register_forward_hook(lambda *_: forwards.append(1))
    asyncio.run(server.check_health())
    assert len(probes) == len(forwards) == 1  # the prompt's prefill; one token needs no step
    sampled = GenerationParams(max_new_tokens=600, do_sample=True, temperature=2)
    decoding = threading.Event()
    sample = chat_sample("What is in the image?", LONG["image"], LONG["seed"])
    long = submit([sample], params=sampled, listener=lambda _: decoding.set())
    assert decoding.wait(timeout=60)
    asyncio.run(server.check_health())  # the engine holds a request: no probe
    assert len(probes) == 1
    long.cancel()
    with pytest.raises(Cancelled):
        long.result(timeout=60)
    lvlm.model.get_input_embeddings().weight.data = torch.empty(0)  # a broken model
    with pytest.raises(AssertionError, match="num_embeddings"):
        asyncio.run(server.check_health())


def _serve_config(tiny_path: str) -> dict:
    """A Serve-native config, as `serve run` / `serve deploy` read it (docker/serve-config.yaml
    has the full version)."""
    args = {
        "model": tiny_path,
        "num_cpus": 0.25,
        "ingress_cpus": 0.25,
        "service": {"model_name": "cfg-model", "presets": {"cfg-model+vhr": [{"name": "vhr"}]}},
    }
    app = {
        "name": "cfg",
        "route_prefix": "/cfg",
        "import_path": "lvlm_fix.service.deployment:build",
        "args": args,
    }
    return {"applications": [app]}


def _wait_json(http: httpx.Client, path: str, seconds: float, process: subprocess.Popen):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, "the command exited"
        reply = http.get(path)
        if reply.status_code == 200:
            return reply.json()
        time.sleep(0.5)
    raise TimeoutError(path)


def _models(http: httpx.Client, prefix: str = "") -> list[str]:
    reply = http.get(f"{prefix}/v1/models")
    return [m["id"] for m in reply.json()["data"]] if reply.status_code == 200 else []


def test_serve_config_file_and_cli_stop_only_their_app(http, url, tiny_path, tmp_path):
    """Last in this module: `serve run` shuts all of Serve down when it stops.

    `serve run` deploys the Serve-native config; then `lvlm-fix serve` joins the same cluster
    with its own app, and stopping it removes that app only."""
    config = tmp_path / "serve-config.yaml"
    config.write_text(yaml.safe_dump(_serve_config(tiny_path)))
    gcs = ray.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    log = open(tmp_path / "commands.log", "w")  # noqa: SIM115 (both processes write to it)
    serve_run = subprocess.Popen(
        [sys.executable, "-m", "ray.serve.scripts", "run", str(config), "--address", gcs],
        stdout=log, stderr=log, env=env, start_new_session=True,
    )  # fmt: skip
    cli = None
    try:
        _wait_json(http, "/cfg/health", 120, serve_run)
        assert _models(http, "/cfg") == ["cfg-model", "cfg-model+vhr"]  # args reached the app
        cli_config = tmp_path / "cli.yaml"
        cli_config.write_text(
            yaml.safe_dump(
                {"address": gcs, "port": int(url.rpartition(":")[2]), "model": tiny_path,
                 "num_cpus": 0.25, "service": {"model_name": "cli-model"}}
            )
        )  # fmt: skip
        cli = subprocess.Popen(
            [sys.executable, "-m", "lvlm_fix.cli", "serve", "--config", str(cli_config)],
            stdout=log, stderr=log, env=env, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while _models(http) != ["cli-model"]:
            assert time.monotonic() < deadline and cli.poll() is None, "the CLI's app never came"
            time.sleep(0.5)
        cli.send_signal(signal.SIGINT)
        assert cli.wait(timeout=60) == 0
        assert "lvlm-fix" not in serve.status().applications  # its own app is gone
        assert http.get("/cfg/health").status_code == 200  # the other app still serves
        assert _models(http, "/cfg") == ["cfg-model", "cfg-model+vhr"]
    finally:
        for process in (cli, serve_run):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
        log.close()
        print((tmp_path / "commands.log").read_text()[-3000:])
