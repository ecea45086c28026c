"""Big checkpoints: `device_map` reaches transformers, and every intervention works on a model
whose decoder layers sit on different devices (hooks see their layer's copies of the
per-row state, the engine's slots hold each layer's cache and edit tables on its device)."""

from __future__ import annotations

import argparse
from dataclasses import replace

import pytest
import torch

from lvlm_fix import LVLM, GenerationParams, Sample, devices, hooks
from lvlm_fix.cli import parse_device_map
from lvlm_fix.engine import EngineConfig
from lvlm_fix.model import FAMILIES, ImageLayout, layer_devices
from lvlm_fix.tiny import build_tiny

VAR_TINY = {"name": "var", "sink_dims": list(range(8)), "tau": 2.0}  # finds sinks in tiny models
PLANS = {
    "var+vhr+pai": [VAR_TINY, {"name": "vhr"}, {"name": "pai", "alpha": 1.0}],
    "ritual+vcd": [{"name": "ritual"}, {"name": "vcd"}],
    "fastv": [{"name": "fastv", "layer": 3, "keep": 4}],  # the cut enters the second half
    "none": [],
}
# Every other method that keeps per-row state or reads it on later layers, for the view test.
MORE = {
    "act": [{"name": "act"}],
    "gift": [{"name": "gift"}],
    "paint": [{"name": "paint", "head_modulation": "sensitivity"}],
    "opera": [{"name": "opera"}],
    "flowcut": [{"name": "flowcut", "budget": 4}],
    "pai_cfg+m3id": [{"name": "pai_cfg"}, {"name": "m3id"}],
    "fastv per step": [{"name": "fastv", "mode": "per_step", "layer": 3, "keep": 4}],
}
GREEDY = GenerationParams(max_new_tokens=10)
BEAMS = GenerationParams(max_new_tokens=6, num_beams=2)


def _samples(images) -> list[Sample]:
    return [Sample("describe this", (images[0],)), Sample("what color is it", (images[1],))]


def _tokens(lvlm: LVLM, images, interventions, params=GREEDY) -> list[list[int]]:
    return [g.token_ids for g in lvlm.generate(_samples(images), interventions, params)]


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory) -> str:
    """A tiny LLaVA with six decoder layers: three a side when split."""
    return str(build_tiny("llava", tmp_path_factory.mktemp("six") / "llava", layers=6))


def split_map(path: str, family: str, first, second) -> dict[str, object]:
    """A device_map with the first half of the decoder layers (and everything before them) on
    `first`, the rest (and the final norm and LM head) on `second`."""
    config = FAMILIES[family].model_class.config_class.from_pretrained(path)
    with torch.device("meta"):
        model = FAMILIES[family].model_class._from_config(config)
    layers_path = FAMILIES[family].decoder_layers
    half = config.text_config.num_hidden_layers // 2
    placed: dict[str, object] = {}

    def visit(module: torch.nn.Module, prefix: str) -> None:
        for name, _ in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]:
            placed[prefix + name] = first
        for name, child in module.named_children():
            full = prefix + name
            if full == layers_path:
                placed.update({f"{full}.{i}": first if i < half else second
                               for i in range(len(child))})  # fmt: skip
            elif layers_path.startswith(full + "."):
                visit(child, full + ".")
            else:
                placed[full] = first

    visit(model, "")
    placed[layers_path.rsplit(".", 1)[0] + ".norm"] = second
    placed["lm_head"] = second
    return placed


# ----- CPU -----


def test_device_map_option_reaches_transformers(monkeypatch, tiny_llava_path):
    """`LVLM.from_pretrained(device_map=..., dtype=...)` hands both to transformers (and then
    leaves the placement alone)."""
    model_class = FAMILIES["llava"].model_class
    original = model_class.from_pretrained.__func__
    seen = {}

    def spy(cls, path, **kwargs):
        seen.update(kwargs)
        kwargs.pop("device_map")  # accelerate may be missing here: place it ourselves
        return original(cls, path, **kwargs)

    monkeypatch.setattr(model_class, "from_pretrained", classmethod(spy))
    lvlm = LVLM.from_pretrained(tiny_llava_path, device_map={"": "cpu"}, dtype=torch.float32)
    assert seen == {"device_map": {"": "cpu"}, "dtype": torch.float32}
    assert lvlm.model.dtype == torch.float32


