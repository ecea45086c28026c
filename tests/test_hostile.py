"""The service against hostile clients: each test talks to a real uvicorn server on 127.0.0.1
over a tiny random LLaVA (and, for image URLs, to real local HTTP servers; never elsewhere)."""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import httpx
import pytest
import torch
from safetensors.torch import save_file
from service_helpers import chat_body, chat_sample, png, uvicorn_server

from lvlm_fix import LVLM
from lvlm_fix.methods import REGISTRY, Contribution, Intervention, View
from lvlm_fix.params import GenerationParams
from lvlm_fix.plan import compile_plan
from lvlm_fix.service.app import build_app
from lvlm_fix.service.config import ServeConfig
from lvlm_fix.service.serving import PromptCounter
from lvlm_fix.tiny import build_tiny

KEY = "hostile-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def lvlm(tmp_path_factory) -> LVLM:
    path = tmp_path_factory.mktemp("tiny") / "llava"
    build_tiny("llava", path)
    return LVLM.from_pretrained(path)


@contextmanager
def serve(lvlm: LVLM, **settings):
    """A server over `lvlm`; yields an httpx client that sends the API key."""
    config = ServeConfig(api_key=KEY, max_request_bytes=1 << 20, **settings)
    with (
        uvicorn_server(build_app(lvlm, config)) as base,
        httpx.Client(base_url=base, headers=AUTH, timeout=60) as client,
    ):
        yield client


def chat(client: httpx.Client, **body) -> httpx.Response:
    return client.post("/v1/chat/completions", json={**chat_body(image=png()), **body})


def url_body(url: str) -> dict:
    image = {"type": "image_url", "image_url": {"url": url}}
    content = [{"type": "text", "text": "What is it?"}, image]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2}


# ---- local image servers ---------------------------------------------------------------------


class ImageHandler(BaseHTTPRequestHandler):
    """/img.png, /big.png, /slow.png (about 3 s), /to?url=U (302 to U), /loop (302 to itself)."""

    image = png(32, 32)

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path.startswith("/to?url="):
            return self._redirect(self.path.removeprefix("/to?url="))
        if self.path == "/loop":
            return self._redirect("/loop")
        data = bytes(2 << 20) if self.path == "/big.png" else self.image
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        if self.path == "/slow.png":
            for i in range(0, len(data), 10):
                self.wfile.write(data[i : i + 10])
                self.wfile.flush()
                time.sleep(3 / (len(data) / 10))
        else:
            self.wfile.write(data)

    def _redirect(self, location: str):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@contextmanager
def image_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# ---- 1. image shape bombs, and image work off the event loop ----------------------------------


def test_thin_image_refused_before_decoding(lvlm):
    thin = png(1, 40_000)  # a few hundred bytes; the processor's resize would make it GBs
    with serve(lvlm) as client:
        start = time.perf_counter()
        reply = client.post("/v1/chat/completions", json=chat_body(image=thin))
        elapsed = time.perf_counter() - start
    assert reply.status_code == 400, reply.text
    assert "long side may be at most 20 times its short side" in reply.json()["error"]["message"]
    assert elapsed < 2.0


def test_health_answers_while_an_image_url_is_slow(lvlm):
    with (
        image_server() as host,
        serve(lvlm, allow_image_urls=True, image_url_allow_hosts=(host,)) as client,
    ):
        result = {}
        worker = threading.Thread(
            target=lambda: result.update(
                reply=client.post("/v1/chat/completions", json=url_body(f"http://{host}/slow.png"))
            )
        )
        worker.start()
        time.sleep(0.3)
        during = []
        with httpx.Client(base_url=str(client.base_url), timeout=5) as probe:
            while worker.is_alive():
                start = time.perf_counter()
                assert probe.get("/health").status_code == 200
                during.append(time.perf_counter() - start)
                time.sleep(0.05)
        worker.join()
    assert result["reply"].status_code == 200, result["reply"].text
    assert len(during) > 5 and max(during) < 0.5, during


# ---- 2. no client-chosen server paths ---------------------------------------------------------


