"""Server settings that cross a boundary (YAML file, CLI, Ray app args): one pydantic model."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ServeConfig(BaseModel):
    """Limits and switches of the HTTP service. Each field says which value turns it off."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str = Field("lvlm-fix", description="Model id shown in /v1/models and responses.")
    api_key: str | None = Field(
        None, description="Require `Authorization: Bearer KEY` (None = off)."
    )
    max_image_bytes: int = Field(10 << 20, ge=1, description="Largest encoded image accepted.")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="Largest width*height accepted.")
    max_images: int = Field(4, ge=0, description="Images per request at most.")
    max_prompt_chars: int = Field(16_000, ge=1, description="Longest prompt text accepted.")
    max_tokens_limit: int = Field(1024, ge=1, description="Upper bound on a request's max_tokens.")
    default_max_tokens: int = Field(64, ge=1, description="max_tokens when a request gives none.")
    max_n: int = Field(8, ge=1, description="Upper bound on choices per request.")
    allow_image_urls: bool = Field(
        False, description="Fetch http(s) image URLs (False = only data: URLs / uploads)."
    )
    image_url_timeout_s: float = Field(10.0, gt=0, description="Timeout of one image fetch.")
    default_interventions: tuple[dict[str, Any], ...] = Field(
        (), description="Interventions used when a request sends none (empty = plain decoding)."
    )
