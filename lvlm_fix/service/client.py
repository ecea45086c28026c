"""HTTP clients that return the same `Generation` objects as the in-process `LVLM`.

client = Client("http://127.0.0.1:8000")
out = client.caption(Image.open("cat.jpg"), interventions=[{"name": "vhr"}], max_tokens=32)
for piece in client.stream("What is on the table?", image): print(piece, end="")
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from lvlm_fix.lvlm import Generation

ImageInput = Image.Image | bytes | str | Path  # a PIL image, encoded bytes, or a file path


class ServiceError(RuntimeError):
    """The server answered with an error object."""

    def __init__(self, status: int, error: dict):
        super().__init__(f"HTTP {status}: {error.get('message')}")
        self.status, self.error = status, error


def data_url(image: ImageInput) -> str:
    """Any image input as a `data:image/png;base64,...` (or the file's own type) URL."""
    if isinstance(image, str | Path):
        image = Path(image).read_bytes()
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        image = buffer.getvalue()
    kind = (Image.open(io.BytesIO(image)).format or "png").lower()
    return f"data:image/{kind};base64,{base64.b64encode(image).decode()}"


def _sampling(max_tokens, temperature, top_p, seed, stop, interventions) -> dict[str, Any]:
    body = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "stop": stop,
    }
    body = {k: v for k, v in body.items() if v is not None}
    if interventions is not None:
        body["interventions"] = [dict(spec) for spec in interventions]
    return body


def _chat_body(prompt: str, images: Sequence[ImageInput], n: int, stream: bool, sampling) -> dict:
    content = [{"type": "text", "text": prompt}]
    content += [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    body = {"messages": [{"role": "user", "content": content}], "n": n, **sampling}
    if stream:
        body["stream"] = True
    return body


def _images(image: ImageInput | Sequence[ImageInput] | None) -> list[ImageInput]:
    if image is None:
        return []
    return list(image) if isinstance(image, list | tuple) else [image]


def _checked(response: httpx.Response) -> dict:
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            error = {"message": response.text}
        raise ServiceError(response.status_code, error)
    return response.json()


def _from_chat(body: dict) -> list[Generation]:
    prompt_tokens = body["usage"]["prompt_tokens"]
    return [
        Generation(
            text=c["message"]["content"],
            token_ids=c.get("token_ids") or [],
            finish_reason=c["finish_reason"],
            prompt_tokens=prompt_tokens,
            config_id=body["system_fingerprint"],
            attention_paths=c.get("attention_paths") or [],
        )
        for c in body["choices"]
    ]


def _from_task(body: dict) -> Generation:
    return Generation(
        text=body["text"],
        token_ids=body["token_ids"],
        finish_reason=body["finish_reason"],
        prompt_tokens=body["usage"]["prompt_tokens"],
        config_id=body["config_id"],
        attention_paths=body.get("attention_paths", []),
    )


def _sse_piece(line: str) -> str | None:
    """The content of one `data:` line of a chat stream (None for anything else)."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    chunk = json.loads(line[len("data: ") :])
    if "error" in chunk:
        raise ServiceError(500, chunk["error"])
    choices = chunk.get("choices") or [{}]
    return choices[0].get("delta", {}).get("content") or None


class _Base:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 300.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._options = {"base_url": base_url.rstrip("/"), "headers": headers, "timeout": timeout}


class Client(_Base):
    """Synchronous client. Keyword sampling args mirror the OpenAI ones (None = server default)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 300.0):
        super().__init__(base_url, api_key, timeout)
        self._http = httpx.Client(**self._options)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def _task(self, route: str, body: dict) -> Generation:
        return _from_task(_checked(self._http.post(route, json=body)))

    def caption(
        self,
        image: ImageInput,
        interventions=None,
        *,
        prompt: str | None = None,
        max_tokens=None,
        temperature=None,
        top_p=None,
        seed=None,
        stop=None,
    ) -> Generation:
        body = {
            "image": data_url(image),
            **_sampling(max_tokens, temperature, top_p, seed, stop, interventions),
        }
        if prompt is not None:
            body["prompt"] = prompt
        return self._task("/v1/caption", body)

    def vqa(
        self,
        image: ImageInput,
        question: str,
        interventions=None,
        *,
        max_tokens=None,
        temperature=None,
        top_p=None,
        seed=None,
        stop=None,
    ) -> Generation:
        sampling = _sampling(max_tokens, temperature, top_p, seed, stop, interventions)
        return self._task("/v1/vqa", {"image": data_url(image), "question": question, **sampling})

    def chat(
        self,
        prompt: str,
        image=None,
        interventions=None,
        *,
        n: int = 1,
        max_tokens=None,
        temperature=None,
        top_p=None,
        seed=None,
        stop=None,
    ) -> list[Generation]:
        sampling = _sampling(max_tokens, temperature, top_p, seed, stop, interventions)
        body = _chat_body(prompt, _images(image), n, False, sampling)
        return _from_chat(_checked(self._http.post("/v1/chat/completions", json=body)))

    def stream(
        self,
        prompt: str,
        image=None,
        interventions=None,
        *,
        max_tokens=None,
        temperature=None,
        top_p=None,
        seed=None,
        stop=None,
    ) -> Iterator[str]:
        sampling = _sampling(max_tokens, temperature, top_p, seed, stop, interventions)
        body = _chat_body(prompt, _images(image), 1, True, sampling)
        with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code >= 400:
                response.read()
                _checked(response)
            for line in response.iter_lines():
                if (piece := _sse_piece(line)) is not None:
                    yield piece


