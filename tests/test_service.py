"""The REST service without Ray: uvicorn in a thread over a tiny random LLaVA."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import ClassVar

import httpx
import openai
import pytest
from PIL import Image
from pydantic import Field
from service_helpers import (
    BAD_REQUESTS,
    chat_body,
    chat_sample,
    data_url,
    metric_samples,
    png,
    uvicorn_server,
)

from lvlm_fix import LVLM, Generation, GenerationParams, Sample
from lvlm_fix.engine import Cancelled, EngineConfig, Request
from lvlm_fix.methods import REGISTRY, Contribution, Intervention, View
from lvlm_fix.model import Turn
from lvlm_fix.service import AsyncClient, Client, ServiceError
from lvlm_fix.service.app import build_app
from lvlm_fix.service.config import ServeConfig
from lvlm_fix.service.engine import Job, LocalEngine
from lvlm_fix.tiny import build_tiny

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONFIG = ServeConfig(
    api_key=KEY,
    max_image_bytes=50_000,
    max_image_pixels=256 * 256,
    max_prompt_chars=2000,
    max_tokens_limit=600,
    max_n=4,
    presets={
        "lvlm-fix+vhr": ({"name": "vhr"},),
        "lvlm-fix+ritual+vcd": ({"name": "ritual"}, {"name": "vcd"}),
    },
)


class TextContrast(Intervention):
    """A real views-based method, defined here because no method ships on this branch yet:
    contrast the image-conditioned logits against a text-only view."""

    name: ClassVar[str] = "test_text_contrast"
    hooks: ClassVar[frozenset] = frozenset({"views"})
    alpha: float = Field(1.0, ge=0, description="Contrast strength (0 = off).")

    def is_neutral(self) -> bool:
        return self.alpha == 0

    def contribute(self, model) -> Contribution:
        alpha = self.alpha
        view = View("text_only", weight=lambda t: -alpha, drop_image=True)
        return Contribution(views=(view,), base_weight=lambda t: alpha)


class Exclusive(Intervention):
    name: ClassVar[str] = "test_exclusive"
    hooks: ClassVar[frozenset] = frozenset({"views"})
    conflicts: ClassVar[frozenset[str]] = frozenset({"test_text_contrast"})
    strength: float = Field(0.0, ge=0, description="Unused strength (0 = off).")

    def is_neutral(self) -> bool:
        return self.strength == 0

    def contribute(self, model) -> Contribution:
        return Contribution()


@pytest.fixture(scope="module")
def lvlm(tmp_path_factory) -> LVLM:
    path = tmp_path_factory.mktemp("tiny") / "llava"
    build_tiny("llava", path)
    return LVLM.from_pretrained(path)


@pytest.fixture(scope="module")
def url(lvlm):
    with pytest.MonkeyPatch.context() as patch:  # the registry is restored afterwards
        patch.setitem(REGISTRY, TextContrast.name, TextContrast)
        patch.setitem(REGISTRY, Exclusive.name, Exclusive)
        with uvicorn_server(build_app(lvlm, CONFIG)) as base:
            yield base


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        yield client


def _solo(lvlm: LVLM, text: str, image: bytes | None, max_tokens: int = 6, interventions=()):
    """What a task route (/v1/vqa, /v1/caption) generates: the image, then the text."""
    import io

    from PIL import Image

    images = (Image.open(io.BytesIO(image)).convert("RGB"),) if image else ()
    params = GenerationParams(max_new_tokens=max_tokens)
    return lvlm.generate([Sample(text, images)], interventions, params)[0]


def _chat(lvlm: LVLM, text: str, image: bytes | None, max_tokens: int = 6, interventions=()):
    """What the chat route generates for `chat_body(text, image)`: parts in the order sent."""
    params = GenerationParams(max_new_tokens=max_tokens)
    return lvlm.generate([chat_sample(text, image)], interventions, params)[0]


def test_catalogue_routes(http, url):
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    ids = [card["id"] for card in http.get("/v1/models").json()["data"]]
    assert ids == ["lvlm-fix", "lvlm-fix+vhr", "lvlm-fix+ritual+vcd"]
    card = http.get("/v1/models/lvlm-fix+ritual+vcd").json()
    assert (card["parent"], card["root"]) == ("lvlm-fix", "lvlm-fix")
    assert card["interventions"] == [{"name": "ritual"}, {"name": "vcd"}]
    missing = http.get("/v1/models/gpt-4o")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    methods = {m["name"]: m for m in http.get("/v1/interventions").json()["data"]}
    assert set(methods) == set(REGISTRY)
    contrast = methods["test_text_contrast"]
    assert contrast["defaults"] == {"name": "test_text_contrast", "alpha": 1.0}
    assert contrast["schema"]["properties"]["alpha"]["description"].endswith("(0 = off).")
    assert "test_exclusive" not in contrast["composes_with"]
    assert methods["test_exclusive"]["conflicts"] == ["test_text_contrast"]
    assert http.get("/docs").status_code == 200
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/caption", "/v1/vqa", "/v1/interventions"} <= set(paths)


def test_chat_matches_in_process(http, lvlm):
    image = png()
    reply = http.post(
        "/v1/chat/completions", json=chat_body(image=image), headers={"X-Request-Id": "abc123"}
    )
    assert reply.status_code == 200
    assert reply.headers["x-request-id"] == "abc123"
    body = reply.json()
    expected = _chat(lvlm, "What is in the image?", image)
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected.text}
    assert choice["token_ids"] == expected.token_ids
    assert body["system_fingerprint"] == expected.config_id
    assert body["usage"]["prompt_tokens"] == expected.prompt_tokens
    assert body["usage"]["completion_tokens"] == len(expected.token_ids)


def test_n_choices_get_different_seeds(http):
    body = chat_body(image=png(), n=3, temperature=1.5, seed=7, max_tokens=8)
    first = http.post("/v1/chat/completions", json=body).json()
    again = http.post("/v1/chat/completions", json=body).json()
    tokens = [c["token_ids"] for c in first["choices"]]
    assert len(tokens) == 3 and len({tuple(t) for t in tokens}) > 1  # choices differ
    assert tokens == [c["token_ids"] for c in again["choices"]]  # and a seed reproduces them


def test_caption_and_vqa_json_multipart_and_client(http, url, lvlm):
    image = png(color="red")
    expected = _solo(lvlm, "Is there a cat?", image)
    as_json = http.post(
        "/v1/vqa",
        json={
            "image": base64.b64encode(image).decode(),
            "question": "Is there a cat?",
            "max_tokens": 6,
        },
    ).json()
    as_form = http.post(
        "/v1/vqa",
        files={"image": ("a.png", image, "image/png")},
        data={"question": "Is there a cat?", "max_tokens": "6", "interventions": "[]"},
    ).json()
    assert as_json["text"] == as_form["text"] == expected.text
    assert as_json["object"] == "vqa" and as_json["token_ids"] == expected.token_ids
    with Client(url, api_key=KEY) as client:
        assert client.vqa(image, "Is there a cat?", max_tokens=6) == expected
        caption = client.caption(image, max_tokens=6)
        assert caption == _solo(lvlm, "Please describe this image in detail.", image)
        [chat] = client.chat("Is there a cat?", image, max_tokens=6)
        assert chat == _chat(lvlm, "Is there a cat?", image)


def test_async_client(url, lvlm):
    image = png(color="green")

    async def run():
        async with AsyncClient(url, api_key=KEY) as client:
            answer = await client.vqa(image, "Color?", max_tokens=5)
            pieces = [piece async for piece in client.stream("Color?", image, max_tokens=5)]
            return answer, pieces

    answer, pieces = asyncio.run(run())
    assert answer == _solo(lvlm, "Color?", image, max_tokens=5)
    assert "".join(pieces) == _chat(lvlm, "Color?", image, max_tokens=5).text


def test_streaming_sse(http, url, lvlm):
    image = png(color="yellow")
    body = chat_body(image=image, stream=True, stream_options={"include_usage": True})
    with http.stream("POST", "/v1/chat/completions", json=body) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert '"role":"assistant"' in lines[0]
    assert '"finish_reason":"length"' in lines[-3] and '"usage"' in lines[-2]
    expected = _chat(lvlm, "What is in the image?", image)
    with Client(url, api_key=KEY) as client:
        assert "".join(client.stream("What is in the image?", image, max_tokens=6)) == expected.text


def test_interventions_per_request(http, lvlm):
    image = png(color="white")
    catalogue = http.get("/v1/interventions").json()["data"]
    for spec in [m["defaults"] for m in catalogue if m["defaults"]]:  # every method, generically
        name = spec["name"]
        body = http.post("/v1/chat/completions", json=chat_body(image=image, interventions=[spec]))
        assert body.status_code == 200, body.text
        expected = _chat(lvlm, "What is in the image?", image, interventions=[spec])
        assert body.json()["choices"][0]["token_ids"] == expected.token_ids, name
        assert body.json()["system_fingerprint"] == lvlm.plan([spec]).config_id
    bad_param = http.post(
        "/v1/chat/completions",
        json=chat_body(interventions=[{"name": "test_text_contrast", "alpha": -1}]),
    ).json()
    assert "test_text_contrast" in bad_param["error"]["message"]
    assert "alpha" in bad_param["error"]["message"]
    both = [{"name": "test_text_contrast"}, {"name": "test_exclusive", "strength": 1}]
    conflict = http.post("/v1/chat/completions", json=chat_body(interventions=both))
    assert conflict.status_code == 400
    assert "'test_exclusive' and 'test_text_contrast'" in conflict.json()["error"]["message"]
    extra = metric_samples(http.get("/metrics").text, "lvlm_fix:extra_forward_rows_total")
    assert extra['{method="test_text_contrast",model_name="lvlm-fix"}'] >= 1


def test_pruned_image_tokens_are_counted_per_method(http, lvlm):
    """A FastV request's pruned image tokens reach /metrics under its method."""
    name = "lvlm_fix:pruned_image_tokens_total"
    key = '{method="fastv",model_name="lvlm-fix"}'
    before = metric_samples(http.get("/metrics").text, name).get(key, 0)
    fastv = [{"name": "fastv", "layer": 1, "keep": 4}]
    reply = http.post("/v1/chat/completions", json=chat_body(image=png(), interventions=fastv))
    assert reply.status_code == 200, reply.text
    expected = _chat(lvlm, "What is in the image?", png(), interventions=fastv)
    after = metric_samples(http.get("/metrics").text, name)[key]
    assert expected.image_tokens_pruned > 0
    assert after - before == expected.image_tokens_pruned


