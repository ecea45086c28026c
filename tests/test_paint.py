"""PAINT (Arif et al., arXiv 2501.12206) on tiny random models: neutral, batch-independent,
composes (pai_cfg, vhr, ritual, fastv, beams) or refuses by name, and agrees with an independent
implementation: a test-only eager attention over a fresh copy of the model, the ViT's attention
from transformers' own `output_attentions`, numpy percentiles and a plain greedy loop."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from conftest import make_image
from transformers import AttentionInterface, LlavaForConditionalGeneration

from lvlm_fix import LVLM, GenerationParams, Sample
from lvlm_fix.compat import cache_kwargs, output_cache
from lvlm_fix.decoding import Runner, build_rows
from lvlm_fix.methods.base import RowState, parse_intervention
from lvlm_fix.methods.paint import (
    ChosenTokenGain,
    LastRowColumnGain,
    TokenSelection,
    choose,
    iqr_outliers,
)
from lvlm_fix.model import render_prompt
from lvlm_fix.plan import PlanConflict

QUESTIONS = ["describe this", "what color is the star in the picture on the left"]
# Random tiny weights give small scores: strong gains and many local tokens, so the edit shows.
STRONG = {"name": "paint", "alpha": 4.0, "beta": 2.0, "local_ratio": 0.5}
PARAMS = GenerationParams(max_new_tokens=6, logprobs=0)


@pytest.fixture(scope="module")
def lvlm(tiny_paths):
    lvlm = LVLM.from_pretrained(tiny_paths["llava"])
    yield lvlm
    lvlm.close()


@pytest.fixture(scope="module")
def samples(images) -> list[Sample]:
    return [Sample(q, (im,)) for q, im in zip(QUESTIONS, images, strict=True)]


def prefill(lvlm: LVLM, samples, specs) -> tuple[Runner, torch.Tensor]:
    plan = lvlm.plan(specs)
    batch = build_rows(lvlm.processor, lvlm.info.image_token_id, plan, samples, lvlm.device)
    state = RowState.start(plan.views, len(samples), lvlm.device)
    runner = Runner(lvlm.model, batch, plan, state, lvlm.info.num_layers)
    return runner, runner.prefill()


def chosen_logprobs(generations) -> list[list[float]]:
    return [[t.logprob for t in g.logprobs] for g in generations]


# ---------------------------------------------------------------- selection rules


def test_selection_follows_the_reference_rules():
    """Local = top share of the layer-0 CLS row minus the IQR outliers of the read layer's."""
    gen = torch.Generator().manual_seed(0)
    local, summary = torch.rand(3, 16, generator=gen), torch.rand(3, 16, generator=gen)
    summary[:, [2, 9]] += 5.0  # two clear outliers per image
    hook = TokenSelection(0, None, 0.25, 0.0, "received", 1.5, None, True, 0.7, 0.4, False)
    chosen, sink = choose(local, summary, None, hook)
    for i in range(3):
        q1, q3 = np.percentile(summary[i].numpy(), [25, 75])  # numpy's linear percentiles
        expected_sink = set(np.flatnonzero(summary[i].numpy() > q3 + 1.5 * (q3 - q1)))
        assert set(sink[i].nonzero().flatten().tolist()) == expected_sink == {2, 9}
        top = set(torch.topk(local[i], 4).indices.tolist())
        assert set(chosen[i].nonzero().flatten().tolist()) == top - expected_sink
    assert torch.equal(iqr_outliers(torch.ones(1, 8), 1.5), torch.zeros(1, 8, dtype=torch.bool))
    gains = hook.gains(chosen, sink, keeps_cls=False)  # one pass: disjoint sets
    assert gains.shape == (1, 3, 16)
    expected = torch.where(chosen, 0.7, torch.where(sink, 0.4, 0.0))
    assert torch.equal(gains[0], expected.float())
    # overlapping sets: alpha first, then beta again on the overlap; a fixed top-k instead
    overlap = TokenSelection(0, None, 0.25, 0.0, "received", 1.5, 1, False, 0.7, 0.4, False)
    chosen, sink = choose(local, summary, None, overlap)
    assert (sink.sum(-1) == 1).all()
    passes = overlap.gains(chosen, sink, keeps_cls=True)  # CLS column first, gain 0
    assert passes.shape == (2, 3, 17) and (passes[:, :, 0] == 0).all()
    assert torch.equal(passes[1, :, 1:] > 0, chosen & sink)
    # the legacy spatial statistic ranks tokens 0..P (CLS included); index P is dropped
    spatial = torch.zeros(3, 17)
    spatial[:, 16] = 1.0  # token P ranks first: past the patches, so nothing is added
    spatial[:, 5] = 0.5
    legacy = TokenSelection(0, None, 0.0, 2 / 16, "legacy", 1.5, None, True, 0.7, 0.4, False)
    chosen, _ = choose(local, summary, spatial, legacy)
    assert chosen.nonzero()[:, 1].tolist() == [5, 5, 5]


