"""Shared fixtures: tiny LLaVA-family checkpoints built from config (no network, ever)."""

from __future__ import annotations

import os
import shutil

# Triton has no CPU backend: without a GPU, its kernels run in the interpreter. This must be set
# before anything imports triton (transformers does, indirectly).
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from lvlm_fix.tiny import FAMILIES, build_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory) -> dict[str, str]:
    """One tiny random checkpoint per family, built once per test session."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: str(build_tiny(family, root / family)) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_llava_path(tiny_paths) -> str:
    return tiny_paths["llava"]


def make_image(color: tuple[int, int, int], size: tuple[int, int] = (40, 32)) -> Image.Image:
    """A small image with a shape on it, so different images give different features."""
    image = Image.new("RGB", size, (240, 240, 240))
    draw = ImageDraw.Draw(image)
    draw.ellipse((4, 4, size[0] - 6, size[1] - 8), fill=color)
    return image


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    return [make_image((200, 20, 20)), make_image((20, 160, 40), (30, 50))]
