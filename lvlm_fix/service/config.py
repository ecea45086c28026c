"""Server settings that cross a boundary (YAML file, CLI, Ray app args): pydantic models."""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lvlm_fix.engine import EngineConfig

API_KEY_ENV = "LVLM_FIX_API_KEY"


class ServeConfig(BaseModel):
    """Limits and switches of the HTTP service. Each field says which value turns it off."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str = Field("lvlm-fix", description="Model id shown in /v1/models and responses.")
    api_key: str | None = Field(
        None,
        description=f"Require `Authorization: Bearer KEY` (None = ${API_KEY_ENV} if set, else "
        "off).",
    )
    public_docs: bool = Field(
        False, description="Serve /docs, /redoc and /openapi.json without the API key."
    )
    public_metrics: bool = Field(False, description="Serve /metrics without the API key.")
    max_request_bytes: int = Field(
        64 << 20, ge=1, description="Largest request body accepted (413 beyond it)."
    )
    max_image_bytes: int = Field(10 << 20, ge=1, description="Largest encoded image accepted.")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="Largest width*height accepted.")
    # The processors resize the shortest side to the vision tower's size (336 for LLaVA-1.5)
    # before cropping, so the intermediate image is ratio x that size: a 1x40000 PNG becomes
    # 336x13,440,000 pixels (GBs). 20 keeps it under 336x6720 (2.3 M pixels) and still admits
    # panoramas (about 4:1 to 10:1) and long screenshots or receipts.
    max_image_aspect_ratio: float = Field(
        20.0, ge=1, description="Largest long side / short side of an image."
    )
    max_images: int = Field(4, ge=0, description="Images per request at most.")
    max_prompt_chars: int = Field(16_000, ge=1, description="Longest prompt text accepted.")
    max_tokens_limit: int = Field(1024, ge=1, description="Upper bound on a request's max_tokens.")
    default_max_tokens: int = Field(64, ge=1, description="max_tokens when a request gives none.")
    max_n: int = Field(8, ge=1, description="Upper bound on choices per request.")
    allow_image_urls: bool = Field(
        False,
        description="Fetch http(s) image URLs (False = only data: URLs / uploads). Only public "
        "addresses are fetched: loopback, private, link-local, multicast, reserved and "
        "unspecified targets are refused, also after each redirect.",
    )
    image_url_allow_hosts: tuple[str, ...] = Field(
        (),
        description="Exact `host:port` entries (as written in the URL) fetched even when they "
        "resolve to a non-public address, e.g. an internal image store or a test server. "
        "A redirect away from them is checked like any other URL.",
    )
    image_url_max_redirects: int = Field(3, ge=0, description="Redirects followed (0 = none).")
    image_url_timeout_s: float = Field(
        10.0, gt=0, description="Total time of one image fetch, redirects included."
    )
    dyvte_routers: dict[str, str] = Field(
        {},
        description="DyVTE routers requests may name: name -> file, checked at startup. "
        "'auto' (the router next to the model) is offered when that file exists.",
    )
    default_interventions: tuple[dict[str, Any], ...] = Field(
        (),
        description="Interventions of the model id `model_name`, used when a request names no "
        "preset and sends no `interventions` (empty = plain decoding).",
    )
    presets: dict[str, tuple[dict[str, Any], ...]] = Field(
        {},
        description="More model ids, each a set of interventions, e.g. "
        "{'lvlm-fix+vhr': [{name: vhr}]}: listed by /v1/models and chosen by a request's "
        "`model` (its `interventions` still override). Compiled at startup.",
    )

    @model_validator(mode="after")
    def _distinct_ids(self) -> ServeConfig:
        if self.model_name in self.presets:
            raise ValueError(f"presets: {self.model_name!r} is model_name's own id")
        return self

    def model_ids(self) -> dict[str, tuple[dict[str, Any], ...]]:
        """Every model id with its interventions, `model_name` first."""
        return {self.model_name: self.default_interventions, **self.presets}

    def resolved_api_key(self) -> str | None:
        """The key in force: this config's, else the environment's (None = no auth)."""
        return self.api_key or os.environ.get(API_KEY_ENV) or None


class EngineSettings(BaseModel):
    """Sizes and mode of a model's engine (`lvlm_fix.engine.EngineConfig`), fixed when it
    starts. A field left out (None) takes the engine's default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    slots: int | None = Field(
        None,
        ge=1,
        description="Decode rows of the shared batch; a sample takes one per view (default: as "
        "many as memory_share of the free GPU memory holds, at most 64; 8 on CPU).",
    )
    max_len: int | None = Field(
        None,
        ge=2,
        description="Prompt + new tokens per row (default: the model's context, at most 4096).",
    )
    memory_share: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Share of the free GPU memory for the slots when `slots` is not given "
        f"(default {EngineConfig.memory_share}).",
    )
    prefill_tokens: int | None = Field(
        None,
        ge=1,
        description="Prompt tokens prefilled per engine step; one request always is "
        f"(default {EngineConfig.prefill_tokens}).",
    )
    own_lane: int | None = Field(
        None,
        ge=1,
        description="Requests decoding in lanes of their own at once: beam search, OPERA, "
        f"pruning (default {EngineConfig.own_lane}).",
    )
    batch_invariant: bool | None = Field(
        None,
        description="Every shared step at full width, so a request's tokens never depend on "
        "what else runs, on a GPU too; costs full-width steps at low load (default off).",
    )

    def config(self) -> EngineConfig:
        return EngineConfig(**self.model_dump(exclude_none=True))
