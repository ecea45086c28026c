"""VCD: contrast the logits with those of a diffusion-noised copy of the image.

z = (1 + alpha) * l0 - alpha * ln, then the plausibility cut on l0 (specs/ritual.md §4). The noise
is the forward diffusion q(x_t | x_0) of a sigmoid beta schedule, applied once per sample to the
PREPROCESSED pixel tensor, with eps drawn from the sample's view generator. The original view's
weight is raised through `base_weight`, so with RITUAL the sum gives the spec's §6 weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import Field

from lvlm_fix.methods.base import (
    ConstantWeight,
    Contribution,
    HookPoint,
    Intervention,
    View,
    register,
)
from lvlm_fix.model import ModelInfo

NUM_DIFFUSION_STEPS = 1000


def noise_schedule(num_steps: int = NUM_DIFFUSION_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(alpha_bar), sqrt(1 - alpha_bar)) per step, float64 [num_steps] each.

    betas = sigmoid(linspace(-6, 6)) * (5e-3 - 1e-5) + 1e-5; alpha_bar = cumprod(1 - betas).
    """
    betas = torch.sigmoid(torch.linspace(-6, 6, num_steps, dtype=torch.float64))
    betas = betas * (5e-3 - 1e-5) + 1e-5
    alpha_bar = torch.cumprod(1 - betas, 0)
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def add_diffusion_noise(
    pixels: torch.Tensor, noise_step: int, generator: torch.Generator
) -> torch.Tensor:
    """x_t = sqrt(ab[t]) * x_0 + sqrt(1 - ab[t]) * eps, eps ~ N(0, I) from `generator` (CPU).

    pixels: any shape (LLaVA [n, 3, H, W]; NeXT [n, patches, 3, H, W]); returns the same shape.
    """
    if not 0 <= noise_step < NUM_DIFFUSION_STEPS:
        raise ValueError(f"noise_step must be in [0, {NUM_DIFFUSION_STEPS}), got {noise_step}")
    signal, noise = noise_schedule()
    eps = torch.randn(pixels.shape, generator=generator, dtype=torch.float32)
    noised = signal[noise_step] * pixels.float().cpu() + noise[noise_step] * eps
    return noised.to(device=pixels.device, dtype=pixels.dtype)


@dataclass(frozen=True)
class DiffusionNoise:
    """`View.pixel_fn`: `add_diffusion_noise` at a fixed diffusion step."""

    noise_step: int

    def __call__(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return add_diffusion_noise(pixels, self.noise_step, generator)


@register
class VCD(Intervention):
    """Visual contrastive decoding (arXiv 2311.16922)."""

    name: ClassVar[str] = "vcd"
    hooks: ClassVar[frozenset[HookPoint]] = frozenset({"views"})

    alpha: float = Field(
        1.0, ge=0.0, le=100.0, description="Contrast strength alpha_neg (0 = off)."
    )
    beta: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Plausibility cut: keep tokens with p0 >= beta * max p0 (0 = no cut).",
    )
    noise_step: int = Field(
        500,
        ge=0,
        lt=NUM_DIFFUSION_STEPS,
        description="Diffusion step t of the noise (0-based; larger = noisier).",
    )

    def is_neutral(self) -> bool:
        return self.alpha == 0

    def contribute(self, model: ModelInfo) -> Contribution:
        view = View(
            "vcd.noised",
            weight=ConstantWeight(-self.alpha),
            pixel_fn=DiffusionNoise(self.noise_step),
        )
        return Contribution(
            views=(view,), base_weight=ConstantWeight(self.alpha), plausibility_beta=self.beta
        )
