"""Generation parameters of one request: one flat, self-validating object (like vLLM's)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class GenerationParams(BaseModel):
    """How to pick tokens. Each field says which value turns it off."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_new_tokens: int = Field(64, ge=1, le=4096, description="Generated tokens at most.")
    do_sample: bool = Field(False, description="Sample instead of greedy/beam (False = greedy).")
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="Sampling temperature (1 = off).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (1 = off).")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens (0 = off).")
    num_beams: int = Field(1, ge=1, le=16, description="Beam search width (1 = off).")
    length_penalty: float = Field(1.0, description="Beam score / length**penalty (HF default 1).")
    early_stopping: bool = Field(False, description="Beam: stop once num_beams are finished.")
    seed: int | None = Field(None, ge=0, description="Sampling seed (None = nondeterministic).")
    stop: tuple[str, ...] = Field((), max_length=8, description="Stop strings (empty = off).")
    # vLLM's stop extras, with vLLM's meaning (see `search.Limits` for how they act).
    stop_token_ids: tuple[Annotated[int, Field(ge=0)], ...] = Field(
        (),
        max_length=64,
        description="Token ids that end a sample like EOS: left out of its tokens and text "
        "(empty = off).",
    )
    ignore_eos: bool = Field(
        False, description="EOS does not end a sample; it is kept like any token (False = off)."
    )
    min_tokens: int = Field(
        0,
        ge=0,
        le=4096,
        description="Tokens a sample has before EOS, a stop token or a stop string may end it "
        "(0 = off).",
    )
    logprobs: int | None = Field(
        None,
        ge=0,
        le=20,
        description="Report each generated token's log-prob and this many top alternatives, "
        "from the scores the search chose from, before min_tokens masks any (None = off; "
        "greedy or sampling only).",
    )

    @model_validator(mode="after")
    def _check(self) -> GenerationParams:
        if self.do_sample and self.num_beams > 1:
            raise ValueError("beam sampling is not supported: set do_sample=False or num_beams=1")
        if self.logprobs is not None and self.num_beams > 1:
            raise ValueError("logprobs are not available with beam search (num_beams > 1)")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        return self

    @field_validator("min_tokens")
    @classmethod
    def _within_max_new_tokens(cls, value: int, info: ValidationInfo) -> int:
        limit = info.data.get("max_new_tokens")  # absent when it failed its own checks
        if limit is not None and value > limit:
            raise ValueError(f"must be at most the new tokens allowed ({limit})")
        return value

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse stop_token_ids outside a model's vocabulary (ids 0 .. vocab_size - 1)."""
        outside = [token for token in self.stop_token_ids if token >= vocab_size]
        if outside:
            raise ValueError(
                f"stop_token_ids {outside} are outside the model's vocabulary of {vocab_size} ids"
            )