def test_dyvte_router_is_a_registered_name_not_a_path(lvlm, tmp_path):
    info = lvlm.info
    router = tmp_path / "router.safetensors"
    hidden = 8
    save_file(
        {
            "w1": torch.randn(info.num_layers, hidden, 2 * info.hidden_size),
            "w2": torch.randn(info.num_layers, 2, hidden),
        },
        str(router),
    )
    with serve(lvlm, dyvte_routers={"mine": str(router)}) as client:
        named = chat(client, interventions=[{"name": "dyvte", "router": "mine"}])
        existing = chat(client, interventions=[{"name": "dyvte", "router": str(router)}])
        missing = chat(client, interventions=[{"name": "dyvte", "router": "/no/such/file"}])
        auto = chat(client, interventions=[{"name": "dyvte", "router": "auto"}])
    assert named.status_code == 200, named.text
    assert existing.status_code == missing.status_code == auto.status_code == 400
    assert existing.json() == missing.json() == auto.json()
    message = existing.json()["error"]["message"]
    assert "must be one of this server's routers: ['mine']" in message
    assert str(tmp_path) not in message


# ---- 3. errors: 4xx for the client's mistakes, 500 without details ---------------------------


def nested(depth: int) -> bytes:
    return b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"


RAW_BODIES = [
    (nested(100_000), "nested too deeply"),
    (json.dumps(chat_body(temperature=float("nan"))).encode(), "NaN is not a JSON value"),
    (json.dumps(chat_body(top_p=float("inf"))).encode(), "Infinity is not a JSON value"),
    (json.dumps(chat_body()).replace('"max_tokens": 6', '"max_tokens": 1e999').encode(), "1e999"),
    (json.dumps(chat_body(seed=10**30)).encode(), "too large"),
    (json.dumps(chat_body(seed=7)).replace('"seed": 7', '"seed": ' + "9" * 5000).encode(), "large"),
]


@pytest.mark.parametrize("raw,words", RAW_BODIES, ids=lambda v: str(v)[:20])
def test_hostile_json_gets_400(lvlm, raw, words):
    with serve(lvlm) as client:
        reply = client.post(
            "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
        )
    assert reply.status_code == 400, reply.text
    assert words in reply.json()["error"]["message"]


def numeric_fields():
    """(method, field, schema) for every numeric field of every shipped method."""
    for name in sorted(REGISTRY):
        for field, schema in REGISTRY[name].model_json_schema()["properties"].items():
            options = schema.get("anyOf", [schema])
            for option in options:
                if option.get("type") in ("number", "integer"):
                    yield name, field, option


def test_every_intervention_field_is_bounded(lvlm):
    fields = list(numeric_fields())
    assert len(fields) > 30
    with serve(lvlm) as client:
        huge = chat(client, interventions=[{"name": "vhr", "alpha": 1e308}])
        assert huge.status_code == 400 and "alpha" in huge.json()["error"]["message"]
        for name, field, schema in fields:
            high = schema.get("maximum", schema.get("exclusiveMaximum"))
            low = schema.get("minimum", schema.get("exclusiveMinimum"))
            assert high is not None and low is not None, (name, field)
            spec = {"name": name, field: high * 10 + 1}
            reply = chat(client, interventions=[spec])
            assert reply.status_code == 400, (name, field, reply.text)
            assert field in reply.json()["error"]["message"], (name, field)


def test_stop_token_ids_are_bounded(lvlm):
    with serve(lvlm) as client:
        for ids in ([0] * 100_000, [2**62], [-(2**62)]):
            reply = chat(client, stop_token_ids=ids)
            assert reply.status_code == 400, reply.text
            assert reply.json()["error"]["param"] == "stop_token_ids"


class Exploding(Intervention):
    """A real view whose image function fails at run time, as a server fault would."""

    name: ClassVar[str] = "test_exploding"
    hooks: ClassVar[frozenset] = frozenset({"views"})

    def contribute(self, model) -> Contribution:
        def explode(image, generator):
            raise RuntimeError("secret detail at /srv/models/x.bin in pid 4242")

        return Contribution(views=(View("boom", weight=lambda t: 0.0, image_fn=explode),))


def test_internal_error_hides_its_detail(lvlm, caplog):
    with pytest.MonkeyPatch.context() as patch, serve(lvlm) as client:
        patch.setitem(REGISTRY, Exploding.name, Exploding)
        with caplog.at_level(logging.ERROR):
            reply = chat(client, interventions=[{"name": "test_exploding"}])
            streamed = chat(client, interventions=[{"name": "test_exploding"}], stream=True)
    assert reply.status_code == 500
    request_id = reply.headers["x-request-id"]
    assert reply.json()["error"]["message"] == f"internal error (request id {request_id})"
    assert reply.json()["error"]["type"] == "server_error"
    in_band = [line for line in streamed.text.splitlines() if '"error"' in line]
    assert len(in_band) == 1 and "internal error (request id" in in_band[0]
    for text in (reply.text, streamed.text):
        assert not any(word in text for word in ("RuntimeError", "secret", "/srv", "4242"))
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and "secret detail" in str(logged[0].exc_info[1])


