"""The gym's model: transformers' own LlavaForConditionalGeneration at a tiny size.

A CLIP-style vision tower (96 x 96 images, patch 8: 144 image tokens after dropping CLS), the
LLaVA two-layer projector and a small Llama decoder, with a tokenizer trained on the gym's text.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from lvlm_fix.gym.world import CANVAS
from lvlm_fix.tiny import llava_processor


@dataclass(frozen=True)
class GymModelConfig:
    """Sizes of the shipped model (6.17 M parameters with its 601-token vocabulary: 12.4 MB in
    fp16)."""

    patch_size: int = 8  # CANVAS / patch = 12 -> 144 image tokens
    vision_hidden: int = 192
    vision_layers: int = 6
    vision_heads: int = 6
    text_hidden: int = 256
    text_layers: int = 4
    text_heads: int = 8
    text_intermediate: int = 640
    max_positions: int = 512  # <s> + prompt + 144 image tokens + a caption of ~100 tokens


def build_model(
    tokenizer: PreTrainedTokenizerFast, cfg: GymModelConfig
) -> LlavaForConditionalGeneration:
    """A randomly initialised model sized by `cfg` for `tokenizer` (seed torch before calling)."""
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=4 * cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=CANVAS,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        # The last vision layer's output (LLaVA-1.5 takes the second to last; at this size a
        # whole unused layer would be dead weight in the shipped file).
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=(CANVAS // cfg.patch_size) ** 2,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def build_processor(tokenizer: PreTrainedTokenizerFast, cfg: GymModelConfig) -> LlavaProcessor:
    return llava_processor(tokenizer, CANVAS, cfg.patch_size)
