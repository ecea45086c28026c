"""Decode steps over a static KV cache (static_decode.py) equal the eager steps over a
DynamicCache, on tiny LLaVA / NeXT / OneVision models, with and without interventions.

On CPU the static steps run without a CUDA graph; tests/test_kernels_gpu.py captures them.
"""

from __future__ import annotations

import pytest
import torch

from lvlm_fix import LVLM, GenerationParams, Sample
from lvlm_fix.decoding import Runner, _after_prefill_rows, build_rows
from lvlm_fix.methods.base import RowState

VAR_TINY = {"name": "var", "sink_dims": list(range(8)), "tau": 2.0}
ALL_THREE = [VAR_TINY, {"name": "vhr"}, {"name": "pai", "alpha": 1.0}]
QUESTIONS = ["describe this", "what color is the star in the picture on the left"]


@pytest.fixture(scope="module")
def lvlms(tiny_paths) -> dict[str, LVLM]:
    return {family: LVLM.from_pretrained(path) for family, path in tiny_paths.items()}


@pytest.fixture(scope="module")
def samples(images) -> list[Sample]:
    # the second sample is text-only: rows of unequal length, one without image columns
    return [Sample(QUESTIONS[0], (images[0],)), Sample(QUESTIONS[1], ())]


def runner_after_prefill(lvlm: LVLM, samples, interventions, static_steps: int) -> Runner:
    plan = lvlm.plan(interventions)
    batch = build_rows(lvlm.processor, lvlm.info.image_token_id, plan, samples, lvlm.device)
    state = RowState.start(plan.views, len(samples), lvlm.device)
    runner = Runner(lvlm.model, batch, plan, state, lvlm.info.num_layers, static_steps)
    runner.prefill()
    runner.select_rows(_after_prefill_rows(plan, len(samples), 1, lvlm.device))
    return runner


@pytest.mark.parametrize("methods", ["none", "var+vhr+pai", "vcd"])
@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision"])
def test_static_steps_equal_dynamic_steps(lvlms, samples, family, methods):
    """Five one-token steps fed the same tokens: the same logits, step by step."""
    lvlm = lvlms[family]
    interventions = {"none": [], "var+vhr+pai": ALL_THREE, "vcd": [{"name": "vcd"}]}[methods]
    dynamic = runner_after_prefill(lvlm, samples, interventions, static_steps=0)
    static = runner_after_prefill(lvlm, samples, interventions, static_steps=8)
    tokens = torch.randint(5, lvlm.info.vocab_size, (5, dynamic.attention_mask.shape[0], 1),
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    for step in tokens:
        want, got = dynamic.forward(step), static.forward(step)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert static.static is not None and static.static.filled == static.attention_mask.shape[1]
    assert torch.equal(static.positions, dynamic.positions)


def test_leaving_static_steps_keeps_the_cache(lvlms, samples):
    """Selecting rows, cropping and multi-token forwards after static steps hand the filled
    columns back to a DynamicCache: the results equal a runner that never went static."""
    lvlm = lvlms["llava"]
    runners = [runner_after_prefill(lvlm, samples, ALL_THREE, n) for n in (0, 8)]
    g = torch.Generator().manual_seed(1)
    steps = torch.randint(5, lvlm.info.vocab_size, (3, 2, 1), generator=g)
    for step in steps:
        for runner in runners:
            runner.forward(step)
    assert runners[1].static is not None
    rows = torch.tensor([1, 1, 0])
    more = torch.randint(5, lvlm.info.vocab_size, (3, 2), generator=g)
    results = []
    for runner in runners:
        runner.select_rows(rows)
        runner.crop(runner.attention_mask.shape[1] - 1)
        results.append(runner.forward(more))
    assert runners[1].static is None and runners[1].static_steps == 0
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "interventions, params",
    [
        (ALL_THREE, GenerationParams(max_new_tokens=10)),
        ([{"name": "ritual"}], GenerationParams(max_new_tokens=10, do_sample=True, seed=3)),
        ([{"name": "fastv", "layer": 2, "keep": 4}], GenerationParams(max_new_tokens=10)),
        ([VAR_TINY], GenerationParams(max_new_tokens=10, num_beams=2)),
        ([{"name": "opera", "num_beams": 1}], GenerationParams(max_new_tokens=10)),
    ],
    ids=["greedy-var+vhr+pai", "sampling-ritual", "fastv-pruned", "beams", "opera-one-beam"],
)
def test_generate_with_static_decode_equals_eager(tiny_paths, images, interventions, params):
    """End to end, batch of two with different images: the same tokens either way (pruned,
    beam and OPERA requests stay on the dynamic cache)."""
    batch = [Sample(q, (im,)) for q, im in zip(QUESTIONS, images, strict=True)]
    outs = []
    for static in (False, True):
        lvlm = LVLM.from_pretrained(tiny_paths["llava_next"], static_decode=static)
        outs.append([g.token_ids for g in lvlm.generate(batch, interventions, params)])
    assert outs[0] == outs[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("methods", ["none", "var+vhr+pai"])
def test_cuda_graph_steps_equal_eager_steps(tiny_paths, samples, methods):
    """On a GPU the static steps replay a captured graph: same logits as eager steps."""
    lvlm = LVLM.from_pretrained(tiny_paths["llava"], device="cuda")
    interventions = ALL_THREE if methods != "none" else []
    dynamic = runner_after_prefill(lvlm, samples, interventions, static_steps=0)
    static = runner_after_prefill(lvlm, samples, interventions, static_steps=8)
    tokens = torch.randint(5, lvlm.info.vocab_size, (6, 2, 1), device="cuda")
    for step in tokens:
        want, got = dynamic.forward(step), static.forward(step)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert static.static.graph is not None


def test_which_requests_run_static(lvlms):
    """Static steps need graph-safe hooks, one beam and unpruned layers."""
    from lvlm_fix.model import ImageLayout
    from lvlm_fix.static_decode import static_steps

    lvlm = lvlms["llava"]
    layout = ImageLayout(torch.zeros(1, 4, dtype=torch.bool), torch.zeros(1, dtype=torch.long))
    pruned = ImageLayout(layout.image_mask, layout.key_start, (None, torch.zeros(1, 2)))
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    all_three = lvlm.plan(ALL_THREE)

    def steps(static, device=cpu, plan=all_three, at=layout, tokens=64):
        return static_steps(static, device, lvlm.model, plan, at, tokens)

    assert steps(True) == 64
    assert steps(True, at=pruned) == 0
    assert steps(True, plan=lvlm.plan([], GenerationParams(num_beams=2))) == 0
    assert steps(True, plan=lvlm.plan([{"name": "opera", "num_beams": 1}])) == 0
    assert steps(None) == 0 and steps(True, tokens=2) == 2
    assert steps(None, gpu) == 64 and steps(None, gpu, tokens=2) == 0
    assert steps(False, gpu) == 0 and steps(True, tokens=1) == 0