def test_the_modifier_edits_only_the_last_row_and_chosen_columns():
    B, H, Q, K = 2, 3, 4, 6
    x = torch.randn(B, H, Q, K)
    gain = torch.tensor([[0.0, 0.5, 0.0, 2.0], [1.0, 0.0, 0.0, 0.0]])  # narrower than the keys
    idx = (
        torch.arange(B)[:, None, None, None],
        torch.arange(H)[None, :, None, None],
        (K - Q + torch.arange(Q))[None, None, :, None],
        torch.arange(K)[None, None, None, :],
    )
    out = LastRowColumnGain((gain,))(x, *idx)
    g = torch.nn.functional.pad(gain, (0, 2))[:, None, :]
    assert torch.equal(out[:, :, :-1], x[:, :, :-1])
    assert torch.equal(out[:, :, -1], x[:, :, -1] + g * x[:, :, -1].abs())
    head = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    out = LastRowColumnGain((gain,), head)(x, *idx)
    assert torch.equal(out[0, 0], x[0, 0])
    torch.testing.assert_close(out[0, 2, -1], x[0, 2, -1] + 2 * g[0, 0] * x[0, 2, -1].abs())


# ---------------------------------------------------------------- 1. neutral


def test_neutral_strength_is_the_base_output(lvlm, samples):
    neutral = [{"name": "paint", "alpha": 0.0, "beta": 0.0, "spatial_ratio": 0.3}]
    plan = lvlm.plan(neutral)
    assert plan.attention_hooks == () and plan.vision_stages == ()
    params = GenerationParams(max_new_tokens=8)
    base = lvlm.generate(samples, [], params)
    assert [g.token_ids for g in lvlm.generate(samples, neutral, params)] == [
        g.token_ids for g in base
    ]
    _, base_logits = prefill(lvlm, samples, [])
    _, neutral_logits = prefill(lvlm, samples, neutral)
    assert torch.equal(base_logits, neutral_logits)
    # the default (reported) flow leaves the prefill unedited: the first token is plain ...
    runner, late_logits = prefill(lvlm, samples, [STRONG])
    assert torch.equal(late_logits, base_logits)
    # ... and the state holds the gains (alpha on local, beta on summary, only image columns)
    gain = runner.state["paint.gain"]
    image = runner.layout.image_mask
    assert (gain[~image] == 0).all() and set(gain[image].unique().tolist()) <= {0.0, 2.0, 4.0}
    assert ((gain == 4.0).sum(-1) > 0).all()
    _, first_logits = prefill(lvlm, samples, [{**STRONG, "edit_first_token": True}])
    assert not torch.allclose(first_logits, base_logits)


# ---------------------------------------------------------------- 2. batch rows independent


def test_a_batch_equals_each_sample_alone(lvlm, samples):
    together = lvlm.generate(samples, [STRONG], PARAMS)
    alone = [lvlm.generate([s], [STRONG], PARAMS)[0] for s in samples]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    np.testing.assert_allclose(chosen_logprobs(together), chosen_logprobs(alone), atol=1e-5)
    plain = lvlm.generate(samples, [], PARAMS)
    assert not np.allclose(chosen_logprobs(together), chosen_logprobs(plain), atol=1e-4)


def test_each_image_of_a_row_gets_its_own_sets(lvlm, images):
    """Images fill a row's image columns in order: a two-image row's gains are each image's
    gains alone, block by block."""
    two = Sample("compare the two pictures", (images[0], images[1]))
    runner, _ = prefill(lvlm, [two, Sample("describe", (images[1],))], [STRONG])
    gain, image = runner.state["paint.gain"], runner.layout.image_mask
    blocks = gain[0][image[0]].view(2, -1)
    for block, picture in zip(blocks, images, strict=True):
        alone, _ = prefill(lvlm, [Sample("describe", (picture,))], [STRONG])
        assert torch.equal(block, alone.state["paint.gain"][0][alone.layout.image_mask[0]])
    assert torch.equal(gain[1][image[1]], blocks[1])


# ---------------------------------------------------------------- 3. composition


