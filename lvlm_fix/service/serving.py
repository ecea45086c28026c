"""The serving class: validation, generation and response shaping, with no HTTP and no Ray.

Routes in app.py call one method each. Every failure a client can cause becomes a
`ServiceError` (status, OpenAI error type, param) before any model work starts, so a bad
request never reaches, let alone kills, a model replica.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from functools import cached_property
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from transformers import AutoConfig

from lvlm_fix.decoding import Sample
from lvlm_fix.engine import Timing
from lvlm_fix.generation import Generation
from lvlm_fix.methods import REGISTRY
from lvlm_fix.methods.dyvte import ROUTER_FILE
from lvlm_fix.model import FAMILIES, ModelInfo
from lvlm_fix.params import GenerationParams
from lvlm_fix.plan import compile_plan
from lvlm_fix.service import image_urls
from lvlm_fix.service import schemas as s
from lvlm_fix.service.config import ServeConfig
from lvlm_fix.service.engine import Engine, EngineResult, Job
from lvlm_fix.service.metrics import Metrics

log = logging.getLogger(__name__)


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


def internal_error(request_id: str) -> ServiceError:
    """What a client sees of a server fault: no exception text, paths, pids or actor ids (the
    caller logs the detail under the same request id)."""
    return ServiceError(500, f"internal error (request id {request_id})", code="internal_error")


class PromptCounter:
    """Counts a prompt's tokens as the model will see them: chat template, text, and each
    image's expansion (which depends on its size for anyres models), without running the
    image processor. It owns its processor: a fast tokenizer shared with a generating thread
    can fail with "Already borrowed"."""

    def __init__(self, processor, context: int):
        self.processor, self.context = processor, context
        self._lock = threading.Lock()  # the same reason, between concurrent requests

    @classmethod
    def load(cls, info: ModelInfo) -> PromptCounter:
        if not info.path:
            raise ValueError("the service needs the model's checkpoint path (LVLM.from_pretrained)")
        processor = FAMILIES[info.family].processor_class.from_pretrained(info.path)
        text_config = AutoConfig.from_pretrained(info.path).text_config
        return cls(processor, text_config.max_position_embeddings)

    def count(self, sample: Sample) -> int:
        prompt, images = sample.prompt(self.processor), sample.images
        sizes = [(image.height, image.width) for image in images]
        with self._lock:
            tokens = len(self.processor.tokenizer(prompt)["input_ids"])
            if not images:
                return tokens
            expanded = self.processor._get_num_multimodal_tokens(image_sizes=sizes)
        # Each image's one placeholder token becomes its feature tokens.
        return tokens + sum(n - 1 for n in expanded["num_image_tokens"])

    def token_text(self, token_id: int) -> str:
        with self._lock:
            return self.processor.tokenizer.decode([token_id])


class Serving:
    def __init__(self, engine: Engine, config: ServeConfig, metrics: Metrics | None = None):
        self.engine, self.config = engine, config
        self.metrics = metrics or Metrics()
        self.api_key = config.resolved_api_key()
        self.prompt_counter = PromptCounter.load(engine.info)
        self.routers = self._check_routers()
        self.presets = self._check_presets()

    def _check_routers(self) -> dict[str, str]:
        """DyVTE routers requests may name (name -> file), each loaded once here so a bad file
        fails at startup. Requests never name a file: the server opens only these."""
        routers = dict(self.config.dyvte_routers)
        if "auto" in routers:
            raise ValueError("dyvte_routers: 'auto' is reserved for the router next to the model")
        beside_model = Path(self.engine.info.path or ".") / ROUTER_FILE
        if self.engine.info.path and beside_model.is_file():
            routers["auto"] = str(beside_model)
        for path in routers.values():
            compile_plan([{"name": "dyvte", "router": path}], self.engine.info, GenerationParams())
        return routers

    def _check_presets(self) -> dict[str, list[dict]]:
        """Every model id's interventions, compiled now: a bad preset fails at startup, naming
        itself, not on its first request. Presets are the operator's: router paths allowed."""
        presets = {}
        for model, specs in self.config.model_ids().items():
            try:
                compile_plan(list(specs), self.engine.info, GenerationParams())
            except ValueError as error:
                raise ValueError(f"model id {model!r}: {error}") from None
            presets[model] = [dict(spec) for spec in specs]
        return presets

    # ---- validation --------------------------------------------------------------------------

    def check_auth(self, authorization: str | None) -> None:
        if self.api_key is None:
            return
        expected = f"Bearer {self.api_key}".encode()
        if not hmac.compare_digest((authorization or "").encode(), expected):
            raise ServiceError(
                401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key"
            )

    def decode_image(self, data: bytes) -> Image.Image:
        """Bytes -> RGB image, refusing oversize files and shapes before decoding the pixels."""
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
        self._check_shape(*image.size)
        try:
            return image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError):
            raise ServiceError(
                400, "the image data is truncated or corrupt", "image", "invalid_image"
            ) from None

    def _check_shape(self, width: int, height: int) -> None:
        """Pixel count and aspect ratio from the header: the processor's resize scales the
        short side up to the tower's size, so a thin image costs ratio x that many pixels."""
        if width * height > self.config.max_image_pixels:
            raise ServiceError(
                413,
                f"image is {width}x{height} pixels; the limit is "
                f"{self.config.max_image_pixels} pixels",
                "image",
                "image_too_large",
            )
        limit = self.config.max_image_aspect_ratio
        if max(width, height) > limit * min(width, height):
            raise ServiceError(
                400,
                f"image is {width}x{height} pixels; its long side may be at most {limit:g} "
                "times its short side",
                "image",
                "invalid_image_shape",
            )

    async def load_image(self, url: str) -> Image.Image:
        """data: URL, bare base64, or (when the server allows it) an http(s) URL. Decoding and
        fetching run off the event loop."""
        if url.startswith(("http://", "https://")):
            if not self.config.allow_image_urls:
                raise ServiceError(
                    400,
                    "image URLs are disabled on this server; send a data: URL with base64 content",
                    "image_url",
                    "image_url_disabled",
                )
            try:
                data = await image_urls.fetch(url, self.config)
            except image_urls.FetchRefused as error:
                raise ServiceError(error.status, error.message, "image_url", error.code) from None
            return await asyncio.to_thread(self.decode_image, data)
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
        return await asyncio.to_thread(self._decode_base64, payload)

    def _decode_base64(self, payload: str) -> Image.Image:
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ServiceError(400, "image is not valid base64", "image", "invalid_image") from None
        return self.decode_image(data)

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

    async def _check_context(self, sample: Sample, max_tokens: int) -> None:
        """Prompt tokens (chat template and image tokens included) + max_tokens must fit the
        model's positions; past them a model answers garbage. Tokenizing runs off the loop."""
        prompt = await asyncio.to_thread(self.prompt_counter.count, sample)
        context = self.prompt_counter.context
        if prompt + max_tokens > context:
            raise ServiceError(
                400,
                f"This model's maximum context length is {context} tokens. However, you "
                f"requested {prompt + max_tokens} tokens ({prompt} in the messages, {max_tokens} "
                "in the completion). Please reduce the length of the messages or completion.",
                "messages",
                "context_length_exceeded",
            )

    def _specs(self, request: s.GenerationFields) -> tuple[str, list[dict]]:
        """(model id, interventions): the request's own, else its model id's preset."""
        model = request.model or self.config.model_name
        if model not in self.presets:
            raise ServiceError(
                404, f"The model `{model}` does not exist.", "model", "model_not_found"
            )
        if request.interventions is None:
            return model, [dict(spec) for spec in self.presets[model]]
        return model, [self._server_side(spec.model_dump()) for spec in request.interventions]

    def _server_side(self, spec: dict) -> dict:
        """A client names a DyVTE router; only the server knows (and opens) its file. The
        answer never depends on what exists on the server's disk."""
        if spec.get("name") != "dyvte" or "router" not in spec:
            return spec
        name = spec["router"]
        if not isinstance(name, str) or name not in self.routers:
            raise ServiceError(
                400,
                f"dyvte.router must be one of this server's routers: {sorted(self.routers)}",
                "interventions",
                "invalid_intervention",
            )
        return {**spec, "router": self.routers[name]}

    def make_job(
        self,
        samples: list[Sample],
        model: str,
        specs: list[dict],
        params: GenerationParams,
        stream: bool,
    ) -> Job:
        """Compile the plan, once: a bad one fails as a 400 before any model work, and the
        engine runs the job with this plan."""
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
        # The plan does not say which method added which view, so a view method is asked again
        # (cheap for those; others, e.g. DyVTE loading its routers, are not asked).
        for intervention in plan.interventions:
            if "views" in intervention.hooks and not intervention.is_neutral():
                views = len(intervention.contribute(self.engine.info).views)
                if views:
                    self.metrics.extra_forwards.inc(
                        views * len(samples), model_name=model, method=intervention.name
                    )
        return Job(tuple(samples), plan, params, model)

    async def chat_job(self, request: s.ChatCompletionRequest) -> Job:
        try:
            request.check_supported()
            if request.n > self.config.max_n:
                raise s.RequestError(f"n={request.n} exceeds the limit of {self.config.max_n}", "n")
            if request.stream and request.n > 1:
                raise s.RequestError("stream=true supports n=1 only", "n")
            turns, urls = request.conversation()
            self._check_prompt(s.chat_text(turns), len(urls))
            params = request.chat_params(self.config, self.engine.info.vocab_size)
        except s.RequestError as error:
            raise ServiceError(error.status, str(error), error.param) from None
        model, specs = self._specs(request)
        images = tuple([await self.load_image(url) for url in urls])
        samples = request.to_samples(images, params)
        await self._check_context(samples[0], params.max_new_tokens)
        return self.make_job(samples, model, specs, params, request.stream)

    async def task_job(self, request: s.CaptionRequest | s.VQARequest, upload: bytes | None) -> Job:
        if (upload is None) == (request.image is None):
            raise ServiceError(
                400, "give exactly one image: a file part or a base64 `image`", "image"
            )
        self._check_prompt(request.text(), 1)
        try:
            params = request.to_params(self.config)
        except s.RequestError as error:
            raise ServiceError(error.status, str(error), error.param) from None
        model, specs = self._specs(request)
        if upload is not None:
            image = await asyncio.to_thread(self.decode_image, upload)
        else:
            image = await self.load_image(request.image)
        sample = Sample(request.text(), (image,), params.seed)
        await self._check_context(sample, params.max_new_tokens)
        return self.make_job([sample], model, specs, params, False)

    # ---- generation --------------------------------------------------------------------------

    async def _generate(self, job: Job) -> EngineResult:
        try:
            return await self.engine.generate(job)
        except (ValueError, TypeError) as error:  # the core's way to name a bad request
            raise _refused(error) from None

    def _record(self, job: Job, outputs: list[Generation], timing: Timing, ttft: float) -> None:
        """A finished request's metrics, the way vLLM counts them (metrics.py)."""
        m, model = self.metrics, job.model
        m.ttft.observe(ttft, model_name=model)
        m.queue_time.observe(timing.queued_s, model_name=model)
        m.prefill_time.observe(timing.prefill_s, model_name=model)
        m.decode_time.observe(timing.decode_s, model_name=model)
        for gap in timing.step_gaps:
            m.inter_token.observe(gap, model_name=model)
        usage = _usage(outputs)
        m.prompt_tokens.inc(usage.prompt_tokens, model_name=model)
        m.generation_tokens.inc(usage.completion_tokens, model_name=model)
        for output in outputs:
            m.success.inc(model_name=model, finished_reason=output.finish_reason)
        for path in outputs[0].attention_paths if outputs else ():
            m.attention_path.inc(model_name=model, path=path)
        pruned = sum(output.image_tokens_pruned for output in outputs)
        for method in _pruning_methods(job.plan) if pruned else ():
            m.pruned_image_tokens.inc(pruned, model_name=model, method=method)

    def _finished(self, job: Job, result: EngineResult, arrived: float) -> None:
        """Metrics of a request answered in one piece. Its first token was ready when the engine
        began decoding: the wait for the whole answer less the decode time after that token."""
        e2e = time.perf_counter() - arrived
        timing = result.timing
        self._record(job, result.generations, timing, max(e2e - timing.decode_s, 0.0))
        self.metrics.e2e.observe(e2e, model_name=job.model)

    async def chat(self, job: Job, request_id: str, arrived: float) -> s.ChatCompletionResponse:
        result = await self._generate(job)
        outputs = result.generations
        choices = [
            s.Choice(
                index=i,
                message=s.AssistantMessage(content=g.text),
                finish_reason=g.finish_reason,
                token_ids=g.token_ids,
                attention_paths=g.attention_paths,
                logprobs=self._logprobs(g),
            )
            for i, g in enumerate(outputs)
        ]
        self._finished(job, result, arrived)
        return s.ChatCompletionResponse(
            id=f"chatcmpl-{request_id}",
            model=job.model,
            system_fingerprint=job.plan.config_id,
            choices=choices,
            usage=_usage(outputs),
        )

    def _logprobs(self, output: Generation) -> s.ChoiceLogprobs | None:
        """OpenAI's logprobs object: each token as text, its bytes, its log-prob and the top
        alternatives. -inf (a token an intervention ruled out) becomes -9999.0, as in vLLM: JSON
        has no infinity."""
        if output.logprobs is None:
            return None

        def entry(token_id: int, logprob: float) -> dict:
            text = self.prompt_counter.token_text(token_id)
            return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode())}

        content = [
            s.TokenLogprob(
                **entry(token_id, step.logprob),
                top_logprobs=[s.TopLogprob(**entry(i, lp)) for i, lp in step.top],
            )
            for token_id, step in zip(output.token_ids, output.logprobs, strict=True)
        ]
        return s.ChoiceLogprobs(content=content)

    async def task(self, kind: str, job: Job, request_id: str, arrived: float) -> s.TaskResponse:
        result = await self._generate(job)
        [out] = result.generations
        self._finished(job, result, arrived)
        return s.TaskResponse(
            id=f"{kind}-{request_id}",
            object=kind,
            model=job.model,
            text=out.text,
            token_ids=out.token_ids,
            finish_reason=out.finish_reason,
            config_id=out.config_id,
            attention_paths=out.attention_paths,
            usage=_usage([out]),
        )

    async def chat_stream(
        self, job: Job, request_id: str, include_usage: bool, arrived: float
    ) -> AsyncIterator[str]:
        """Server-sent events: a role chunk, content chunks, a finish chunk, `data: [DONE]`.
        Its end-to-end latency is taken after the last chunk was handed to the server."""

        def chunk(delta: s.Delta, finish=None, usage=None) -> str:
            body = s.ChatCompletionChunk(
                id=f"chatcmpl-{request_id}",
                model=job.model,
                system_fingerprint=job.plan.config_id,
                usage=usage,
                choices=[s.ChunkChoice(index=0, delta=delta, finish_reason=finish)]
                if delta
                else [],
            )
            return f"data: {body.model_dump_json(exclude_none=True)}\n\n"

        ttft, final = None, None
        try:
            yield chunk(s.Delta(role="assistant", content=""))
            # aclosing: a client that leaves closes this generator, and with it the engine's
            # stream at once, which cancels the request.
            async with aclosing(self.engine.stream(job)) as items:
                async for item in items:
                    if isinstance(item, str):
                        ttft = ttft if ttft is not None else time.perf_counter() - arrived
                        yield chunk(s.Delta(content=item))
                    elif isinstance(item, Generation):
                        final = item
                        yield chunk(s.Delta(), finish=item.finish_reason)
                        if include_usage:
                            yield chunk(None, usage=_usage([item]))
                    else:  # the engine's Timing comes last
                        first = ttft if ttft is not None else time.perf_counter() - arrived
                        self._record(job, [final], item, first)
        except Exception as error:  # headers are sent: report in-band, as OpenAI does
            if isinstance(error, ServiceError):  # the engine's own answer, e.g. 503
                failure = error
            elif isinstance(error, ValueError | TypeError):
                failure = _refused(error)
            else:
                log.exception("request %s: streamed generation failed", request_id)
                failure = internal_error(request_id)
            self.metrics.errors.inc(model_name=job.model, code=str(failure.status))
            yield f"data: {json.dumps(failure.body())}\n\n"
        yield "data: [DONE]\n\n"
        self.metrics.e2e.observe(time.perf_counter() - arrived, model_name=job.model)

    # ---- catalogue ---------------------------------------------------------------------------

    def models(self) -> s.ModelList:
        return s.ModelList(data=[self.model(name) for name in self.presets])

    def model(self, model: str) -> s.ModelCard:
        if model not in self.presets:
            raise ServiceError(
                404, f"The model `{model}` does not exist.", "model", "model_not_found"
            )
        base = self.config.model_name
        parent = None if model == base else base
        return s.ModelCard(id=model, root=base, parent=parent, interventions=self.presets[model])

    def interventions(self) -> dict:
        """Every registered method: JSON schema, defaults, hooks, and what it composes with."""
        out = []
        for name in sorted(REGISTRY):
            cls = REGISTRY[name]
            out.append(
                {
                    "name": name,
                    "hooks": sorted(cls.hooks),
                    "schema": cls.model_json_schema(),
                    "defaults": _defaults(cls),
                    "conflicts": sorted(cls.conflicts),
                    "composes_with": self._compositions.get(name),
                }
            )
        return {
            "object": "list",
            "data": out,
            "default_interventions": list(self.config.default_interventions),
            "presets": self.presets,
        }

    def _example_specs(self) -> dict[str, dict]:
        """A spec per method that compiles on this server: its defaults, or for DyVTE (whose
        router is required) the first registered router. Methods without one are left out."""
        specs = {name: _defaults(cls) for name, cls in REGISTRY.items()}
        if self.routers:
            specs["dyvte"] = {"name": "dyvte", "router": next(iter(self.routers.values()))}
        return {name: spec for name, spec in specs.items() if spec is not None}

    @cached_property
    def _compositions(self) -> dict[str, list[str]]:
        """name -> the methods it compiles with (both at default strength) on this model, found
        by compiling each pair, so the catalogue never claims what compile refuses. A method
        with no spec that compiles here (DyVTE without a router) gets None: unknown."""
        specs = self._example_specs()
        info, params = self.engine.info, GenerationParams()
        compiles = {}
        for a, b in itertools.combinations(sorted(specs), 2):
            try:
                compile_plan([specs[a], specs[b]], info, params)
                compiles[a, b] = True
            except ValueError:
                compiles[a, b] = False
        return {
            name: [other for other in sorted(specs) if compiles.get(tuple(sorted((name, other))))]
            for name in specs
        }


def _defaults(cls) -> dict | None:
    try:
        return cls().spec()
    except ValueError:  # a method with a required field
        return None


def _refused(error: Exception) -> ServiceError:
    """A ValueError/TypeError from decoding (e.g. a combination only found out at run time)."""
    cause = getattr(error, "cause", None) or error  # Ray wraps a replica's exception
    return ServiceError(400, f"cannot run this request: {cause}", "interventions", "refused")


def _usage(outputs: list[Generation]) -> s.Usage:
    prompt = outputs[0].prompt_tokens if outputs else 0
    completion = sum(len(g.token_ids) for g in outputs)
    return s.Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _pruning_methods(plan) -> list[str]:
    """The plan's methods that prune image tokens (in the vision tower or the LLM)."""
    return [
        i.name for i in plan.interventions if i.hooks & {"prune", "vision"} and not i.is_neutral()
    ]
