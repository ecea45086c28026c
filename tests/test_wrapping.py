"""`LVLM(model, processor)` on a model loaded by plain transformers equals `from_pretrained`.

Every registered method runs on both at a setting that changes the model's logits; the wrapped
model must give the same tokens and bit-identical logits at every forward (a method that
silently did nothing would give the plain model's logits instead).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import make_image
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoProcessor,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
)

from lvlm_fix import LVLM, GenerationParams, Sample
from lvlm_fix.methods import REGISTRY
from lvlm_fix.tiny import OnevisionImageProcessor, build_tiny

PARAMS = GenerationParams(max_new_tokens=4)
SAMPLE = Sample("what color is the star", (make_image((200, 20, 20), (64, 64)),))


def method_spec(name: str, router: str) -> dict:
    """A setting of each registered method that changes a tiny random model's logits."""
    specs = {
        "var": {"name": "var", "sink_dims": list(range(8)), "tau": 2.0},  # no massive dims here
        "vhr": {"name": "vhr"},
        "pai": {"name": "pai", "alpha": 1.0},
        "opera": {"name": "opera", "num_beams": 2, "candidates": 2},
        "fastv": {"name": "fastv", "keep": 8},
        "flowcut": {"name": "flowcut", "budget": 16},
        "gift": {"name": "gift"},
        "dyvte": {"name": "dyvte", "router": router, "threshold": 0.4},
        "ritual": {"name": "ritual"},
        "vcd": {"name": "vcd"},
        "act": {"name": "act", "threshold": 0.0},  # every column a sink: no sinks at 0.1 here
        "m3id": {"name": "m3id"},
        "pai_cfg": {"name": "pai_cfg"},
        "paint": {"name": "paint"},
    }
    return specs[name]


@pytest.fixture(scope="module")
def path(tmp_path_factory) -> str:
    """A tiny LLaVA whose 6-layer vision tower leaves FlowCut stages before the read layer."""
    path = tmp_path_factory.mktemp("wrap") / "llava"
    build_tiny("llava", path, image_size=64)
    config = AutoConfig.from_pretrained(path)
    config.vision_config.num_hidden_layers = 6
    torch.manual_seed(1)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def router(path) -> str:
    """DyVTE routers with zero weights: p(exit) = 0.5 at every layer, so a 0.4 threshold exits
    at the first router."""
    config = AutoConfig.from_pretrained(path).text_config
    layers, hidden = config.num_hidden_layers, config.hidden_size
    file = f"{path}/zero_router.safetensors"
    save_file({"w1": torch.zeros(layers, 1, 2 * hidden), "w2": torch.zeros(layers, 2, 1)}, file)
    return file


@pytest.fixture(scope="module")
def loaded(path) -> LVLM:
    return LVLM.from_pretrained(path)


@pytest.fixture(scope="module")
def wrapped(path) -> LVLM:
    model = LlavaForConditionalGeneration.from_pretrained(path)
    return LVLM(model, AutoProcessor.from_pretrained(path))


@contextlib.contextmanager
def captured_logits(lvlm: LVLM):
    """Every forward's last-position logits [R, V] while the block runs."""
    seen: list[torch.Tensor] = []
    hook = lvlm.model.lm_head.register_forward_hook(
        lambda module, args, out: seen.append(out[:, -1].clone())
    )
    try:
        yield seen
    finally:
        hook.remove()


def run(lvlm: LVLM, interventions: list[dict]) -> tuple[list[int], list[torch.Tensor]]:
    with captured_logits(lvlm) as logits:
        [out] = lvlm.generate([SAMPLE], interventions, PARAMS)
    return out.token_ids, logits


def same_logits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_wrapped_model_equals_from_pretrained(loaded, wrapped, router, name):
    spec = [method_spec(name, router)]
    tokens, logits = run(loaded, spec)
    _, plain = run(loaded, [])
    assert not same_logits(logits, plain), f"{spec} changes nothing on this model"
    wrapped_tokens, wrapped_logits = run(wrapped, spec)
    assert wrapped_tokens == tokens
    assert same_logits(wrapped_logits, logits)
    assert wrapped.plan(spec).config_id == loaded.plan(spec).config_id


def test_wrapping_twice_installs_the_hook_points_once(path, loaded):
    model = LlavaForConditionalGeneration.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    LVLM(model, processor)
    again = LVLM(model, processor)
    spec = [{"name": "fastv", "keep": 8}]
    assert run(again, spec)[0] == run(loaded, spec)[0]


def test_family_comes_from_the_config(tiny_paths):
    path = tiny_paths["llava_onevision"]
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(path)
    lvlm = LVLM(model, OnevisionImageProcessor.from_pretrained(path))
    assert lvlm.family == "llava_onevision" and lvlm.info.path == path
    spec = [{"name": "vhr"}]
    assert run(lvlm, spec)[0] == run(LVLM.from_pretrained(path), spec)[0]


def test_refuses_models_it_cannot_drive(path):
    bare = LlavaForConditionalGeneration.from_pretrained(path).model  # no language-model head
    processor = AutoProcessor.from_pretrained(path)
    with pytest.raises(TypeError, match="wraps LlavaForConditionalGeneration"):
        LVLM(bare, processor)
    with pytest.raises(TypeError, match=r"expected the model's processor \(LlavaProcessor\)"):
        LVLM(LlavaForConditionalGeneration.from_pretrained(path), processor.tokenizer)
    config = LlamaConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=1)
    text_only = LlamaForCausalLM(config)
    with pytest.raises(ValueError, match="unsupported model type 'llama'"):
        LVLM(text_only, processor)
