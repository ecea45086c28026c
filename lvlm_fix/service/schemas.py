"""Wire schemas: OpenAI chat completions field for field, plus caption / VQA and error objects.

Our one addition to OpenAI's request is `interventions` (marked "not in OpenAI spec"); responses
add `token_ids` per choice and report the plan's config id as `system_fingerprint`. A request
converts itself into `GenerationParams` and one `Sample` per choice (like vLLM's
`to_sampling_params`); images arrive decoded, so the schemas stay free of I/O.
"""

from __future__ import annotations

import secrets
import time
from typing import Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lvlm_fix.decoding import Sample
from lvlm_fix.params import GenerationParams
from lvlm_fix.service.config import ServeConfig

CAPTION_PROMPT = "Please describe this image in detail."


class RequestError(ValueError):
    """A request that is well-formed JSON but asks for something we cannot do (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _Open(BaseModel):
    """Response objects: extra fields allowed so newer servers stay readable by older clients."""

    model_config = ConfigDict(extra="allow")


# ---- requests -------------------------------------------------------------------------------


class ImageURL(_Wire):
    url: str = Field(description="data:image/...;base64,... (http(s) only if the server allows)")
    detail: Literal["auto", "low", "high"] = "auto"


class TextPart(_Wire):
    type: Literal["text"]
    text: str


class ImagePart(_Wire):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = TextPart | ImagePart


class ChatMessage(_Wire):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(_Wire):
    include_usage: bool = False


class InterventionSpec(BaseModel):
    """`{"name": "vhr", ...params}`: a method from GET /v1/interventions and its parameters."""

    model_config = ConfigDict(frozen=True, extra="allow")
    name: str


class GenerationFields(_Wire):
    """Fields shared by every generation request (OpenAI's names and ranges)."""

    max_tokens: int | None = Field(None, ge=1, description="Generated tokens at most.")
    temperature: float | None = Field(
        None, ge=0, le=2, description="0 or unset = greedy (deterministic); > 0 = sampling."
    )
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus mass (unset or 1 = off).")
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="Sampling seed (unset = random)."
    )
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings.")
    interventions: list[InterventionSpec] | None = Field(
        None,
        description="Not in OpenAI spec: hallucination interventions to apply "
        "(unset = the server's defaults; [] = none).",
    )

    def _stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise RequestError("at most 4 stop strings are allowed", "stop")
        return tuple(stops)

    def to_params(self, config: ServeConfig, max_tokens: int | None = None) -> GenerationParams:
        """The request's decoding settings as `GenerationParams` (400 naming a bad field)."""
        limit = max_tokens or self.max_tokens or config.default_max_tokens
        if limit > config.max_tokens_limit:
            raise RequestError(
                f"max_tokens={limit} exceeds this server's limit of {config.max_tokens_limit}",
                "max_tokens",
            )
        sample = bool(self.temperature)
        try:
            return GenerationParams(
                max_new_tokens=limit,
                do_sample=sample,
                temperature=self.temperature if sample else 1.0,
                top_p=self.top_p if self.top_p is not None else 1.0,
                seed=self.seed,
                stop=self._stops(),
            )
        except ValidationError as error:
            raise RequestError(first_error(error), "stop") from None


class ChatCompletionRequest(GenerationFields):
    """POST /v1/chat/completions (OpenAI's fields). Single-turn conversations only."""

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    frequency_penalty: float | None = Field(None, description="Only 0/unset is supported.")
    logit_bias: dict[str, float] | None = Field(None, description="Only unset is supported.")
    logprobs: bool | None = Field(None, description="Only false/unset is supported.")
    top_logprobs: int | None = Field(None, description="Only unset is supported.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Overrides max_tokens.")
    n: int = Field(1, ge=1, description="Choices to generate; each gets its own seed.")
    presence_penalty: float | None = Field(None, description="Only 0/unset is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> ChatCompletionRequest:
        neutral = {
            "frequency_penalty": not self.frequency_penalty,
            "presence_penalty": not self.presence_penalty,
            "logit_bias": not self.logit_bias,
            "logprobs": not self.logprobs,
            "top_logprobs": self.top_logprobs is None,
        }
        for field, ok in neutral.items():
            if not ok:
                raise ValueError(f"{field} is not supported by this server; leave it unset")
        return self

    def prompt(self) -> tuple[str, list[str]]:
        """(text, image urls) of the one user turn; system text goes in front of it."""
        if any(m.role == "assistant" for m in self.messages):
            raise RequestError(
                "only single-turn chats are supported (no assistant turns)", "messages"
            )
        users = [m for m in self.messages if m.role == "user"]
        if len(users) != 1:
            raise RequestError(f"expected exactly one user message, got {len(users)}", "messages")
        texts, urls = [], []
        for message in self.messages:
            parts = message.content
            parts = [TextPart(type="text", text=parts)] if isinstance(parts, str) else parts
            for part in parts:
                if isinstance(part, TextPart):
                    texts.append(part.text)
                elif message.role != "user":
                    raise RequestError("images are only accepted in the user message", "messages")
                else:
                    urls.append(part.image_url.url)
        return "\n".join(texts), urls

    def to_samples(self, images: tuple[Image.Image, ...], params: GenerationParams) -> list[Sample]:
        """One Sample per choice; choices get consecutive seeds so sampled choices differ.

        One choice without a seed keeps seed None, exactly like `LVLM.generate` (views then use
        their fixed default randomness and sampling is nondeterministic).
        """
        text, _ = self.prompt()
        if params.seed is None and self.n == 1:
            return [Sample(text, images)]
        base = params.seed if params.seed is not None else secrets.randbelow(2**31)
        return [Sample(text, images, base + i) for i in range(self.n)]

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CaptionRequest(GenerationFields):
    """POST /v1/caption: describe one image (JSON with base64, or multipart upload)."""

    image: str | None = Field(None, description="Base64 or data: URL (multipart: a file part).")
    prompt: str = CAPTION_PROMPT

    def text(self) -> str:
        return self.prompt


class VQARequest(GenerationFields):
    """POST /v1/vqa: answer a question about one image."""

    image: str | None = Field(None, description="Base64 or data: URL (multipart: a file part).")
    question: str = Field(min_length=1)

    def text(self) -> str:
        return self.question


# ---- responses ------------------------------------------------------------------------------


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(_Open):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(_Open):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None
    token_ids: list[int] | None = Field(None, description="Not in OpenAI spec: generated ids.")


class ChatCompletionResponse(_Open):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str = Field(description="The plan's config id (interventions hash).")
    choices: list[Choice]
    usage: Usage


class Delta(_Open):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(_Open):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(_Open):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class TaskResponse(_Open):
    """Answer of /v1/caption and /v1/vqa."""

    id: str
    object: Literal["caption", "vqa"]
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    config_id: str
    usage: Usage


class ModelCard(_Open):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "lvlm-fix"


class ModelList(_Open):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(_Open):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Open):
    """OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorBody


def first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(map(str, first["loc"]))
    return f"{where}: {first['msg']}" if where else first["msg"]
