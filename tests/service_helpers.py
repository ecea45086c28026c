"""Shared pieces of the service tests: images, request bodies, a uvicorn server in a thread."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from PIL import Image

from lvlm_fix import Sample
from lvlm_fix.model import Turn


def png(width: int = 40, height: int = 30, color: str = "blue") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def chat_sample(text: str, image: bytes | None = None, seed: int | None = None) -> Sample:
    """The in-process Sample of `chat_body(text, image)`: one user turn, text then image."""
    images = (Image.open(io.BytesIO(image)).convert("RGB"),) if image else ()
    turn = Turn("user", (text, None) if image else (text,))
    return Sample(text, images, seed, chat=(turn,))


def chat_body(text: str = "What is in the image?", image: bytes | None = None, **extra) -> dict:
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_url(image)}})
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 6, **extra}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def uvicorn_server(app) -> Iterator[str]:
    """Run `app` on 127.0.0.1:<free port> in a background thread; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def metric_samples(text: str, name: str) -> dict[str, float]:
    """`{labels: value}` of one metric in Prometheus text format."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key[len(name) :]] = float(value)
    return out


# Every class of bad input: (route, body or multipart files, expected status, words in message).
BAD_REQUESTS = [
    ("/v1/chat/completions", chat_body(image=b"not an image at all"), 400, "not an image"),
    ("/v1/chat/completions", chat_body(image=png(600, 600)), 413, "pixels"),
    ("/v1/chat/completions", chat_body(image=b"\x89PNG" + bytes(70_000)), 413, "bytes"),
    ("/v1/chat/completions", chat_body(text="x" * 3000), 400, "prompt is 3000 characters"),
    ("/v1/chat/completions", {**chat_body(), "max_tokens": 10_000}, 400, "max_tokens"),
    ("/v1/chat/completions", {**chat_body(), "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/chat/completions", {**chat_body(), "n": 50}, 400, "n=50"),
    ("/v1/chat/completions", {**chat_body(), "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {**chat_body(), "top_logprobs": 2}, 400, "needs logprobs=true"),
    ("/v1/chat/completions", {**chat_body(), "logprobs": True, "top_logprobs": 50}, 400, "top_lo"),
    ("/v1/chat/completions", {**chat_body(), "bogus_field": 1}, 400, "bogus_field"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {**chat_body(), "model": "nope"}, 404, "`nope` does not exist"),
    ("/v1/chat/completions", {**chat_body(), "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/chat/completions", {**chat_body(), "logit_bias": {"5": 3}}, 400, "logit_bias"),
    (
        "/v1/chat/completions",
        {**chat_body(), "response_format": {"type": "json_object"}},
        400,
        "response_format",
    ),
    (
        "/v1/chat/completions",
        {**chat_body(), "tools": [{"type": "function", "function": {"name": "f"}}]},
        400,
        "tools",
    ),
    ("/v1/chat/completions", {**chat_body(), "ignore_eos": "sometimes"}, 400, "ignore_eos"),
    ("/v1/chat/completions", {**chat_body(), "min_tokens": -1}, 400, "min_tokens"),
    ("/v1/chat/completions", {**chat_body(), "min_tokens": 7}, 400, "min_tokens"),
    ("/v1/chat/completions", {**chat_body(), "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ("/v1/chat/completions", {**chat_body(), "stop_token_ids": [10**6]}, 400, "stop_token_ids"),
    ("/v1/chat/completions", {**chat_body(), "use_beam_search": True, "n": 2}, 400, "best_of"),
    ("/v1/chat/completions", {**chat_body(), "best_of": 3}, 400, "use_beam_search"),
    (
        "/v1/chat/completions",
        {**chat_body(), "use_beam_search": True, "best_of": 2, "temperature": 1},
        400,
        "beam sampling",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "system", "content": "a"}, {"role": "assistant", "content": "b"}]},
        400,
        "at least one user message",
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "http://x.invalid/a.png"}}
                    ],
                }
            ]
        },
        400,
        "disabled",
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}
                    ],
                }
            ]
        },
        400,
        "base64",
    ),
    (
        "/v1/chat/completions",
        {**chat_body(), "interventions": [{"name": "no_such"}]},
        400,
        "unknown intervention 'no_such'",
    ),
    ("/v1/chat/completions", {**chat_body(), "interventions": [{"alpha": 1}]}, 400, "name"),
    ("/v1/caption", {"max_tokens": 4}, 400, "exactly one image"),
    ("/v1/caption", {"image": "%%%"}, 400, "base64"),
    ("/v1/vqa", {"image": base64.b64encode(png()).decode()}, 400, "question"),
    ("/v1/vqa", {"image": "x", "question": "q", "model": "nope"}, 404, "does not exist"),
    (
        "/v1/vqa",
        {"image": base64.b64encode(png()).decode(), "question": "q", "top_p": 3},
        400,
        "top_p",
    ),
]