@pytest.mark.parametrize("route,body,status,words", BAD_REQUESTS, ids=lambda v: str(v)[:24])
def test_bad_input_gets_4xx(http, route, body, status, words):
    reply = http.post(route, json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


def test_bad_json_auth_and_upload(url, http):
    assert httpx.post(f"{url}/v1/chat/completions", json=chat_body()).status_code == 401
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer no"}).status_code == 401
    broken = http.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert broken.status_code == 400 and "JSON" in broken.json()["error"]["message"]
    upload = http.post("/v1/caption", files={"image": ("x.png", b"garbage", "image/png")})
    assert upload.status_code == 400
    assert http.get("/v1/nowhere").status_code == 404
    with pytest.raises(ServiceError, match="unknown intervention"), Client(url, KEY) as client:
        client.caption(png(), interventions=[{"name": "no_such"}])
    assert http.post("/v1/chat/completions", json=chat_body(image=png())).status_code == 200


def test_openai_sdk(url, lvlm):
    image = png(color="purple")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
    body = chat_body(image=image)
    reply = client.chat.completions.create(
        model="lvlm-fix", messages=body["messages"], max_tokens=6, extra_body={"interventions": []}
    )
    expected = _chat(lvlm, "What is in the image?", image)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.completion_tokens == len(expected.token_ids)
    stream = client.chat.completions.create(
        model="lvlm-fix", messages=body["messages"], max_tokens=6, stream=True
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(pieces) == expected.text
    with pytest.raises(openai.BadRequestError, match="unknown intervention"):
        client.chat.completions.create(
            model="lvlm-fix",
            messages=body["messages"],
            extra_body={"interventions": [{"name": "no_such"}]},
        )


def test_health_responsive_while_generating(url, http):
    body = chat_body(image=png(), max_tokens=64, n=4, temperature=1.0)
    worker = threading.Thread(target=lambda: http.post("/v1/chat/completions", json=body))
    worker.start()
    during = []  # latencies of /health calls answered while the generation was still running
    with httpx.Client(base_url=url, timeout=5) as probe:
        while worker.is_alive():
            start = time.perf_counter()
            assert probe.get("/health").status_code == 200
            if worker.is_alive():
                during.append(time.perf_counter() - start)
            time.sleep(0.01)
    worker.join()
    assert during, "generation finished before /health could be asked"
    assert max(during) < 1.0


def _metric(text: str, name: str, labels: str = '{model_name="lvlm-fix"}') -> float:
    return metric_samples(text, "lvlm_fix:" + name).get(labels, 0.0)


def test_metrics_count_as_vllm_does(http, url):
    m = lambda: http.get("/metrics").text  # noqa: E731
    before = m()
    long = dict(max_tokens=24, temperature=2, seed=LONG_STREAM_SEED)  # runs to max_tokens
    reply = http.post("/v1/chat/completions", json=chat_body(image=png(), **long)).json()
    assert reply["choices"][0]["finish_reason"] == "length"
    after = m()
    grew = lambda name, labels='{model_name="lvlm-fix"}': (  # noqa: E731
        _metric(after, name, labels) - _metric(before, name, labels)
    )
    for histogram in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert grew(f"{histogram}_seconds_count") == 1, histogram
    for histogram in ("request_prefill_time", "request_decode_time"):
        assert grew(f"{histogram}_seconds_count") == 1, histogram
    assert grew("inter_token_latency_seconds_count") == 24 - 1  # between 24 decode steps
    assert grew("prompt_tokens_total") == reply["usage"]["prompt_tokens"]
    assert grew("generation_tokens_total") == 24
    success = '{finished_reason="length",model_name="lvlm-fix"}'
    assert grew("request_success_total", success) == 1
    ttft, e2e = grew("time_to_first_token_seconds_sum"), grew("e2e_request_latency_seconds_sum")
    decode = grew("request_decode_time_seconds_sum")
    assert 0 < ttft < e2e and decode > 0 and ttft + decode <= e2e * 1.01

    # A stream's end-to-end latency runs to its last byte, not to its headers.
    body = chat_body(image=png(), stream=True, **{**long, "max_tokens": 48})
    with http.stream("POST", "/v1/chat/completions", json=body) as stream:
        lines = stream.iter_lines()
        next(lines)
        first = time.perf_counter()
        list(lines)
        reading = time.perf_counter() - first
    streamed = m()
    e2e = _metric(streamed, "e2e_request_latency_seconds_sum") - _metric(
        after, "e2e_request_latency_seconds_sum"
    )
    assert e2e >= reading > 0, (e2e, reading)
    assert (
        _metric(streamed, "time_to_first_token_seconds_count")
        == _metric(after, "time_to_first_token_seconds_count") + 1
    )

    # The model id asked for is the label: a preset's requests are counted under its id.
    http.post("/v1/chat/completions", json=chat_body(model="lvlm-fix+vhr", max_tokens=2))
    preset = '{model_name="lvlm-fix+vhr"}'
    assert _metric(m(), "e2e_request_latency_seconds_count", preset) == 1

    errors = metric_samples(m(), "lvlm_fix:request_errors_total")
    assert errors['{code="400",model_name="lvlm-fix"}'] >= 1


def test_running_and_waiting_gauges(http, url):
    """Two long requests decode together in the engine: both count as running at once."""
    body = chat_body(image=png(), max_tokens=64, temperature=2, seed=LONG_STREAM_SEED)
    seen = set()
    with ThreadPoolExecutor(2) as pool:
        replies = [pool.submit(http.post, "/v1/chat/completions", json=body) for _ in range(2)]
        while not all(reply.done() for reply in replies):
            text = http.get("/metrics").text
            seen.add((_metric(text, "num_requests_running"), _metric(text, "num_requests_waiting")))
            time.sleep(0.02)
    assert all(reply.result().status_code == 200 for reply in replies)
    assert (2, 0) in seen, seen
    text = http.get("/metrics").text
    assert _metric(text, "num_requests_running") == _metric(text, "num_requests_waiting") == 0


def test_serve_settings_merge_yaml_and_flags(tmp_path):
    import argparse

    from lvlm_fix.cli import add_model_args
    from lvlm_fix.service.deployment import AppArgs
    from lvlm_fix.service.launch import _settings, add_serve_args

    config = tmp_path / "serve.yaml"
    config.write_text(
        "address: auto\nport: 9000\nnum_replicas: 2\ndevice: cuda\n"
        "engine: {slots: 4, max_len: 512}\nservice: {api_key: k, max_n: 2}\n"
    )
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    add_serve_args(parser)
    args = parser.parse_args(["--config", str(config), "--slots", "16", "--replicas", "3"])
    settings = _settings(args)
    assert (settings.pop("address"), settings.pop("host"), settings.pop("port")) == (
        "auto",
        "127.0.0.1",
        9000,
    )
    app = AppArgs.model_validate(settings)
    assert (app.num_replicas, app.device) == (3, "cuda")
    assert app.engine.config() == EngineConfig(slots=16, max_len=512)
    assert app.service.api_key == "k" and app.service.max_n == 2
    bad = parser.parse_args(["--intervention", "no_such"])
    with pytest.raises(ValueError, match="unknown intervention 'no_such'"):
        _settings(bad)


LONG_STREAM_SEED = 0  # sampled at temperature 2, this request runs to max_tokens (no EOS)
# Sampled at temperature 2, this request runs to max_tokens=600 (no EOS): seconds of decoding.
LONG = {"image": png(), "max_tokens": 600, "temperature": 2, "seed": 5}


@pytest.fixture
def engine_requests(lvlm, monkeypatch) -> SimpleNamespace:
    """What the service submits to the model's engine from now on, watched, not changed: its
    requests, and the engine's running count at each of their events."""
    seen = SimpleNamespace(requests=[], running=[])
    submit = lvlm.submit

    def watched(samples, *args, listener=None, **kwargs) -> Request:
        def listen(event):
            seen.running.append(lvlm.engine.running)  # on the engine's thread: a consistent count
            if listener is not None:
                listener(event)

        request = submit(samples, *args, listener=listen, **kwargs)
        seen.requests.append(request)
        return request

    monkeypatch.setattr(lvlm, "submit", watched)
    return seen


def _decoding(reply: httpx.Response) -> Iterator[str]:
    """Read a stream's role chunk and first text: its request is decoding in the engine. Keep
    the lines returned: dropping them closes the connection (the client leaves)."""
    lines = (line for line in reply.iter_lines() if line)
    next(lines)
    next(lines)
    return lines


@pytest.mark.parametrize(
    "specs",
    [[{"name": "ritual"}], [{"name": "var"}, {"name": "vhr"}, {"name": "pai"}]],
    ids=["ritual", "var+vhr+pai"],
)
def test_different_interventions_decode_together(http, lvlm, engine_requests, specs):
    """A short request with interventions is served while a long plain stream decodes, beside
    it in the engine, and gets the tokens it gets alone."""
    image = png(color="olive")
    with http.stream("POST", "/v1/chat/completions", json=chat_body(stream=True, **LONG)) as long:
        lines = _decoding(long)
        reply = http.post("/v1/chat/completions", json=chat_body(image=image, interventions=specs))
        [stream, _] = engine_requests.requests
        assert not stream.done  # still decoding once the other request was answered
        assert next(lines)  # and still streaming to its client
    assert max(engine_requests.running) == 2
    assert reply.status_code == 200, reply.text
    expected = _chat(lvlm, "What is in the image?", image, interventions=specs)
    assert reply.json()["choices"][0]["token_ids"] == expected.token_ids


def test_client_leaving_mid_stream_frees_the_engine(http, lvlm, engine_requests):
    with http.stream("POST", "/v1/chat/completions", json=chat_body(stream=True, **LONG)) as long:
        _decoding(long)
    # The client is gone: the service cancels the request, which leaves the engine at its next
    # step, long before its 600 tokens.
    [request] = engine_requests.requests
    with pytest.raises(Cancelled):
        request.result(timeout=60)
    assert lvlm.engine.running == lvlm.engine.waiting == 0
    assert http.post("/v1/chat/completions", json=chat_body(max_tokens=4)).status_code == 200


def test_ready_once_the_model_is_loaded(url):
    reply = httpx.get(f"{url}/ready")
    assert reply.status_code == 200 and reply.json() == {"status": "ready"}


# ---- OpenAI / vLLM compatibility -----------------------------------------------------------


def lmms_eval_payload(model: str, question: str, image: bytes) -> dict:
    """What lmms-eval's `openai_compatible` backend sends (lmms_eval/models/simple/
    openai_compatible.py): the question, then each image as a PNG data URL, in one user turn;
    model, max_tokens and temperature (0 unless the task says otherwise), nothing else."""
    content = [{"type": "text", "text": question}]
    content.append({"type": "image_url", "image_url": {"url": data_url(image)}})
    return {
        "messages": [{"role": "user", "content": content}],
        "model": model,
        "max_tokens": 8,
        "temperature": 0,
    }


def test_presets_are_model_ids_for_lmms_eval(url, lvlm):
    image = png(color="orange")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
    assert [m.id for m in client.models.list()] == [
        "lvlm-fix",
        "lvlm-fix+vhr",
        "lvlm-fix+ritual+vcd",
    ]
    for model, specs in [
        ("lvlm-fix", []),
        ("lvlm-fix+vhr", [{"name": "vhr"}]),
        ("lvlm-fix+ritual+vcd", [{"name": "ritual"}, {"name": "vcd"}]),
    ]:
        reply = client.chat.completions.create(**lmms_eval_payload(model, "Is there a cup?", image))
        expected = _chat(lvlm, "Is there a cup?", image, 8, specs)
        assert reply.model == model
        assert reply.system_fingerprint == lvlm.plan(specs).config_id == expected.config_id
        assert reply.choices[0].message.content == expected.text, model
    # A request's own interventions still win over its model id's preset.
    override = client.chat.completions.create(
        **lmms_eval_payload("lvlm-fix+vhr", "Is there a cup?", image),
        extra_body={"interventions": []},
    )
    assert override.system_fingerprint == lvlm.plan([]).config_id
    with pytest.raises(openai.NotFoundError, match="does not exist") as error:
        client.chat.completions.create(**lmms_eval_payload("gpt-4o", "Is there a cup?", image))
    assert error.value.code == "model_not_found"


def test_presets_are_checked_at_startup(lvlm):
    config = ServeConfig(presets={"lvlm-fix+bad": ({"name": "vhr", "alpha": -1},)})
    with pytest.raises(ValueError, match="model id 'lvlm-fix\\+bad'.*alpha"):
        build_app(lvlm, config)
    with pytest.raises(ValueError, match="model_name's own id"):
        ServeConfig(presets={"lvlm-fix": ()})


def test_multi_turn_chat_through_the_template(http, lvlm):
    image = png(color="pink")
    messages = [
        {"role": "developer", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(image)}},
                {"type": "text", "text": "What is it?"},
            ],
        },
        {"role": "assistant", "content": "a square"},
        {"role": "user", "content": "And its color?"},
    ]
    reply = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 6})
    assert reply.status_code == 200, reply.text
    # The tiny template has no system role: the system text opens the first user turn.
    chat = (
        Turn("user", ("Answer briefly.\n", None, "What is it?")),
        Turn("assistant", ("a square",)),
        Turn("user", ("And its color?",)),
    )
    pil = Image.open(io.BytesIO(image)).convert("RGB")
    sample = Sample("And its color?", (pil,), chat=chat)
    prompt = sample.prompt(lvlm.processor)
    assert prompt == (
        "USER: Answer briefly.\n<image>\nWhat is it? ASSISTANT: a square</s>"
        "USER: And its color? ASSISTANT:"
    )
    [expected] = lvlm.generate([sample], (), GenerationParams(max_new_tokens=6))
    assert reply.json()["choices"][0]["token_ids"] == expected.token_ids
    assert reply.json()["usage"]["prompt_tokens"] == expected.prompt_tokens