# ---- 4. context length in tokens ---------------------------------------------------------------


def test_context_length_counted_in_tokens(lvlm):
    with serve(lvlm, max_prompt_chars=16_000) as client:
        fits = chat(client, max_tokens=4)
        long = chat(client, messages=chat_body("describe the picture " * 200)["messages"])
    assert fits.status_code == 200
    assert long.status_code == 400, long.text
    error = long.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "maximum context length is 1024 tokens" in error["message"]
    # The count matches what generation reports (image tokens included).
    counter = PromptCounter.load(lvlm.info)
    sample = chat_sample("What is in the image?", png())
    assert counter.count(sample) == fits.json()["usage"]["prompt_tokens"]


# ---- 5. the API key --------------------------------------------------------------------------


def test_api_key_checked_before_the_body(lvlm, monkeypatch):
    garbage = b"{" * (2 << 20)  # invalid, and twice the body limit
    with serve(lvlm) as client:
        anonymous = httpx.Client(base_url=str(client.base_url), timeout=30)
        refused = anonymous.post("/v1/chat/completions", content=garbage)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"] == "invalid_api_key"
        too_large = client.post("/v1/chat/completions", content=garbage)
        assert too_large.status_code == 413 and "exceeds" in too_large.json()["error"]["message"]
        for path in ("/metrics", "/docs", "/redoc", "/openapi.json", "/v1/models"):
            assert anonymous.get(path).status_code == 401, path
            assert client.get(path).status_code == 200, path
        assert anonymous.get("/health").status_code == 200
    monkeypatch.setenv("LVLM_FIX_API_KEY", "from-env")
    config = ServeConfig(public_docs=True, public_metrics=True)
    with uvicorn_server(build_app(lvlm, config)) as base:
        assert httpx.get(f"{base}/v1/models").status_code == 401
        with_key = {"Authorization": "Bearer from-env"}
        assert httpx.get(f"{base}/v1/models", headers=with_key).status_code == 200
        for path in ("/metrics", "/docs", "/redoc", "/openapi.json"):
            assert httpx.get(f"{base}{path}").status_code == 200, path


# ---- 6. image URLs ---------------------------------------------------------------------------


def test_image_urls_to_inner_addresses_are_refused(lvlm):
    with image_server() as allowed, image_server() as other:
        port = allowed.rpartition(":")[2]
        cases = {  # url -> expected status, words
            f"http://{other}/img.png": (400, "not a public address"),
            f"http://localhost:{port}/img.png": (400, "not a public address"),
            f"http://[::ffff:127.0.0.1]:{port}/img.png": (400, "not a public address"),
            f"http://{allowed}/img.png": (200, None),
            f"http://{allowed}/to?url=/img.png": (200, None),
            f"http://{allowed}/to?url=http://{other}/img.png": (400, "not a public address"),
            f"http://{allowed}/to?url=http://localhost:{port}/img.png": (400, "not a public"),
            f"http://{allowed}/loop": (400, "redirected more than 3 times"),
            f"http://{allowed}/big.png": (413, "exceeds"),
        }
        with serve(lvlm, allow_image_urls=True) as client:  # nothing allow-listed
            direct = client.post("/v1/chat/completions", json=url_body(f"http://{allowed}/img.png"))
            assert direct.status_code == 400, direct.text
            assert "not a public address" in direct.json()["error"]["message"]
        with serve(
            lvlm, allow_image_urls=True, image_url_allow_hosts=(allowed,), max_image_bytes=1 << 20
        ) as client:
            for url, (status, words) in cases.items():
                reply = client.post("/v1/chat/completions", json=url_body(url))
                assert reply.status_code == status, (url, reply.text)
                if words:
                    assert words in reply.json()["error"]["message"], url


# ---- 7. composes_with is what compile says ---------------------------------------------------


def test_composes_with_matches_compile(lvlm):
    with serve(lvlm) as client:
        catalogue = {m["name"]: m for m in client.get("/v1/interventions").json()["data"]}
    specs = {name: m["defaults"] for name, m in catalogue.items() if m["defaults"]}
    for a, b in itertools.combinations(sorted(specs), 2):
        listed = b in catalogue[a]["composes_with"]
        assert listed == (a in catalogue[b]["composes_with"]), (a, b)
        try:
            compile_plan([specs[a], specs[b]], lvlm.info, GenerationParams())
            compiles = True
        except ValueError:
            compiles = False
        assert listed == compiles, (a, b)
    assert "ritual" not in catalogue["opera"]["composes_with"]
    assert catalogue["dyvte"]["composes_with"] is None  # no router registered on this server
