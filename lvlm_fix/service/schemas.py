"""Wire schemas: OpenAI chat completions field for field, plus caption / VQA and error objects.

Our one addition to OpenAI's request is `interventions` (marked "not in OpenAI spec"); responses
add `token_ids` per choice and report the plan's config id as `system_fingerprint`. A request
converts itself into `GenerationParams` and one `Sample` per choice (like vLLM's
`to_sampling_params`); images arrive decoded, so the schemas stay free of I/O.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lvlm_fix.decoding import Sample
from lvlm_fix.model import Turn
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

    model: str | None = Field(
        None, description="A model id from GET /v1/models (unset = the server's default)."
    )
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
        "(unset = the model id's preset; [] = none).",
    )

    def _stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise RequestError("at most 4 stop strings are allowed", "stop")
        return tuple(stops)

    def to_params(
        self, config: ServeConfig, max_tokens: int | None = None, **more
    ) -> GenerationParams:
        """The request's decoding settings as `GenerationParams` (400 naming a bad field);
        `more`: further GenerationParams fields (the chat route's)."""
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
                **more,
            )
        except ValidationError as error:
            first = error.errors()[0]
            field = str(first["loc"][0]) if first["loc"] else None
            param = PARAM_NAMES.get(field, field)
            message = first["msg"].removeprefix("Value error, ")
            # Named as a schema error is (app.py), when the error belongs to one field.
            raise RequestError(f"{param}: {message}" if param else message, param) from None


# GenerationParams' names -> the request fields that set them (for error messages).
PARAM_NAMES = {"max_new_tokens": "max_tokens", "num_beams": "best_of", "logprobs": "top_logprobs"}


# Fields of OpenAI's and vLLM's requests this server does not implement: accepted at their
# neutral value (clients send those by default), refused otherwise. field -> (is neutral, which).
UNSUPPORTED = {
    "frequency_penalty": (lambda v: not v, "0"),
    "presence_penalty": (lambda v: not v, "0"),
    "logit_bias": (lambda v: not v, "{}"),
    "response_format": (lambda v: v is None or v.get("type") == "text", '{"type": "text"}'),
    "tools": (lambda v: not v, "[]"),
    # "auto" with no tools chooses none.
    "tool_choice": (lambda v: v in (None, "none", "auto"), '"none"'),
    "min_p": (lambda v: not v, "0"),
    "repetition_penalty": (lambda v: v in (None, 1), "1"),
}


