"""Generation parameters of one request: one flat, self-validating object (like vLLM's)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
    logprobs: int | None = Field(
        None,
        ge=0,
        le=20,
        description="Report each generated token's log-prob and this many top alternatives, "
        "from the scores the search chose from (None = off; greedy or sampling only).",
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
