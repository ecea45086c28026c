"""Tiny LLaVA-family checkpoints built from config, for tests and benchmarks.

Nothing here downloads anything: the tokenizer is trained locally on a small corpus and the
weights are random (seeded). `build_tiny(family, path)` writes a directory that
`LVLM.from_pretrained(path)` and transformers' own `from_pretrained` both load offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

FAMILIES = ("llava", "llava_next", "llava_onevision")
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>"]

# LLaVA-1.5's conversation layout ("USER: <image>\n{question} ASSISTANT:"), as a jinja template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %} {% else %}ASSISTANT: "
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_WORDS = (
    "a an the is there in image picture photo yes no what color shape red green blue yellow black "
    "white orange purple pink gray brown cup saucer star moon key umbrella fish tree house car "
    "sun cloud boat bird left right top bottom center next to on of and with sits near small large "
    "describe this detail please answer question one word how many it its are two three four"
)


class OnevisionImageProcessor(LlavaOnevisionProcessor):
    """LLaVA-OneVision's processor for images only: its video processor needs torchvision."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        return ["image_processor", "tokenizer"]


def train_tokenizer(corpus: list[str], vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `corpus`, with LLaVA's special tokens."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        add_bos_token=True,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def llava_processor(
    tokenizer: PreTrainedTokenizerFast, image_size: int, patch_size: int
) -> LlavaProcessor:
    """LLaVA-1.5's processor: CLIP preprocessing (short-edge resize, centre crop), chat template."""
    size = {"shortest_edge": image_size}
    crop = {"height": image_size, "width": image_size}
    return LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size=size, crop_size=crop),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by "default"
    )


def _text_config(family: str, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int):
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    if family == "llava_onevision":  # OneVision's backbone is Qwen2 (GQA, q/k/v biases)
        return Qwen2Config(**common)
    return LlamaConfig(**common)


def build_tiny(
    family: str,
    path: str | Path,
    *,
    corpus: list[str] | None = None,
    image_size: int = 32,
    patch_size: int = 8,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a random tiny checkpoint of `family` (llava, llava_next, llava_onevision) to `path`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    path = Path(path)
    tokenizer = train_tokenizer(corpus or [_WORDS] * 4)
    vocab = len(tokenizer)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    kv_heads = kv_heads or (heads // 2 if family == "llava_onevision" else heads)
    text_config = _text_config(family, vocab, hidden, layers, heads, kv_heads)
    vision_kwargs = dict(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    torch.manual_seed(seed)
    grid = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]]
    if family == "llava":
        config = LlavaConfig(
            vision_config=CLIPVisionConfig(**vision_kwargs, projection_dim=hidden),
            text_config=text_config,
            image_token_id=image_token_id,
        )
        model = LlavaForConditionalGeneration(config)
        processor = llava_processor(tokenizer, image_size, patch_size)
    elif family == "llava_next":
        config = LlavaNextConfig(
            vision_config=CLIPVisionConfig(**vision_kwargs, projection_dim=hidden),
            text_config=text_config,
            image_token_id=image_token_id,
            image_grid_pinpoints=grid,
        )
        model = LlavaNextForConditionalGeneration(config)
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_grid_pinpoints=grid,
        )
        processor = LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy="default",
            chat_template=CHAT_TEMPLATE,
            num_additional_image_tokens=1,
        )
    else:
        config = LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**vision_kwargs),
            text_config=text_config,
            image_token_id=image_token_id,
            video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
            image_grid_pinpoints=grid,
            vision_feature_layer=-1,
        )
        model = LlavaOnevisionForConditionalGeneration(config)
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": image_size, "width": image_size},
            image_grid_pinpoints=grid,
        )
        processor = OnevisionImageProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            num_image_tokens=(image_size // patch_size) ** 2,
            vision_feature_select_strategy="full",
            chat_template=CHAT_TEMPLATE,
        )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