class AsyncClient(_Base):
    """The same API as `Client`, with `async` methods (`stream` is an async iterator)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 300.0):
        super().__init__(base_url, api_key, timeout)
        self._http = httpx.AsyncClient(**self._options)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_) -> None:
        await self.aclose()

    async def _task(self, route: str, body: dict) -> Generation:
        return _from_task(_checked(await self._http.post(route, json=body)))

    async def caption(
        self,
        image: ImageInput,
        interventions=None,
        *,
        prompt: str | None = None,
        max_tokens=None,
        temperature=None,
        top_p=None,
        seed=None,
        stop=None,
    ) -> Generation:
        body = {
            "image": data_url(image),
            **_sampling(max_tokens, temperature, top_p, seed, stop, interventions),
        }
        if prompt is not None:
            body["prompt"] = prompt
        return await self._task("/v1/caption", body)

    async def vqa(
        self,
        image: ImageInput,
        question: str,
        interventions=None,
        *,
        max_tokens=None,
        temperature=None,
        top_p=None,
        seed=None,
        stop=None,
    ) -> Generation:
        sampling = _sampling(max_tokens, temperature, top_p, seed, stop, interventions)
        body = {"image": data_url(image), "question": question, **sampling}
        return await self._task("/v1/vqa", body)

    async def chat(
        self,
        prompt: str,
        image=None,
        interventions=None,
        *,
        n: int = 1,
        max_tokens=None,
        temperature=None,
        top_p=None,
        seed=None,
        stop=None,
    ) -> list[Generation]:
        sampling = _sampling(max_tokens, temperature, top_p, seed, stop, interventions)
        body = _chat_body(prompt, _images(image), n, False, sampling)
        return _from_chat(_checked(await self._http.post("/v1/chat/completions", json=body)))

    async def stream(
        self,
        prompt: str,
        image=None,
        interventions=None,
        *,
        max_tokens=None,
        temperature=None,
        top_p=None,
        seed=None,
        stop=None,
    ) -> AsyncIterator[str]:
        sampling = _sampling(max_tokens, temperature, top_p, seed, stop, interventions)
        body = _chat_body(prompt, _images(image), 1, True, sampling)
        async with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code >= 400:
                await response.aread()
                _checked(response)
            async for line in response.aiter_lines():
                if (piece := _sse_piece(line)) is not None:
                    yield piece