def test_device_map_on_the_command_line():
    assert parse_device_map("auto") == "auto"
    assert parse_device_map('{"": 0, "lm_head": 1}') == {"": 0, "lm_head": 1}
    with pytest.raises(argparse.ArgumentTypeError):
        parse_device_map("{not json")
    from lvlm_fix.service.launch import _settings

    parser = argparse.ArgumentParser()
    from lvlm_fix.cli import add_model_args
    from lvlm_fix.service.launch import add_serve_args

    add_model_args(parser)
    add_serve_args(parser)
    settings = _settings(parser.parse_args(["--device-map", "balanced", "--dtype", "bfloat16"]))
    assert settings["device_map"] == "balanced" and settings["dtype"] == "bfloat16"


def test_a_model_loaded_with_a_device_map_generates(tiny_llava_path, images):
    pytest.importorskip("accelerate")  # transformers needs it for any device_map
    plain = LVLM.from_pretrained(tiny_llava_path)
    mapped = LVLM.from_pretrained(tiny_llava_path, device_map={"": "cpu"})
    try:
        assert layer_devices(mapped.model, "llava") == [torch.device("cpu")] * 4
        for interventions in PLANS.values():
            assert _tokens(mapped, images, interventions) == _tokens(plain, images, interventions)
    finally:
        plain.close()
        mapped.close()


def _cloned(x, device):
    """A move that always copies, so a hook writing into its copy instead of the state shows."""
    if isinstance(x, ImageLayout):
        clones: dict[int, torch.Tensor] = {}
        return replace(
            x,
            image_mask=x.image_mask.clone(),
            key_start=x.key_start.clone(),
            columns=tuple(None if c is None else clones.setdefault(id(c), c.clone())
                          for c in x.columns),
        )  # fmt: skip
    return x.clone()


def test_every_hook_through_device_views(monkeypatch, six_layers, images):
    """On a CPU, hooks see every context as a layer on another device would (copies of the
    layout, row state, masks, key_end; writes back through the view): same tokens."""
    lvlm = LVLM.from_pretrained(six_layers, engine=EngineConfig(slots=8))
    moves = []
    try:
        plans = {**PLANS, **MORE}
        expected = {name: _tokens(lvlm, images, plan) for name, plan in plans.items()}
        expected["beams"] = _tokens(lvlm, images, PLANS["var+vhr+pai"], BEAMS)

        def counted(x, device):
            moves.append(type(x).__name__)
            return _cloned(x, device)

        monkeypatch.setattr(hooks, "_ALWAYS_VIEW", True)
        monkeypatch.setattr(devices, "moved", counted)
        for name, plan in plans.items():
            assert _tokens(lvlm, images, plan) == expected[name], name
        assert _tokens(lvlm, images, PLANS["var+vhr+pai"], BEAMS) == expected["beams"]
    finally:
        lvlm.close()
    assert "ImageLayout" in moves and "Tensor" in moves


# ----- two GPUs -----

two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"
)


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize(
    ("family", "dtype"),
    [("llava", torch.float32), ("llava", torch.bfloat16), ("llava_onevision", torch.bfloat16)],
)
def test_split_over_two_gpus_equals_one_gpu(tmp_path, images, family, dtype):
    """Half the decoder layers on cuda:0, half on cuda:1: the engine's greedy tokens equal the
    same model's on one GPU, for VAR+VHR+PAI, RITUAL+VCD (shared lane), FastV (its cut at the
    first layer of cuda:1; own lane) and beams. The single-GPU engine runs without graphs too
    and unfused (a split model's shared steps run transformers' layers eagerly): the same
    kernels on the same shapes, so the same bits, in bf16 too."""
    pytest.importorskip("accelerate")
    path = str(build_tiny(family, tmp_path / family, layers=6))
    # transformers' own layers, eagerly: what a split model's shared steps run
    config = EngineConfig(slots=8, graphs=False, fused_step=False)
    one = LVLM.from_pretrained(path, device="cuda:0", dtype=dtype, engine=config)
    split = LVLM.from_pretrained(path, device_map=split_map(path, family, 0, 1), dtype=dtype,
                                 engine=EngineConfig(slots=8))  # fmt: skip
    try:
        cuda = [torch.device("cuda", 0)] * 3 + [torch.device("cuda", 1)] * 3
        assert layer_devices(split.model, family) == cuda
        slots = split.engine.slots
        assert slots.split and not slots.graphs and slots.decoder is None
        for name, plan in PLANS.items():
            assert _tokens(split, images, plan) == _tokens(one, images, plan), name
        beams = PLANS["var+vhr+pai"]
        assert _tokens(split, images, beams, BEAMS) == _tokens(one, images, beams, BEAMS)
        parts = split.engine.slots.tables.parts
        assert set(parts) == {torch.device("cuda", 0), torch.device("cuda", 1)}
    finally:
        one.close()
        split.close()
