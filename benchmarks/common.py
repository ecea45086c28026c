"""What the GPU benchmarks share: a random-weight LLaVA-1.5 and timing helpers.

The benchmark model has LLaVA-1.5-7B's architecture (Llama-2-7B text, CLIP ViT-L/14-336 vision,
576 image tokens) with random weights: speed does not depend on the weight values, and nothing
is downloaded. The "tiny" preset is the same architecture at toy sizes, for CPU smoke runs.

Scripts run as `python benchmarks/<name>.py` have this folder on sys.path: `from common import`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from lvlm_fix import LVLM
from lvlm_fix.tiny import llava_processor, train_tokenizer

# The tokenizer is trained on the benchmarks' own prompts, so they tokenize into whole words.
CORPUS = [
    "USER: Please help me describe the image in detail. ASSISTANT: a photo of a cat and a dog "
    "on a red sofa near the window in the sunny room. Please describe this image in detail."
] * 8


@dataclass(frozen=True)
class Sizes:
    """Dimensions of a LLaVA-1.5 model: Llama text decoder + CLIP vision tower."""

    name: str  # the LVLM's name, as the benchmarks report it
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int  # no GQA: key/value heads == query heads, as in Llama-2-7B
    max_positions: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int  # pixels of the square crop the vision tower sees
    patch_size: int  # (image_size // patch_size) ** 2 image tokens per image
    feature_layer: int = -2  # LLaVA-1.5 projects the penultimate CLIP layer
    feature_strategy: str = "default"  # "default" drops CLIP's CLS token


SIZES = {
    "llava-1.5-7b": Sizes(
        name="llava-1.5-7b-random", vocab=32064, hidden=4096, intermediate=11008, layers=32,
        heads=32, max_positions=4096, vision_hidden=1024, vision_intermediate=4096,
        vision_layers=24, vision_heads=16, image_size=336, patch_size=14,
    ),
    "tiny": Sizes(
        name="tiny", vocab=512, hidden=64, intermediate=128, layers=4, heads=4,
        max_positions=2048, vision_hidden=64, vision_intermediate=128, vision_layers=2,
        vision_heads=4, image_size=32, patch_size=8,
    ),
}  # fmt: skip


def llava_config(sizes: Sizes, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    if len(tokenizer) > sizes.vocab:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than vocab {sizes.vocab}")
    text = LlamaConfig(
        vocab_size=sizes.vocab,
        hidden_size=sizes.hidden,
        intermediate_size=sizes.intermediate,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.heads,
        max_position_embeddings=sizes.max_positions,
        rms_norm_eps=1e-5,  # Llama-2's
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=sizes.vision_hidden,
        intermediate_size=sizes.vision_intermediate,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads,
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        hidden_act="quick_gelu",
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=sizes.feature_layer,
        vision_feature_select_strategy=sizes.feature_strategy,
    )


def build_llava(preset: str, device: str | torch.device, dtype: torch.dtype) -> LVLM:
    """A random-weight LLaVA-1.5 of `SIZES[preset]`, created directly on `device` in `dtype`."""
    model, processor = build_model(preset, device, dtype)
    return LVLM(model, processor, name=SIZES[preset].name)


def build_model(preset: str, device: str | torch.device, dtype: torch.dtype):
    """(model, processor) of `build_llava`, as transformers has them: what `save_pretrained`
    writes as a checkpoint."""
    if preset not in SIZES:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(SIZES)}")
    sizes = SIZES[preset]
    tokenizer = train_tokenizer(CORPUS)
    # Every id the model can emit gets text of its own, as with a real checkpoint's tokenizer:
    # random weights pick ids all over the vocabulary, and ids past the trained tokenizer's few
    # hundred decode to nothing, so a stream would send one text chunk per several tokens (and
    # chunk gaps would read as several steps). Prompts tokenize as before (no prompt holds "~N").
    tokenizer.add_tokens([f"~{i}" for i in range(len(tokenizer), sizes.vocab)])
    tokenizer.padding_side = "left"  # batched generation appends on the right
    config = llava_config(sizes, tokenizer)
    torch.manual_seed(0)
    # under torch.device the weights are allocated on the GPU: a 7B model never sits in host RAM
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, llava_processor(tokenizer, sizes.image_size, sizes.patch_size)


def sync(device: str | torch.device) -> None:
    """Wait for the device's queued kernels, so that wall-clock times cover them."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timer(device: str | torch.device) -> Callable[[Callable[[], object]], float]:
    """Milliseconds per call: triton's do_bench on CUDA, a median of repeats on CPU."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100)

    def cpu(fn: Callable[[], object]) -> float:
        fn()  # warm-up
        times = []
        for _ in range(7):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1000 * sorted(times)[len(times) // 2]

    return cpu


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