def test_neutral_values_of_unimplemented_fields_are_accepted(http):
    plain = http.post("/v1/chat/completions", json=chat_body(image=png())).json()
    neutral = {
        "response_format": {"type": "text"},
        "tool_choice": "none",
        "tools": [],
        "parallel_tool_calls": False,
        "user": "someone",
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "logit_bias": {},
        "top_k": -1,
        "min_tokens": 0,
        "ignore_eos": False,
        "stop_token_ids": [],
        "repetition_penalty": 1.0,
        "length_penalty": 1.0,
        "best_of": 1,
    }
    reply = http.post("/v1/chat/completions", json=chat_body(image=png(), **neutral))
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["token_ids"] == plain["choices"][0]["token_ids"]


def test_vllm_stop_extras_as_in_process(http, lvlm):
    image = png(color="orange")
    plain = http.post("/v1/chat/completions", json=chat_body(image=image, max_tokens=8)).json()
    ids = plain["choices"][0]["token_ids"]
    first = ids[0]
    later = next(token for token in ids if token != first)
    cut = http.post(
        "/v1/chat/completions", json=chat_body(image=image, max_tokens=8, stop_token_ids=[later])
    ).json()
    assert cut["choices"][0]["token_ids"] == ids[: ids.index(later)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    for extras in [{"min_tokens": 4, "stop_token_ids": [first]}, {"ignore_eos": True}]:
        body = chat_body(image=image, max_tokens=8, **extras)
        reply = http.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        params = GenerationParams(max_new_tokens=8, **extras)
        [expected] = lvlm.generate([chat_sample("What is in the image?", image)], (), params)
        [got] = reply.json()["choices"]
        assert got["token_ids"] == expected.token_ids
        assert got["message"]["content"] == expected.text
    vocab = lvlm.info.vocab_size
    outside = http.post("/v1/chat/completions", json=chat_body(stop_token_ids=[5, vocab]))
    assert outside.status_code == 400 and outside.json()["error"]["param"] == "stop_token_ids"
    many = http.post("/v1/chat/completions", json=chat_body(min_tokens=7))
    assert many.status_code == 400 and many.json()["error"]["param"] == "min_tokens"


def test_logprobs_from_the_combined_scores(http, lvlm):
    image = png(color="gray")
    body = chat_body(image=image, logprobs=True, top_logprobs=3, max_tokens=5)
    for specs in ([], [{"name": "test_text_contrast", "alpha": 2.0}]):
        reply = http.post("/v1/chat/completions", json={**body, "interventions": specs}).json()
        [choice] = reply["choices"]
        params = GenerationParams(max_new_tokens=5, logprobs=3)
        [expected] = lvlm.generate([chat_sample("What is in the image?", image)], specs, params)
        content = choice["logprobs"]["content"]
        assert len(content) == len(choice["token_ids"]) == len(expected.logprobs)
        steps = zip(content, choice["token_ids"], expected.logprobs, strict=True)
        for entry, token_id, step in steps:
            assert entry["logprob"] == pytest.approx(step.logprob, abs=1e-5)
            assert entry["token"] == lvlm.processor.tokenizer.decode([token_id])
            assert entry["bytes"] == list(entry["token"].encode())
            assert len(entry["top_logprobs"]) == 3
            # Greedy: the chosen token is the most likely one of the scores it was chosen from.
            assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])
    refused = http.post(
        "/v1/chat/completions",
        json={**body, "use_beam_search": True, "best_of": 2},
    )
    assert refused.status_code == 400 and "logprobs" in refused.json()["error"]["message"]


