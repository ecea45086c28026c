"""RITUAL's six random image transforms, drawn from a per-sample torch.Generator.

The reference draws one of six torchvision `v2` transforms per sample and applies it to the raw
PIL image, before the model's own preprocessing. We reimplement the same distributions with PIL and
torch (no torchvision), and draw every random number from the given generator, so a sample's
transform does not depend on its batch-mates or on global RNG state.

Every transform but the crop keeps the image size. The crop is `RandomResizedCrop(size)` as in
the reference: a square at the model's input side (336 for LLaVA-1.5), so the processor keeps all
of it, whatever the original's aspect ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance

TRANSFORM_KEYS: tuple[str, ...] = (
    "horizontal flip",
    "vertical flip",
    "rotation",
    "color jitter",
    "gaussian blur",
    "crop",
)


@dataclass(frozen=True)
class AppliedTransform:
    """Which transform was drawn and its parameters (recorded in outputs for reproducibility)."""

    key: str
    params: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.params:
            return self.key
        args = ", ".join(f"{k}={_short(v)}" for k, v in self.params.items())
        return f"{self.key}({args})"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=generator))


def _randint(generator: torch.Generator, high: int) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(high, (1,), generator=generator))


def random_transform(
    image: Image.Image, generator: torch.Generator, size: int
) -> tuple[Image.Image, AppliedTransform]:
    """Draw one of the six transforms uniformly, apply it; returns (image, what was applied).

    size: the model's input side, the crop's output square."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"expected a torch.Generator, got {type(generator).__name__}")
    image = image.convert("RGB") if image.mode != "RGB" else image
    key = TRANSFORM_KEYS[_randint(generator, len(TRANSFORM_KEYS))]
    if key == "crop":
        return _crop(image, generator, size)
    return _APPLY[key](image, generator)


def transformed_image(
    image: Image.Image, generator: torch.Generator, size: int
) -> tuple[Image.Image, str]:
    """`random_transform` with the description as text, as `View.image_fn` returns it."""
    image, applied = random_transform(image, generator, size)
    return image, str(applied)


@dataclass(frozen=True)
class RandomTransform:
    """`View.image_fn`: `transformed_image` for a model whose input side is `size`."""

    size: int

    def __call__(self, image: Image.Image, generator: torch.Generator) -> tuple[Image.Image, str]:
        return transformed_image(image, generator, self.size)


def _horizontal_flip(image: Image.Image, _: torch.Generator):
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), AppliedTransform("horizontal flip")


def _vertical_flip(image: Image.Image, _: torch.Generator):
    return image.transpose(Image.Transpose.FLIP_TOP_BOTTOM), AppliedTransform("vertical flip")


def _rotation(image: Image.Image, generator: torch.Generator):
    # RandomRotation(180): counter-clockwise degrees, nearest, same size, black corners.
    angle = _uniform(generator, -180.0, 180.0)
    out = image.rotate(angle, resample=Image.Resampling.NEAREST, expand=False, fillcolor=(0, 0, 0))
    return out, AppliedTransform("rotation", {"angle": angle})


def _color_jitter(image: Image.Image, generator: torch.Generator):
    # ColorJitter(1, 1, 1, 0.5): torchvision draws the op order first, then the four factors.
    order = torch.randperm(4, generator=generator).tolist()
    brightness = _uniform(generator, 0.0, 2.0)
    contrast = _uniform(generator, 0.0, 2.0)
    saturation = _uniform(generator, 0.0, 2.0)
    hue = _uniform(generator, -0.5, 0.5)
    ops = (
        lambda im: ImageEnhance.Brightness(im).enhance(brightness),
        lambda im: ImageEnhance.Contrast(im).enhance(contrast),
        lambda im: ImageEnhance.Color(im).enhance(saturation),
        lambda im: _shift_hue(im, hue),
    )
    for index in order:
        image = ops[index](image)
    names = ("brightness", "contrast", "saturation", "hue")
    params = {
        "order": [names[i] for i in order],
        "brightness": brightness,
        "contrast": contrast,
        "saturation": saturation,
        "hue": hue,
    }
    return image, AppliedTransform("color jitter", params)


def _shift_hue(image: Image.Image, hue: float) -> Image.Image:
    """Rotate the hue channel by `hue` turns (uint8 wrap-around, as torchvision does on PIL)."""
    h, s, v = image.convert("HSV").split()
    shifted = (np.asarray(h, dtype=np.int16) + int(hue * 255)) % 256
    h = Image.fromarray(shifted.astype(np.uint8), mode="L")
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def _gaussian_blur(image: Image.Image, generator: torch.Generator):
    # GaussianBlur(13, sigma=(1.5, 2)): separable 13-tap kernel, reflect padding, uint8 rounding.
    # numpy, not torch: on small images torch's per-op thread setup dominates the cost.
    sigma = _uniform(generator, 1.5, 2.0)
    size, pad = 13, 6
    x = np.linspace(-pad, pad, size, dtype=np.float32)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    pixels = np.asarray(image, dtype=np.float32)  # [H, W, 3]
    # Reflect padding needs the image larger than the pad; tiny images fall back to edge.
    mode = "reflect" if min(image.size) > pad else "edge"
    pixels = np.pad(pixels, ((pad, pad), (pad, pad), (0, 0)), mode=mode)
    height, width = image.height, image.width
    pixels = sum(kernel[k] * pixels[:, k : k + width] for k in range(size))
    pixels = sum(kernel[k] * pixels[k : k + height] for k in range(size))
    out = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="RGB"), AppliedTransform("gaussian blur", {"sigma": sigma})


def _crop(image: Image.Image, generator: torch.Generator, size: int):
    # RandomResizedCrop(size): area scale U[0.08, 1], log-uniform ratio in [3/4, 4/3], 10 tries,
    # then the box resized to size x size.
    width, height = image.size
    top, left, h, w = _crop_box(width, height, generator)
    out = image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    return out, AppliedTransform("crop", {"top": top, "left": left, "height": h, "width": w})


def _crop_box(width: int, height: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from `generator`."""
    area = width * height
    log_low, log_high = math.log(3 / 4), math.log(4 / 3)
    for _ in range(10):
        target = area * _uniform(generator, 0.08, 1.0)
        ratio = math.exp(_uniform(generator, log_low, log_high))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = _randint(generator, height - h + 1)
            left = _randint(generator, width - w + 1)
            return top, left, h, w
    # Fallback: the largest centre crop whose ratio lies in [3/4, 4/3].
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif ratio > 4 / 3:
        h, w = height, int(round(height * (4 / 3)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


_APPLY = {
    "horizontal flip": _horizontal_flip,
    "vertical flip": _vertical_flip,
    "rotation": _rotation,
    "color jitter": _color_jitter,
    "gaussian blur": _gaussian_blur,
}
