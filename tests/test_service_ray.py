"""The REST service on a real local Ray Serve: ingress + model deployment with dynamic batching."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is imported
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import io  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import httpx  # noqa: E402
import openai  # noqa: E402
import psutil  # noqa: E402
import pytest  # noqa: E402
import ray  # noqa: E402
from PIL import Image  # noqa: E402
from ray import serve  # noqa: E402
from service_helpers import BAD_REQUESTS, chat_body, free_port, metric_samples, png  # noqa: E402

from lvlm_fix import LVLM, GenerationParams, Sample  # noqa: E402
from lvlm_fix.methods import REGISTRY  # noqa: E402
from lvlm_fix.service import Client  # noqa: E402
from lvlm_fix.service.config import ServeConfig  # noqa: E402
from lvlm_fix.service.deployment import AppArgs, BatchSettings, build  # noqa: E402
from lvlm_fix.tiny import build_tiny  # noqa: E402

SERVICE = ServeConfig(
    max_image_bytes=50_000,
    max_image_pixels=256 * 256,
    max_prompt_chars=2000,
    max_tokens_limit=600,
    max_n=4,
)


def _args(path: str, max_batch_size: int) -> AppArgs:
    batch = BatchSettings(max_batch_size=max_batch_size, batch_wait_ms=200)
    return AppArgs(model=path, num_cpus=0.5, ingress_cpus=0.25, batch=batch, service=SERVICE)


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
    ray.init(num_cpus=2, include_dashboard=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(_args(tiny_path, 8)), name="lvlm-fix", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client


def _solo(lvlm: LVLM, text: str, image: bytes, max_tokens: int = 6):
    pil = Image.open(io.BytesIO(image)).convert("RGB")
    params = GenerationParams(max_new_tokens=max_tokens)
    return lvlm.generate([Sample(text, (pil,))], (), params)[0]


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
    expected = _solo(lvlm, "What is in the image?", image)
    assert reply.json()["choices"][0]["token_ids"] == expected.token_ids
    form = http.post(
        "/v1/vqa",
        files={"image": ("a.png", image, "image/png")},
        data={"question": "What is in the image?", "max_tokens": "6"},
    )
    assert form.json()["text"] == expected.text
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
    expected = _solo(lvlm, "What is in the image?", image)
    assert reply.choices[0].message.content == expected.text
    stream = client.chat.completions.create(
        model="lvlm-fix", messages=messages, max_tokens=6, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected.text


def test_concurrent_requests_are_batched_by_plan(http, lvlm):
    image = png(color="green")
    # Two plans' worth of params (6 vs 4 tokens): the batcher must split them into groups.
    bodies = [chat_body(image=image, max_tokens=6 if i % 3 else 4) for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(lambda b: http.post("/v1/chat/completions", json=b), bodies))
    assert all(r.status_code == 200 for r in replies)
    for body, reply in zip(bodies, replies, strict=True):
        expected = _solo(lvlm, "What is in the image?", image, body["max_tokens"])
        assert reply.json()["choices"][0]["token_ids"] == expected.token_ids
    sizes = metric_samples(http.get("/metrics").text, "lvlm_batch_size")
    assert sizes["_sum"] > sizes["_count"], "no generate call ever served more than one request"


def test_bad_input_keeps_serving(http):
    for route, body, status, words in BAD_REQUESTS:
        reply = http.post(route, json=body)
        assert reply.status_code == status, (route, reply.text)
        assert words in reply.json()["error"]["message"]
    assert http.get("/health").status_code == 200
    assert http.post("/v1/chat/completions", json=chat_body(image=png())).status_code == 200


def test_reconfigure_batch_size(http, tiny_path):
    serve.run(build(_args(tiny_path, 1)), name="lvlm-fix", route_prefix="/")
    before = metric_samples(http.get("/metrics").text, "lvlm_batch_size")
    with ThreadPoolExecutor(6) as pool:
        replies = list(
            pool.map(lambda _: http.post("/v1/chat/completions", json=chat_body()), range(6))
        )
    assert all(r.status_code == 200 for r in replies)
    after = metric_samples(http.get("/metrics").text, "lvlm_batch_size")
    added = after["_count"] - before.get("_count", 0)
    assert added == 6 and after["_sum"] - before.get("_sum", 0) == added  # every batch had 1


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
        decoding = _busy_cpu_seconds(replica, 0.3)
    time.sleep(0.4)  # Serve cancels the request in the ingress, then in the replica
    after = _busy_cpu_seconds(replica, 0.8)
    assert after < 0.15 < decoding, (decoding, after)  # the replica went idle
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