class ChatCompletionRequest(GenerationFields):
    """POST /v1/chat/completions: OpenAI's fields, plus vLLM's sampling extras that the decode
    loop has (top_k, use_beam_search/best_of, length_penalty, min_tokens, ignore_eos,
    stop_token_ids) and our `interventions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Overrides max_tokens.")
    n: int = Field(1, ge=1, description="Choices to generate; each gets its own seed.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = Field(False, description="Log-prob of each generated token.")
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="Alternatives per position (needs logprobs=true)."
    )
    # Accepted with any value: metadata, or moot without tools.
    user: str | None = None
    parallel_tool_calls: bool | None = None
    # Accepted at their neutral value only (see UNSUPPORTED).
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    # vLLM's extras that map onto GenerationParams (which bounds them and says what they do).
    min_tokens: int = Field(
        0, description="vLLM: tokens a choice has before EOS or a stop may end it."
    )
    ignore_eos: bool = Field(False, description="vLLM: EOS does not end a choice.")
    stop_token_ids: list[int] | None = Field(
        None, description="vLLM: token ids that end a choice, left out of its text."
    )
    top_k: int | None = Field(None, ge=-1, description="Keep the k best tokens (0 or -1 = off).")
    use_beam_search: bool = Field(False, description="vLLM: beam search of width best_of.")
    best_of: int | None = Field(None, ge=1, le=16, description="vLLM: the beam width.")
    length_penalty: float = Field(1.0, description="vLLM: beam score / length**penalty.")

    def check_supported(self) -> None:
        """400 naming the first field set to something this server does not do."""
        for field, (neutral, wording) in UNSUPPORTED.items():
            value = getattr(self, field)
            if not neutral(value):
                raise RequestError(
                    f"{field}={json.dumps(value)} is not supported by this server; leave it "
                    f"unset or send {wording}",
                    field,
                )
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs=true", "top_logprobs")
        if self.logprobs and self.stream:
            raise RequestError("logprobs are not available when streaming", "logprobs")
        if self.use_beam_search and self.n != 1:
            raise RequestError(
                "use_beam_search returns the best beam only: send n=1 and the beam width as "
                "best_of",
                "n",
            )
        if not self.use_beam_search and self.best_of not in (None, self.n):
            raise RequestError("best_of other than n needs use_beam_search=true", "best_of")

    def chat_params(self, config: ServeConfig, vocab_size: int) -> GenerationParams:
        """GenerationParams for a model of `vocab_size` token ids (400 naming a bad field)."""
        params = self.to_params(
            config,
            self.max_completion_tokens or self.max_tokens,
            top_k=max(self.top_k or 0, 0),
            num_beams=(self.best_of or 1) if self.use_beam_search else 1,
            length_penalty=self.length_penalty,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            stop_token_ids=tuple(self.stop_token_ids or ()),
        )
        try:
            params.check_vocab(vocab_size)
        except ValueError as error:
            raise RequestError(str(error), "stop_token_ids") from None
        return params

    def conversation(self) -> tuple[tuple[Turn, ...], list[str]]:
        """The chat as turns (parts in the order sent, None where an image goes) and the
        image URLs in that order. `developer` is OpenAI's new name for `system`."""
        turns, urls = [], []
        for message in self.messages:
            role = "system" if message.role == "developer" else message.role
            content = message.content
            parts = [TextPart(type="text", text=content)] if isinstance(content, str) else content
            out: list[str | None] = []
            for part in parts:
                if isinstance(part, TextPart):
                    out.append(part.text)
                elif role != "user":
                    raise RequestError("images are only accepted in user messages", "messages")
                else:
                    out.append(None)
                    urls.append(part.image_url.url)
            turns.append(Turn(role, tuple(out)))
        if not any(turn.role == "user" for turn in turns):
            raise RequestError("a chat needs at least one user message", "messages")
        return tuple(turns), urls

    def to_samples(self, images: tuple[Image.Image, ...], params: GenerationParams) -> list[Sample]:
        """One Sample per choice; choices get consecutive seeds so sampled choices differ.

        One choice without a seed keeps seed None, exactly like `LVLM.generate` (views then use
        their fixed default randomness and sampling is nondeterministic).
        """
        turns, _ = self.conversation()
        text = chat_text(turns)
        if params.seed is None and self.n == 1:
            return [Sample(text, images, chat=turns)]
        base = params.seed if params.seed is not None else secrets.randbelow(2**31)
        return [Sample(text, images, base + i, chat=turns) for i in range(self.n)]


def chat_text(turns: tuple[Turn, ...]) -> str:
    """All text of a chat, one part a line (the prompt-length check reads it)."""
    return "\n".join(part for turn in turns for part in turn.parts if part is not None)


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


class TopLogprob(_Open):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Open):
    content: list[TokenLogprob]


class Choice(_Open):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None
    token_ids: list[int] | None = Field(None, description="Not in OpenAI spec: generated ids.")
    attention_paths: list[str] | None = Field(
        None, description="Not in OpenAI spec: the attention paths that ran."
    )


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
    attention_paths: list[str] = Field(
        default_factory=list, description="The attention paths that ran (sdpa, fused, modifiers)."
    )
    usage: Usage


class ModelCard(_Open):
    """A model id: the server's model (its default interventions) or a preset on it, which
    names the model as `parent`, as vLLM lists LoRA adapters."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "lvlm-fix"
    root: str
    parent: str | None = None
    interventions: list[dict[str, Any]] = Field(description="Not in OpenAI spec: the preset.")


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