@pytest.mark.parametrize(
    "others",
    [
        [{"name": "pai_cfg"}],  # the reported setting: PAI's CFG, gamma 1.1
        [{"name": "vhr"}, {"name": "ritual"}],
        [{"name": "fastv", "ratio": 0.5}],  # pruned layers see their kept columns' gains
        [{"name": "fastv", "ratio": 0.5, "mode": "per_step"}],  # each step is a prefill
    ],
    ids=["pai_cfg", "vhr+ritual", "fastv", "fastv_per_step"],
)
def test_composes_and_stays_batch_independent(lvlm, samples, others):
    specs = [STRONG, *others]
    together = lvlm.generate(samples, specs, PARAMS)
    alone = [lvlm.generate([s], specs, PARAMS)[0] for s in samples]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    without = lvlm.generate(samples, others, PARAMS)
    assert not np.allclose(chosen_logprobs(together), chosen_logprobs(without), atol=1e-4)


def test_pai_cfg_text_only_row_is_not_edited(lvlm, samples):
    runner, _ = prefill(lvlm, samples, [STRONG, {"name": "pai_cfg"}])
    views = runner.state["row.view"]
    gain = runner.state["paint.gain"]
    assert (gain[views == 1] == 0).all() and (gain[views == 0] > 0).any(-1).all()


def test_beams_follow_their_rows(lvlm, samples):
    params = GenerationParams(max_new_tokens=5, num_beams=2)
    together = lvlm.generate(samples, [STRONG], params)
    alone = [lvlm.generate([s], [STRONG], params)[0] for s in samples]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]


def test_named_refusals(lvlm, tiny_paths):
    with pytest.raises(PlanConflict, match="'paint' and 'flowcut' both hook the vision tower"):
        lvlm.plan([{"name": "paint"}, {"name": "flowcut", "budget": 8}])
    with pytest.raises(PlanConflict, match="'paint' and 'pai' cannot be combined"):
        lvlm.plan([{"name": "paint"}, {"name": "pai"}])
    with pytest.raises(ValueError, match="paint layers"):
        lvlm.plan([{"name": "paint", "start_layer": 4}])
    with pytest.raises(ValueError, match="summary_layer"):
        parse_intervention({"name": "paint", "summary_layer": "last"})
    for family, why in (("llava_next", "anyres"), ("llava_onevision", "no CLS token")):
        other = LVLM.from_pretrained(tiny_paths[family])
        try:
            with pytest.raises(ValueError, match=f"paint supports LLaVA-1.5, not .*{why}"):
                other.plan([{"name": "paint"}])
            assert other.plan([{"name": "paint", "alpha": 0, "beta": 0}]).attention_hooks == ()
        finally:
            other.close()


# ---------------------------------------------------------------- 4. independent implementation


class Edit:
    """What the test's eager attention applies: set per request and per phase by the loop."""

    gain: torch.Tensor | None = None  # float32 [S]: each prompt column's gain
    on = False  # edit this forward's last query row
    head_gain: dict[int, torch.Tensor] = {}  # layer -> [H] (head modulation)
    sensitivity = False
    image: torch.Tensor | None = None  # bool [S]


def eager_paint_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Plain eager attention (one row, no padding) with PAINT's edit from the spec: in layers
    2.., on the last query row, s + g*|s| before the softmax, g = the column's gain (x the
    head's sensitivity multiplier, measured on the unedited row at prefill)."""
    groups = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(groups, 1)
    v = value.float().repeat_interleave(groups, 1)
    s = (query.float() @ k.transpose(-1, -2)) * scaling  # [1, H, Q, K]
    Q, K = s.shape[-2:]
    causal = torch.arange(K)[None, :] <= (K - Q + torch.arange(Q))[:, None]
    s = s.masked_fill(~causal, float("-inf"))
    layer = module.layer_idx
    if layer >= 2 and Edit.sensitivity and Q > 1:  # prefill: the stock last row's image mass
        p = s[0, :, -1].softmax(-1)
        mass = p[:, Edit.image].sum(-1)
        Edit.head_gain[layer] = (mass / mass.mean()).clamp(0, 2)
    if layer >= 2 and Edit.on:
        g = torch.nn.functional.pad(Edit.gain, (0, K - Edit.gain.shape[0]))[None, :]
        if Edit.sensitivity:
            g = g * Edit.head_gain[layer][:, None]
        last = s[0, :, -1]
        s[0, :, -1] = last + g * last.abs()
    out = s.softmax(-1) @ v
    return out.transpose(1, 2).to(query.dtype), None


def independent_run(path, processor, sample, config: dict, steps: int):
    """Greedy tokens and their log-probabilities from the test's own loop over a fresh model."""
    AttentionInterface.register("test_paint_eager", eager_paint_attention)
    model = LlavaForConditionalGeneration.from_pretrained(path)
    model.set_attn_implementation({"text_config": "test_paint_eager", "vision_config": "eager"})
    model.eval()
    inputs = processor(
        text=[render_prompt(processor, sample.text, 1)], images=[sample.images[0]],
        return_tensors="pt",
    )  # fmt: skip
    ids = inputs["input_ids"]
    with torch.no_grad():
        vit = model.model.vision_tower(inputs["pixel_values"], output_attentions=True)
    first, read = vit.attentions[0][0], vit.attentions[-2][0]  # [H, n, n]: layer 0, layer -2
    a_loc, a_sum = first[:, 0, 1:].sum(0), read[:, 0, 1:].sum(0)
    patches = a_loc.shape[0]
    local = set(torch.topk(a_loc, int(patches * config["local_ratio"])).indices.tolist())
    if config.get("spatial_ratio"):  # "received": attention each patch receives, head mean
        received = first.mean(0)[:, 1:].sum(0)
        local |= set(torch.topk(received, int(patches * config["spatial_ratio"])).indices.tolist())
    q1, q3 = np.percentile(a_sum.numpy(), [25, 75])
    summary = set(np.flatnonzero(a_sum.numpy() > q3 + 1.5 * (q3 - q1)).tolist())
    local -= summary
    start = int((ids[0] == model.config.image_token_id).nonzero()[0])
    gain = torch.zeros(ids.shape[1])
    gain[[start + j for j in local]] = config["alpha"]
    gain[[start + j for j in summary]] = config["beta"]
    Edit.gain, Edit.image = gain, ids[0] == model.config.image_token_id
    Edit.sensitivity = config.get("head_modulation") == "sensitivity"
    Edit.on = config.get("edit_first_token", False)
    tokens, logprobs = [], []
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        Edit.on = True  # decode steps are edited
        for _ in range(steps):
            logp = out.logits[0, -1].float().log_softmax(-1)
            token = int(logp.argmax())
            tokens.append(token)
            logprobs.append(float(logp[token]))
            if token == processor.tokenizer.eos_token_id:
                break
            cache = cache_kwargs(output_cache(out))
            out = model(input_ids=torch.tensor([[token]]), **cache, use_cache=True)
    return tokens, logprobs


@pytest.mark.parametrize(
    "extra",
    [{}, {"edit_first_token": True}, {"head_modulation": "sensitivity", "spatial_ratio": 0.25}],
    ids=["reported", "first_token", "sensitivity+spatial"],
)
def test_an_independent_implementation_agrees(lvlm, samples, tiny_paths, extra):
    """Tokens equal and log-probabilities within 2e-6 (fp32 both; a wrong ViT layer, set rule,
    LLM layer range or head factor moves them by 1e-5 to 1e-2 here). The third sample is one
    whose greedy tokens the edit changes on this tiny model."""
    config = {**STRONG, **extra}
    params = GenerationParams(max_new_tokens=8, logprobs=0)
    changes = Sample(QUESTIONS[1], (make_image((20, 20, 200), (48, 40)),))
    for sample in [*samples, changes]:
        [ours] = lvlm.generate([sample], [config], params)
        tokens, logprobs = independent_run(
            tiny_paths["llava"], lvlm.processor, sample, config, params.max_new_tokens
        )
        assert ours.token_ids == tokens
        np.testing.assert_allclose(chosen_logprobs([ours])[0], logprobs, rtol=0, atol=2e-6)
        [plain] = lvlm.generate([sample], [], params)
        assert not np.allclose(chosen_logprobs([plain])[0], logprobs, atol=1e-4)  # it acts
    if not extra:
        assert plain.token_ids != tokens  # the edit changes the last sample's tokens


# ---------------------------------------------------------------- 5. plan data, 6. paths


def test_the_plan_pickles_and_compiles_equal(lvlm):
    specs = [{"name": "paint", "head_modulation": "sensitivity"}, {"name": "pai_cfg"}]
    plan = lvlm.plan(specs, PARAMS)
    assert pickle.loads(pickle.dumps(plan)) == plan
    assert lvlm.plan(specs, PARAMS) == plan
    [stage], [hook] = plan.vision_stages, plan.attention_hooks
    assert isinstance(stage, TokenSelection) and stage.budget is None and stage.grid is None
    assert isinstance(hook, ChosenTokenGain) and hook.layers == frozenset({2, 3})
    changed = lvlm.plan([{"name": "paint", "beta": 0.3}], PARAMS)
    assert changed.attention_hooks == lvlm.plan([{"name": "paint"}], PARAMS).attention_hooks
    assert changed.vision_stages != lvlm.plan([{"name": "paint"}], PARAMS).vision_stages


def test_the_engine_reports_the_modifier_path(lvlm, samples):
    [edited] = lvlm.generate(samples[:1], [STRONG], PARAMS)
    assert edited.attention_paths == ["modifiers", "sdpa"]  # layers 0-1 and the prefill: sdpa
    [plain] = lvlm.generate(samples[:1], [], PARAMS)
    assert plain.attention_paths == ["fused", "sdpa"]