def test_beam_search_as_vllm(http, lvlm):
    image = png(color="cyan")
    body = chat_body(image=image, use_beam_search=True, best_of=3, length_penalty=0.5)
    reply = http.post("/v1/chat/completions", json=body).json()
    params = GenerationParams(max_new_tokens=6, num_beams=3, length_penalty=0.5)
    [expected] = lvlm.generate([chat_sample("What is in the image?", image)], (), params)
    assert reply["choices"][0]["token_ids"] == expected.token_ids


def test_a_stream_that_fell_behind_catches_up_in_fewer_pieces(lvlm):
    """LocalEngine joins the text pieces that queued while its reader was away into one; the
    text is the same, and a reader that keeps up gets one piece per token with text."""
    params = GenerationParams(max_new_tokens=24, ignore_eos=True)
    job = Job((Sample("describe this", ()),), lvlm.plan((), params), params)
    engine = LocalEngine(lvlm)

    async def read(pause: float) -> list:
        items = []
        async for item in engine.stream(job):
            if not items:
                await asyncio.sleep(pause)  # the engine decodes on meanwhile
            items.append(item)
        return items

    runs = asyncio.run(read(0.0)), asyncio.run(read(2.0))  # kept up, fell behind
    pieces = [[item for item in items if isinstance(item, str)] for items in runs]
    finals = [next(item for item in items if isinstance(item, Generation)) for items in runs]
    assert finals[0] == finals[1] and "".join(pieces[0]) == "".join(pieces[1]) == finals[0].text
    assert len(finals[0].token_ids) == 24
    assert len(pieces[1]) < len(pieces[0]) / 2, (pieces[0], pieces[1])
