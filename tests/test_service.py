"""The REST service without Ray: uvicorn in a thread over a tiny random LLaVA."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from typing import ClassVar

import httpx
import openai
import pytest
from pydantic import Field
from service_helpers import (
    BAD_REQUESTS,
    chat_body,
    metric_samples,
    png,
    uvicorn_server,
)

from lvlm_fix import LVLM, GenerationParams, Sample
from lvlm_fix.methods import REGISTRY, Contribution, Intervention, View
from lvlm_fix.service import AsyncClient, Client, ServiceError
from lvlm_fix.service.app import build_app
from lvlm_fix.service.config import ServeConfig
from lvlm_fix.tiny import build_tiny

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONFIG = ServeConfig(
    api_key=KEY,
    max_image_bytes=50_000,
    max_image_pixels=256 * 256,
    max_prompt_chars=2000,
    max_tokens_limit=64,
    max_n=4,
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
    import io

    from PIL import Image

    images = (Image.open(io.BytesIO(image)).convert("RGB"),) if image else ()
    params = GenerationParams(max_new_tokens=max_tokens)
    return lvlm.generate([Sample(text, images)], interventions, params)[0]


def test_catalogue_routes(http, url):
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert http.get("/v1/models").json()["data"][0]["id"] == "lvlm-fix"
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
    expected = _solo(lvlm, "What is in the image?", image)
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
        assert chat == expected


def test_async_client(url, lvlm):
    image = png(color="green")

    async def run():
        async with AsyncClient(url, api_key=KEY) as client:
            answer = await client.vqa(image, "Color?", max_tokens=5)
            pieces = [piece async for piece in client.stream("Color?", image, max_tokens=5)]
            return answer, pieces

    answer, pieces = asyncio.run(run())
    assert answer == _solo(lvlm, "Color?", image, max_tokens=5)
    assert "".join(pieces).strip() == answer.text


def test_streaming_sse(http, url, lvlm):
    image = png(color="yellow")
    body = chat_body(image=image, stream=True, stream_options={"include_usage": True})
    with http.stream("POST", "/v1/chat/completions", json=body) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert '"role":"assistant"' in lines[0]
    assert '"finish_reason":"length"' in lines[-3] and '"usage"' in lines[-2]
    expected = _solo(lvlm, "What is in the image?", image)
    with Client(url, api_key=KEY) as client:
        assert "".join(client.stream("What is in the image?", image, max_tokens=6)) == expected.text


def test_interventions_per_request(http, lvlm):
    image = png(color="white")
    catalogue = http.get("/v1/interventions").json()["data"]
    for spec in [m["defaults"] for m in catalogue if m["defaults"]]:  # every method, generically
        name = spec["name"]
        body = http.post("/v1/chat/completions", json=chat_body(image=image, interventions=[spec]))
        assert body.status_code == 200, body.text
        expected = _solo(lvlm, "What is in the image?", image, interventions=[spec])
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
    extra = metric_samples(http.get("/metrics").text, "lvlm_extra_forward_rows_total")
    assert extra['{method="test_text_contrast"}'] >= 1


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
    expected = _solo(lvlm, "What is in the image?", image)
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


def test_metrics(http):
    text = http.get("/metrics").text
    assert metric_samples(text, "lvlm_errors_total")['{code="400"}'] >= 1
    assert metric_samples(text, "lvlm_errors_total")['{code="422"}'] >= 1
    assert metric_samples(text, "lvlm_time_to_first_token_seconds_count")[""] >= 1
    assert metric_samples(text, "lvlm_tokens_per_second_count")[""] >= 1
    assert metric_samples(text, "lvlm_batch_size_count")[""] >= 1
    assert metric_samples(text, "lvlm_queue_depth")[""] == 0
    latency = metric_samples(text, "lvlm_request_latency_seconds_count")
    assert latency['{route="/v1/chat/completions"}'] >= 1


def test_serve_settings_merge_yaml_and_flags(tmp_path):
    import argparse

    from lvlm_fix.cli import add_model_args
    from lvlm_fix.service.deployment import AppArgs
    from lvlm_fix.service.launch import _settings, add_serve_args

    config = tmp_path / "serve.yaml"
    config.write_text(
        "address: auto\nport: 9000\nnum_replicas: 2\ndevice: cuda\n"
        "batch: {max_batch_size: 4}\nservice: {api_key: k, max_n: 2}\n"
    )
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    add_serve_args(parser)
    args = parser.parse_args(["--config", str(config), "--batch-wait-ms", "5", "--replicas", "3"])
    settings = _settings(args)
    assert (settings.pop("address"), settings.pop("host"), settings.pop("port")) == (
        "auto",
        "127.0.0.1",
        9000,
    )
    app = AppArgs.model_validate(settings)
    assert (app.num_replicas, app.device, app.batch.max_batch_size, app.batch.batch_wait_ms) == (
        3,
        "cuda",
        4,
        5.0,
    )
    assert app.service.api_key == "k" and app.service.max_n == 2
    bad = parser.parse_args(["--intervention", "no_such"])
    with pytest.raises(ValueError, match="unknown intervention 'no_such'"):
        _settings(bad)


class StepCounter(Intervention):
    """Counts the model's forwards (one per decode step) at decoder layer 0's input."""

    name: ClassVar[str] = "test_step_counter"
    hooks: ClassVar[frozenset] = frozenset({"layer_input"})
    forwards: ClassVar[list[int]] = [0]

    def contribute(self, model) -> Contribution:
        def count(layer, hidden, ctx) -> None:
            if layer == 0:
                StepCounter.forwards[0] += 1

        return Contribution(layer_input=count)


LONG_STREAM_SEED = 0  # sampled at temperature 2, this request runs to max_tokens (no EOS)


def test_abandoned_stream_stops_decoding(http, monkeypatch):
    monkeypatch.setitem(REGISTRY, StepCounter.name, StepCounter)
    body = chat_body(
        image=png(),
        stream=True,
        max_tokens=64,
        temperature=2,
        seed=LONG_STREAM_SEED,
        interventions=[{"name": StepCounter.name}],
    )
    with http.stream("POST", "/v1/chat/completions", json=body) as reply:
        lines = (line for line in reply.iter_lines() if line)
        next(lines)  # the role chunk
        next(lines)  # the first piece of text: decoding is under way
        at_close = StepCounter.forwards[0]
    # The client is gone: the stream's worker stops at its next step, and the next request
    # has the model to itself at once.
    start = time.perf_counter()
    assert http.post("/v1/chat/completions", json=chat_body(max_tokens=4)).status_code == 200
    assert time.perf_counter() - start < 2.0
    time.sleep(0.3)
    assert StepCounter.forwards[0] - at_close <= 2, "the abandoned stream kept decoding"


def test_ready_once_the_model_is_loaded(url):
    reply = httpx.get(f"{url}/ready")
    assert reply.status_code == 200 and reply.json() == {"status": "ready"}
