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


def png(width: int = 40, height: int = 30, color: str = "blue") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


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
    ("/v1/chat/completions", {**chat_body(), "max_tokens": "many"}, 422, "max_tokens"),
    ("/v1/chat/completions", {**chat_body(), "n": 50}, 400, "n=50"),
    ("/v1/chat/completions", {**chat_body(), "temperature": -1}, 422, "temperature"),
    ("/v1/chat/completions", {**chat_body(), "logprobs": True}, 422, "logprobs"),
    ("/v1/chat/completions", {**chat_body(), "bogus_field": 1}, 422, "bogus_field"),
    ("/v1/chat/completions", {"messages": []}, 422, "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        400,
        "single-turn",
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
    ("/v1/chat/completions", {**chat_body(), "interventions": [{"alpha": 1}]}, 422, "name"),
    ("/v1/caption", {"max_tokens": 4}, 400, "exactly one image"),
    ("/v1/caption", {"image": "%%%"}, 400, "base64"),
    ("/v1/vqa", {"image": base64.b64encode(png()).decode()}, 422, "question"),
    (
        "/v1/vqa",
        {"image": base64.b64encode(png()).decode(), "question": "q", "top_p": 3},
        422,
        "top_p",
    ),
]
