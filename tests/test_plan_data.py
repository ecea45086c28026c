"""A compiled Plan is plain data: it pickles (it crosses process boundaries), it compares by
value, and the unpickled copy decodes exactly as the original does. On a tiny random LLaVA."""

from __future__ import annotations

import pickle
from dataclasses import replace

import pytest
import torch
from conftest import make_image
from safetensors.torch import save_file

from lvlm_fix import LVLM, GenerationParams, Sample
from lvlm_fix.decoding import decode
from lvlm_fix.methods import REGISTRY
from lvlm_fix.methods.dyvte import ROUTER_FILE
from lvlm_fix.search import Limits
from lvlm_fix.tiny import build_tiny

PARAMS = GenerationParams(max_new_tokens=6)

# Per method, a parameter whose change reaches the compiled hooks, views or search.
CHANGED = {
    "act": {"beta": 0.5},
    "dyvte": {"threshold": 0.7},
    "fastv": {"ratio": 0.25},
    "flowcut": {"budget": 8},
    "gift": {"alpha": 2.0},
    "m3id": {"decay": 0.05},
    "opera": {"penalty": 0.5},
    "pai": {"alpha": 0.5},
    "pai_cfg": {"gamma": 1.5},
    "paint": {"alpha": 0.5},
    "ritual": {"alpha_pos": 2.0},
    "var": {"tau": 10.0},
    "vcd": {"noise_step": 400},
    "vhr": {"alpha": 3.0},
}
# dyvte has no default router: "auto" reads the one the fixture writes next to the checkpoint.
REQUIRED = {"dyvte": {"router": "auto"}}
# (m3id and opera on their own are among the registered methods' cases.)
COMBINATIONS = {
    "var+vhr+pai": ["var", "vhr", "pai"],
    "ritual+vcd": ["ritual", "vcd"],
    "pai+pai_cfg": ["pai", "pai_cfg"],
    "fastv per_step": [("fastv", {"mode": "per_step"})],
}


def specs(methods: list, changed: bool = False) -> list[dict]:
    """Interventions for `methods` (names, or (name, fields)), the first one's CHANGED if asked."""
    out = []
    for method in methods:
        name, fields = (method, {}) if isinstance(method, str) else method
        out.append({"name": name, **REQUIRED.get(name, {}), **fields})
    if changed:
        out[0] |= CHANGED[out[0]["name"]]
    return out


CASES = {name: [name] for name in sorted(REGISTRY)} | COMBINATIONS


@pytest.fixture(scope="module")
def lvlm(tmp_path_factory) -> LVLM:
    path = build_tiny("llava", tmp_path_factory.mktemp("tiny") / "llava")
    lvlm = LVLM.from_pretrained(path)
    layers, hidden = lvlm.info.num_layers, lvlm.info.hidden_size
    generator = torch.Generator().manual_seed(0)
    routers = {
        "w1": torch.randn(layers, 8, 2 * hidden, generator=generator),
        "w2": torch.randn(layers, 2, 8, generator=generator),
    }
    save_file(routers, str(path / ROUTER_FILE))
    return lvlm


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return [
        Sample("describe the image", (make_image((200, 30, 30)),), seed=3),
        Sample("what color is the cup", (make_image((20, 30, 230), (48, 40)),), seed=4),
    ]


@pytest.mark.parametrize("case", CASES)
def test_a_plan_pickles_and_compiles_to_equal_plans(lvlm, case):
    plan = lvlm.plan(specs(CASES[case]), PARAMS)
    assert pickle.loads(pickle.dumps(plan)) == plan
    assert lvlm.plan(specs(CASES[case]), PARAMS) == plan


@pytest.mark.parametrize("case", CASES)
def test_a_changed_parameter_gives_a_different_plan(lvlm, case):
    plan = lvlm.plan(specs(CASES[case]), PARAMS)
    changed = lvlm.plan(specs(CASES[case], changed=True), PARAMS)
    assert changed != plan
    # Not only the recorded config: the compiled hooks, views or search differ too.
    assert replace(changed, interventions=plan.interventions, config_id=plan.config_id) != plan


def test_different_generation_params_give_a_different_plan(lvlm):
    sampling = GenerationParams(max_new_tokens=6, do_sample=True)
    assert lvlm.plan([], sampling) != lvlm.plan([], PARAMS)
    assert lvlm.plan([], sampling) == lvlm.plan([], sampling)


def run(lvlm, plan, samples):
    """Generated tokens and the views' notes (RITUAL's drawn transforms), greedy, eager."""
    tokenizer = lvlm.processor.tokenizer
    limits = Limits(tokenizer.eos_token_id, tokenizer.pad_token_id, PARAMS.max_new_tokens,
                    [None] * len(samples))  # fmt: skip
    *_, last = decode(lvlm.model, lvlm.processor, lvlm.info, plan, samples, limits)
    return last.result.tokens, last.view_notes


@pytest.mark.parametrize("case", CASES)
def test_the_unpickled_plan_generates_the_same_tokens(lvlm, samples, case):
    plan = lvlm.plan(specs(CASES[case]), PARAMS)
    assert run(lvlm, pickle.loads(pickle.dumps(plan)), samples) == run(lvlm, plan, samples)
