"""The serving class: validation, generation and response shaping, with no HTTP and no Ray.

Routes in app.py call one method each. Every failure a client can cause becomes a
`ServiceError` (status, OpenAI error type, param) before any model work starts, so a bad
request never reaches, let alone kills, a model replica.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
import uuid
from collections.abc import AsyncIterator

import httpx
from PIL import Image, UnidentifiedImageError

from lvlm_fix.decoding import Sample
from lvlm_fix.lvlm import Generation
from lvlm_fix.methods import REGISTRY
from lvlm_fix.params import GenerationParams
from lvlm_fix.plan import compile_plan
from lvlm_fix.service import schemas as s
from lvlm_fix.service.config import ServeConfig
from lvlm_fix.service.engine import Engine, Job
from lvlm_fix.service.metrics import Metrics


class ServiceError(Exception):
    """An error answered with OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,  # e.g. Retry-After on a 503
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        error = s.ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        return s.ErrorResponse(error=error).model_dump()


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


class Serving:
    def __init__(self, engine: Engine, config: ServeConfig, metrics: Metrics | None = None):
        self.engine, self.config = engine, config
        self.metrics = metrics or Metrics()
        # Fail at startup, not on the first request, if the defaults are wrong.
        compile_plan(list(config.default_interventions), engine.info, GenerationParams())

    # ---- validation --------------------------------------------------------------------------

    def check_auth(self, authorization: str | None) -> None:
        if self.config.api_key is None:
            return
        if authorization != f"Bearer {self.config.api_key}":
            raise ServiceError(
                401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key"
            )

    def decode_image(self, data: bytes) -> Image.Image:
        """Bytes -> RGB image, refusing oversize files and pixel counts before decoding them."""
        if len(data) > self.config.max_image_bytes:
            raise ServiceError(
                413,
                f"image is {len(data)} bytes; the limit is {self.config.max_image_bytes}",
                "image",
                "image_too_large",
            )
        try:
            image = Image.open(io.BytesIO(data))  # reads the header only
        except Image.DecompressionBombError:
            raise ServiceError(
                413, "image has too many pixels", "image", "image_too_large"
            ) from None
        except (UnidentifiedImageError, OSError, ValueError):
            raise ServiceError(
                400, "the image data is not an image PIL can read", "image", "invalid_image"
            ) from None
        width, height = image.size
        if width * height > self.config.max_image_pixels:
            raise ServiceError(
                413,
                f"image is {width}x{height} pixels; the limit is "
                f"{self.config.max_image_pixels} pixels",
                "image",
                "image_too_large",
            )
        try:
            return image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError):
            raise ServiceError(
                400, "the image data is truncated or corrupt", "image", "invalid_image"
            ) from None

    def load_image_url(self, url: str) -> Image.Image:
        """data: URL, bare base64, or (when the server allows it) an http(s) URL."""
        if url.startswith(("http://", "https://")):
            if not self.config.allow_image_urls:
                raise ServiceError(
                    400,
                    "image URLs are disabled on this server; send a data: URL with base64 content",
                    "image_url",
                    "image_url_disabled",
                )
            return self.decode_image(self._fetch(url))
        payload = url
        if url.startswith("data:"):
            header, comma, payload = url.partition(",")
            if not comma or not header.endswith(";base64") or not header.startswith("data:image/"):
                raise ServiceError(
                    400, "expected data:image/<type>;base64,<data>", "image_url", "invalid_image"
                )
        if len(payload) > self.config.max_image_bytes * 4 // 3 + 4:
            raise ServiceError(
                413,
                f"image is larger than the server's limit of {self.config.max_image_bytes} bytes",
                "image",
                "image_too_large",
            )
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ServiceError(400, "image is not valid base64", "image", "invalid_image") from None
        return self.decode_image(data)

    def _fetch(self, url: str) -> bytes:
        limit = self.config.max_image_bytes
        try:
            timeout = self.config.image_url_timeout_s
            with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
                response.raise_for_status()
                data = b""
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) > limit:
                        raise ServiceError(
                            413, f"image at {url} exceeds {limit} bytes", "image_url"
                        )
                return data
        except httpx.HTTPError as error:
            raise ServiceError(400, f"could not fetch {url}: {error}", "image_url") from None

    def _check_prompt(self, text: str, n_images: int) -> None:
        if len(text) > self.config.max_prompt_chars:
            raise ServiceError(
                400,
                f"prompt is {len(text)} characters; the limit is {self.config.max_prompt_chars}",
                "messages",
                "prompt_too_long",
            )
        if n_images > self.config.max_images:
            raise ServiceError(
                400, f"{n_images} images given; the limit is {self.config.max_images}", "messages"
            )

    def make_job(
        self, samples: list[Sample], specs: list[dict], params: GenerationParams, stream: bool
    ) -> Job:
        """Compile the plan now (cheap, no model) so bad interventions fail as a 400."""
        try:
            plan = compile_plan(specs, self.engine.info, params)
        except ValueError as error:
            raise ServiceError(400, str(error), "interventions", "invalid_intervention") from None
        if stream and plan.search.width > 1:
            raise ServiceError(
                400,
                "streaming is not available with a beam search strategy "
                f"(num_beams or {[i.name for i in plan.interventions]})",
                "stream",
            )
        for intervention in plan.interventions:
            if not intervention.is_neutral():
                views = len(intervention.contribute(self.engine.info).views)
                if views:
                    self.metrics.extra_forwards.labels(intervention.name).inc(views * len(samples))
        return Job(tuple(samples), tuple(specs), params, plan.config_id)

    def chat_job(self, request: s.ChatCompletionRequest) -> Job:
        try:
            if request.n > self.config.max_n:
                raise s.RequestError(f"n={request.n} exceeds the limit of {self.config.max_n}", "n")
            if request.stream and request.n > 1:
                raise s.RequestError("stream=true supports n=1 only", "n")
            text, urls = request.prompt()
            self._check_prompt(text, len(urls))
            params = request.to_params(self.config, request.max_new_tokens())
            samples = request.to_samples(self.load_image_url, params)
            return self.make_job(
                samples, request.intervention_specs(self.config), params, request.stream
            )
        except s.RequestError as error:
            raise ServiceError(error.status, str(error), error.param) from None

    def task_job(self, request: s.CaptionRequest | s.VQARequest, upload: bytes | None) -> Job:
        if (upload is None) == (request.image is None):
            raise ServiceError(
                400, "give exactly one image: a file part or a base64 `image`", "image"
            )
        self._check_prompt(request.text(), 1)
        try:
            params = request.to_params(self.config)
        except s.RequestError as error:
            raise ServiceError(error.status, str(error), error.param) from None
        image = (
            self.decode_image(upload) if upload is not None else self.load_image_url(request.image)
        )
        sample = Sample(request.text(), (image,), params.seed)
        return self.make_job([sample], request.intervention_specs(self.config), params, False)

    # ---- generation --------------------------------------------------------------------------

    async def _generate(self, job: Job) -> list[Generation]:
        self.metrics.queue_depth.inc()
        start = time.perf_counter()
        try:
            result = await self.engine.generate(job)
        except (ValueError, TypeError) as error:  # the core's way to name a bad request
            raise _refused(error) from None
        finally:
            self.metrics.queue_depth.dec()
        elapsed = time.perf_counter() - start
        tokens = sum(len(g.token_ids) for g in result.generations)
        self.metrics.batch_size.observe(result.batch_size)
        self.metrics.tokens_per_s.observe(tokens / max(elapsed, 1e-6))
        return result.generations

    async def chat(self, job: Job, request_id: str) -> s.ChatCompletionResponse:
        outputs = await self._generate(job)
        choices = [
            s.Choice(
                index=i,
                message=s.AssistantMessage(content=g.text),
                finish_reason=g.finish_reason,
                token_ids=g.token_ids,
            )
            for i, g in enumerate(outputs)
        ]
        return s.ChatCompletionResponse(
            id=f"chatcmpl-{request_id}",
            model=self.config.model_name,
            system_fingerprint=job.config_id,
            choices=choices,
            usage=_usage(outputs),
        )

    async def task(self, kind: str, job: Job, request_id: str) -> s.TaskResponse:
        [out] = await self._generate(job)
        return s.TaskResponse(
            id=f"{kind}-{request_id}",
            object=kind,
            model=self.config.model_name,
            text=out.text,
            token_ids=out.token_ids,
            finish_reason=out.finish_reason,
            config_id=out.config_id,
            usage=_usage([out]),
        )

    async def chat_stream(
        self, job: Job, request_id: str, include_usage: bool
    ) -> AsyncIterator[str]:
        """Server-sent events: a role chunk, content chunks, a finish chunk, `data: [DONE]`."""

        def chunk(delta: s.Delta, finish=None, usage=None) -> str:
            body = s.ChatCompletionChunk(
                id=f"chatcmpl-{request_id}",
                model=self.config.model_name,
                system_fingerprint=job.config_id,
                usage=usage,
                choices=[s.ChunkChoice(index=0, delta=delta, finish_reason=finish)]
                if delta
                else [],
            )
            return f"data: {body.model_dump_json(exclude_none=True)}\n\n"

        start, first = time.perf_counter(), True
        self.metrics.queue_depth.inc()
        try:
            yield chunk(s.Delta(role="assistant", content=""))
            async for item in self.engine.stream(job):
                if first:
                    self.metrics.ttft.observe(time.perf_counter() - start)
                    first = False
                if isinstance(item, str):
                    yield chunk(s.Delta(content=item))
                    continue
                yield chunk(s.Delta(), finish=item.finish_reason)
                elapsed = time.perf_counter() - start
                self.metrics.tokens_per_s.observe(len(item.token_ids) / max(elapsed, 1e-6))
                self.metrics.batch_size.observe(1)
                if include_usage:
                    yield chunk(None, usage=_usage([item]))
        except Exception as error:  # headers are sent: report in-band, as OpenAI does
            if isinstance(error, ServiceError):  # the engine's own answer, e.g. 503
                failure = error
            elif isinstance(error, ValueError | TypeError):
                failure = _refused(error)
            else:
                failure = ServiceError(500, f"generation failed: {error}")
            self.metrics.errors.labels(str(failure.status)).inc()
            yield f"data: {json.dumps(failure.body())}\n\n"
        finally:
            self.metrics.queue_depth.dec()
        yield "data: [DONE]\n\n"

    # ---- catalogue ---------------------------------------------------------------------------

    def models(self) -> s.ModelList:
        return s.ModelList(data=[s.ModelCard(id=self.config.model_name)])

    def interventions(self) -> dict:
        """Every registered method: JSON schema, defaults, hooks, and what it composes with."""
        names = sorted(REGISTRY)
        out = []
        for name in names:
            cls = REGISTRY[name]
            try:
                defaults = cls().spec()
            except ValueError:  # a method whose every field is required
                defaults = None
            out.append(
                {
                    "name": name,
                    "hooks": sorted(cls.hooks),
                    "schema": cls.model_json_schema(),
                    "defaults": defaults,
                    "conflicts": sorted(cls.conflicts),
                    "composes_with": [
                        other
                        for other in names
                        if other != name and _composable(cls, REGISTRY[other])
                    ],
                }
            )
        return {
            "object": "list",
            "data": out,
            "default_interventions": list(self.config.default_interventions),
        }


def _refused(error: Exception) -> ServiceError:
    """A ValueError/TypeError from decoding (e.g. a combination only found out at run time)."""
    cause = getattr(error, "cause", None) or error  # Ray wraps a replica's exception
    return ServiceError(400, f"cannot run this request: {cause}", "interventions", "refused")


def _composable(a, b) -> bool:
    if b.name in a.conflicts or a.name in b.conflicts:
        return False
    return not ("search" in a.hooks and "search" in b.hooks)  # one search strategy per plan


def _usage(outputs: list[Generation]) -> s.Usage:
    prompt = outputs[0].prompt_tokens if outputs else 0
    completion = sum(len(g.token_ids) for g in outputs)
    return s.Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )
