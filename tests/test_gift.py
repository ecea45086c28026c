"""GIFT on tiny LLaVA / NeXT / OneVision models.

The central check re-implements GIFT from its spec (the module docstring of methods/gift.py,
the official code's `inference.py` and `eager_attention_forward`) as an eager attention function
of the test's own, registered with transformers and driven by `model.generate` on a separately
loaded model, one sample at a time (batch 1, as the reference runs): no library hook, state or
modifier takes part. The engine's tokens, decoding the samples together, must equal it.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from transformers import (
    AttentionInterface,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
)

from lvlm_fix import LVLM, GenerationParams, Sample
from lvlm_fix.decoding import Runner, build_rows
from lvlm_fix.methods.base import RowState
from lvlm_fix.methods.gift import GIFT, gift_layers, normalised_map
from lvlm_fix.model import render_prompt
from lvlm_fix.plan import PlanConflict

QUESTIONS = ["describe this", "what color is the star in the picture on the left"]
VAR_TINY = {"name": "var", "sink_dims": list(range(8)), "tau": 2.0}
MODEL_CLASSES = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
}


@pytest.fixture(scope="module")
def lvlms(tiny_paths):
    loaded = {family: LVLM.from_pretrained(path) for family, path in tiny_paths.items()}
    yield loaded
    for lvlm in loaded.values():
        lvlm.close()


@pytest.fixture(scope="module")
def samples(images) -> list[Sample]:
    return [Sample(q, (im,)) for q, im in zip(QUESTIONS, images, strict=True)]


def tokens(lvlm, samples, specs, n=10):
    return [g.token_ids for g in lvlm.generate(samples, specs, GenerationParams(max_new_tokens=n))]


def prefill(lvlm, samples, specs) -> tuple[Runner, torch.Tensor]:
    plan = lvlm.plan(specs)
    batch = build_rows(lvlm.processor, lvlm.info.image_token_id, plan, samples, lvlm.device)
    state = RowState.start(plan.views, len(samples), lvlm.device)
    runner = Runner(lvlm.model, batch, plan, state, lvlm.info.num_layers)
    return runner, runner.prefill()


# ---------------------------------------------------------------- config and neutral strength


def test_layers_scale_with_depth_and_the_map_stays_below_the_edits():
    assert gift_layers("auto", "auto", 32) == (frozenset({11}), False, frozenset(range(12, 23)))
    assert gift_layers("auto", "auto", 4) == (frozenset({1}), False, frozenset({2, 3}))
    assert gift_layers("peak", "auto", 4) == (frozenset({0, 1}), True, frozenset({2, 3}))
    assert gift_layers([10], list(range(14, 21)), 40)[2] == frozenset(range(14, 21))  # 13B
    with pytest.raises(ValueError, match="below the first edited layer"):
        gift_layers([14], list(range(5, 19)), 28)  # the reference's Qwen2-VL setting
    with pytest.raises(ValueError, match="do not exist"):
        gift_layers("auto", [2, 9], 4)
    with pytest.raises(ValueError, match="no layer to edit"):
        gift_layers("auto", "auto", 2)
    for bad in ({"alpha": -1}, {"beta": 1e9}, {"map_layers": []}, {"layers": [-1]}):
        with pytest.raises(ValueError):
            GIFT(**bad)


def test_normalised_map_clamps_at_three_sigma_and_spans_zero_to_one():
    raw = torch.zeros(2, 24)
    raw[0, 2:22] = torch.arange(20.0)
    raw[0, 21] = 1000.0  # an outlier: clamped to mean + 3 std first
    image = torch.zeros(2, 24, dtype=torch.bool)
    image[:, 2:22] = True
    s = normalised_map(raw, image)
    values = raw[0, 2:22]
    high = values.mean() + 3 * values.std()
    expected = (values.clamp(max=float(high)) - values.min()) / (high - values.min())
    torch.testing.assert_close(s[0, 2:22], expected)
    assert s[0, 21] == 1 and s[0, 2] == 0 and s[0, ~image[0]].eq(0).all()
    assert s[1].eq(0).all()  # all equal: no NaN, S_hat = 0


def test_neutral_strength_is_the_base_output(lvlms, samples):
    lvlm = lvlms["llava"]
    neutral = [{"name": "gift", "alpha": 0.0}]
    assert lvlm.plan(neutral).attention_hooks == ()
    assert lvlm.plan([{"name": "gift", "layers": []}]).attention_hooks == ()
    assert tokens(lvlm, samples, neutral) == tokens(lvlm, samples, [])
    _, base = prefill(lvlm, samples, [])
    _, ours = prefill(lvlm, samples, neutral)
    assert torch.equal(base, ours)
    # alpha 0 but beta != 1 is not neutral: the query attention still scales
    assert not GIFT(alpha=0.0, beta=2.0).is_neutral()


def test_rows_it_cannot_edit_are_left_unchanged(lvlms, images):
    """No image, or an empty query: the base output (the reference's map would be NaN)."""
    lvlm = lvlms["llava"]
    odd = [Sample("hello there", ()), Sample("", (images[0],))]
    assert tokens(lvlm, odd, [{"name": "gift"}]) == tokens(lvlm, odd, [])
    runner, logits = prefill(lvlm, odd, [{"name": "gift"}])
    assert torch.isfinite(logits).all()
    assert not runner.state["gift.active"].any() and runner.state["gift.map"].eq(1).all()


def test_the_map_is_exp_alpha_s_hat_on_image_columns(lvlms, samples):
    lvlm = lvlms["llava"]
    runner, _ = prefill(lvlm, samples, [{"name": "gift", "alpha": 3.0}])
    state = runner.state
    image, weight = state["gift.image"], state["gift.map"]
    assert state["gift.active"].all()
    assert weight[~image].eq(1).all()
    for row in range(2):
        m = weight[row, image[row]]
        torch.testing.assert_close(m.min(), torch.tensor(1.0))
        torch.testing.assert_close(m.max(), torch.tensor(math.exp(3.0)))
        words = runner.batch.input_ids[row, state["gift.query"][row]]
        assert lvlm.processor.tokenizer.decode(words).strip() == QUESTIONS[row]


# ---------------------------------------------------------------- batches and families


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision"])
def test_a_batch_equals_each_sample_alone(lvlms, images, family):
    lvlm = lvlms[family]
    batch = [
        Sample(QUESTIONS[1], (images[1],)),
        Sample("hello there", ()),
        Sample(QUESTIONS[0], (images[0],)),
    ]
    spec = [{"name": "gift"}]
    together = lvlm.generate(batch, spec, GenerationParams(max_new_tokens=10))
    alone = [tokens(lvlm, [s], spec)[0] for s in batch]
    assert [g.token_ids for g in together] == alone
    assert together[0].attention_paths == ["modifiers", "sdpa"]  # map layer 1 and 0: stock


def test_beam_search_rows_keep_their_maps(lvlms, samples):
    lvlm = lvlms["llava"]
    params = GenerationParams(max_new_tokens=8, num_beams=3)
    spec = [{"name": "gift", "alpha": 8.0}]
    together = [g.token_ids for g in lvlm.generate(samples, spec, params)]
    assert together == [lvlm.generate([s], spec, params)[0].token_ids for s in samples]


# ---------------------------------------------------------------- composition


def test_composes_with_attention_and_view_methods(lvlms, samples):
    lvlm = lvlms["llava"]
    for others in (
        [VAR_TINY, {"name": "vhr"}, {"name": "pai", "alpha": 1.0}],
        [{"name": "ritual"}],
        [{"name": "pai_cfg"}],
        [{"name": "flowcut", "budget": 8}],  # LLaVA-1.5: the tower's cut, fewer image columns
    ):
        with_gift = [{"name": "gift", "alpha": 8.0}, *others]
        together = lvlm.generate(samples, with_gift, GenerationParams(max_new_tokens=8, logprobs=0))
        alone = [tokens(lvlm, [s], with_gift, 8)[0] for s in samples]
        assert [g.token_ids for g in together] == alone, others
        without = lvlm.generate(samples, others, GenerationParams(max_new_tokens=8, logprobs=0))
        first = [[g.logprobs[0].logprob for g in gens] for gens in (together, without)]
        assert first[0] != first[1], others  # gift acted on top of them


def test_refuses_pruning_inside_the_llm_and_opera_by_name(lvlms):
    for other in ("opera", "fastv", "dyvte"):
        with pytest.raises(PlanConflict, match=f"'gift' and '{other}'|'{other}' and 'gift'"):
            lvlms["llava"].plan([{"name": "gift"}, {"name": other, "router": "auto"}
                                 if other == "dyvte" else {"name": other}])  # fmt: skip
    with pytest.raises(PlanConflict, match="'gift' and 'flowcut' cannot be combined on this"):
        lvlms["llava_next"].plan([{"name": "gift"}, {"name": "flowcut"}])


# ---------------------------------------------------------------- plan data


def test_the_plan_pickles_and_compiles_to_an_equal_plan(lvlms):
    lvlm = lvlms["llava"]
    for spec in ({"name": "gift"}, {"name": "gift", "map_layers": "peak", "beta": 1.5}):
        plan = lvlm.plan([spec])
        assert pickle.loads(pickle.dumps(plan)) == plan == lvlm.plan([spec])
        assert not plan.shared_decode  # per-step edits: a lane of its own
    assert lvlm.plan([{"name": "gift", "alpha": 4.0}]) != lvlm.plan([{"name": "gift"}])


# ---------------------------------------------------------------- independent implementation


class SpecGIFT:
    """GIFT as the spec states it, for one sample (batch 1), inside an eager attention.

    Map: at the map layers' prefill, D = relu(A[i] - A[i-1]) over query rows i and image
    columns, top half of heads by total D, mean, 3-sigma clamp (unbiased std), min-max,
    M = exp(alpha * S_hat). Edit: in edited layers, the last query row: HV = top half by image
    sum, image columns of HV times M, r = after/before over HV, HQ = top half by query sum,
    query columns of HQ times beta * r, renormalise.
    """

    def __init__(self, image_cols, query_cols, map_layers, edit_layers, alpha, beta):
        self.image, self.query = list(image_cols), list(query_cols)
        self.peak = map_layers == "peak"
        self.map_layers = range(min(edit_layers)) if self.peak else map_layers
        self.edit_layers, self.alpha, self.beta = set(edit_layers), alpha, beta
        self.shifts: dict[int, tuple[float, torch.Tensor]] = {}
        self.m: torch.Tensor | None = None

    @staticmethod
    def top_half(values: torch.Tensor) -> list[int]:
        order = sorted(range(len(values)), key=lambda h: -float(values[h]))
        return order[: len(values) // 2]

    def record(self, layer: int, probs: torch.Tensor) -> None:
        """probs [H, T, T] of the prompt."""
        rows = [probs[:, i, self.image] - probs[:, i - 1, self.image] for i in self.query]
        D = torch.stack(rows, 1).clamp(min=0)  # [H, n, I]
        kept = self.top_half(D.sum((1, 2)))
        self.shifts[layer] = (float(D.sum()), D[kept].mean((0, 1)))

    def saliency(self) -> torch.Tensor:
        layers = sorted(self.shifts)
        if self.peak:
            s = self.shifts[max(layers, key=lambda layer: self.shifts[layer][0])][1]
        else:
            s = torch.stack([self.shifts[layer][1] for layer in layers]).mean(0)
        mean, std = s.mean(), s.std()
        s = s.clamp(float(mean - 3 * std), float(mean + 3 * std))
        return torch.exp(self.alpha * (s - s.min()) / (s.max() - s.min()))

    def edit(self, row: torch.Tensor) -> torch.Tensor:
        """row [H, K]: the last query row's probabilities."""
        row = row.clone()
        vision = row[:, self.image]
        hv = self.top_half(vision.sum(-1))
        before = vision[hv].sum()
        vision[hv] = vision[hv] * self.m
        r = vision[hv].sum() / before
        query = row[:, self.query]
        hq = self.top_half(query.sum(-1))
        query[hq] = query[hq] * self.beta * r
        row[:, self.image], row[:, self.query] = vision, query
        return row / row.sum(-1, keepdim=True)

    def attention(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        layer = module.layer_idx
        q, k, v = query[0].float(), key[0].float(), value[0].float()
        H, Q, _ = q.shape
        K = k.shape[1]
        k = k.repeat_interleave(H // k.shape[0], 0)
        v = v.repeat_interleave(H // v.shape[0], 0)
        scores = (q @ k.transpose(-1, -2)) * scaling
        causal = torch.ones(Q, K, dtype=torch.bool).tril(K - Q)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        if Q > 1 and layer in self.map_layers:
            self.record(layer, probs)
        if layer in self.edit_layers:
            if self.m is None:
                self.m = self.saliency()
            probs[:, -1] = self.edit(probs[:, -1])
        return (probs @ v).transpose(0, 1)[None].to(query.dtype), None


def query_columns(processor, prompt: str, text: str, ids: list[int], image_id: int) -> list[int]:
    """Columns of the user's text in the expanded ids, by character offsets in the prompt."""
    start = prompt.rindex(text)
    enc = processor.tokenizer(prompt, return_offsets_mapping=True)
    n_image = ids.count(image_id)
    assert [t for t in enc.input_ids if t != image_id] == [t for t in ids if t != image_id]
    shift = n_image - enc.input_ids.count(image_id)
    first_image = enc.input_ids.index(image_id)
    return [
        i + (shift if i > first_image else 0)
        for i, (a, b) in enumerate(enc.offset_mapping)
        if a < start + len(text) and b > start and enc.input_ids[i] != image_id
    ]


def spec_generate(path, lvlm, sample: Sample, config: dict, n: int) -> tuple[list, list]:
    """Tokens and chosen-token log-probabilities of `model.generate` with SpecGIFT."""
    family = lvlm.family
    model = MODEL_CLASSES[family].from_pretrained(path)
    prompt = render_prompt(lvlm.processor, sample.text, 1)
    inputs = lvlm.processor(images=list(sample.images), text=[prompt], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    image_id = model.config.image_token_id
    image = [i for i, t in enumerate(ids) if t == image_id]
    query = query_columns(lvlm.processor, prompt, sample.text, ids, image_id)
    assert model.config.text_config.num_hidden_layers == 4  # the reference's 11; 12..22 of 32
    spec = SpecGIFT(image, query, config.get("map_layers", [1]), config.get("layers", [2, 3]),
                    config.get("alpha", 5.0), config.get("beta", 1.0))  # fmt: skip
    name = f"spec_gift_{id(spec)}"
    AttentionInterface.register(name, spec.attention)
    model.set_attn_implementation({"text_config": name})
    out = model.generate(**inputs, do_sample=False, max_new_tokens=n, output_scores=True,
                         return_dict_in_generate=True)  # fmt: skip
    assert spec.m is not None and set(spec.shifts) == set(spec.map_layers)  # it ran
    new = out.sequences[0, len(ids) :].tolist()
    eos = lvlm.processor.tokenizer.eos_token_id
    new = new[: new.index(eos)] if eos in new else new
    chosen = [float(s[0].float().log_softmax(-1)[t]) for s, t in zip(out.scores, new, strict=False)]
    return new, chosen


CONFIGS = [
    {},
    {"map_layers": [0, 1], "beta": 1.5, "alpha": 3.0},
    {"map_layers": "peak", "alpha": 8.0},
]


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
@pytest.mark.parametrize("config", CONFIGS, ids=["defaults", "two_map_layers_beta", "peak"])
def test_engine_equals_an_independent_implementation(lvlms, tiny_paths, images, family, config):
    lvlm = lvlms[family]
    batch = [Sample(QUESTIONS[1], (images[0],)), Sample(QUESTIONS[0], (images[1],)),
             Sample(QUESTIONS[0], (images[0],))]  # fmt: skip
    n = 10
    params = GenerationParams(max_new_tokens=n, logprobs=0)
    ours = lvlm.generate(batch, [{"name": "gift", **config}], params)
    base = lvlm.generate(batch, [], params)
    changed = False
    for sample, got, plain in zip(batch, ours, base, strict=True):
        expected, chosen = spec_generate(tiny_paths[family], lvlm, sample, config, n)
        assert list(got.token_ids) == expected
        torch.testing.assert_close(
            torch.tensor([t.logprob for t in got.logprobs]), torch.tensor(chosen),
            rtol=0, atol=1e-4,
        )  # fmt: skip
        changed |= got.token_ids != plain.token_ids or not torch.allclose(
            torch.tensor([t.logprob for t in got.logprobs]),
            torch.tensor([t.logprob for t in plain.logprobs]), atol=1e-4,
        )  # fmt: skip
    assert changed  # gift did something here
    assert ours[0].attention_paths == ["modifiers", "sdpa"]
