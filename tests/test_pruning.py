"""Token pruning (FastV, FlowCut, DyVTE) on a tiny LLaVA with a 6-layer vision tower."""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import pytest
import torch
from conftest import make_image
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
)

from lvlm_fix import LVLM, GenerationParams, Sample
from lvlm_fix.decoding import Runner, build_rows
from lvlm_fix.hooks import AttentionCall, ForwardContext, forward_context
from lvlm_fix.methods import Contribution, Intervention, View
from lvlm_fix.methods.base import RowState
from lvlm_fix.model import ImageLayout
from lvlm_fix.plan import PlanConflict, compile_plan
from lvlm_fix.tiny import build_tiny

QUESTIONS = ["describe this", "what color is the star in the picture on the left"]
PATCHES = 64  # 64 px images, 8 px patches
LAYERS = 4
PARAMS = GenerationParams(max_new_tokens=8)


@pytest.fixture(scope="module")
def lvlm(tmp_path_factory) -> LVLM:
    path = tmp_path_factory.mktemp("deep") / "llava"
    build_tiny("llava", path, image_size=64, layers=LAYERS)
    config = AutoConfig.from_pretrained(path)
    config.vision_config.num_hidden_layers = 6  # FlowCut needs stages before the read layer
    torch.manual_seed(1)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    return LVLM.from_pretrained(path)


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    images = [make_image((200, 20, 20), (64, 64)), make_image((20, 160, 40), (50, 70))]
    return [Sample(q, (im,)) for q, im in zip(QUESTIONS, images, strict=True)]


def tokens(lvlm, samples, interventions=(), params=PARAMS) -> list[list[int]]:
    return [g.token_ids for g in lvlm.generate(samples, list(interventions), params=params)]


def prefill_logits(lvlm, samples, interventions=()) -> tuple[Runner, torch.Tensor]:
    """A runner after prefill (for looking at its cache and layout) and its logits [R, V]."""
    plan = compile_plan(list(interventions), lvlm.info, PARAMS)
    batch = build_rows(lvlm.processor, lvlm.info.image_token_id, plan, samples, lvlm.device)
    state = RowState.start(plan.views, len(samples), lvlm.device)
    runner = Runner(lvlm.model, batch, plan, state, lvlm.info.num_layers)
    return runner, runner.prefill()


def prefill(lvlm, samples, interventions=()) -> Runner:
    return prefill_logits(lvlm, samples, interventions)[0]


def router_file(path, hidden: int, exit_from: int | None, seed: int = 0) -> str:
    """Routers whose p(exit) is ~0 before layer `exit_from` and ~1 from it on (None: never).

    Paired units gelu(a) + gelu(-a) >= 0 make the sign of each router's decision fixed.
    """
    torch.manual_seed(seed)
    u = torch.randn(LAYERS, 1, 2 * hidden)
    w1 = torch.cat([u, -u], 1)  # [L, 2, 2D]
    sign = torch.tensor([-1.0 if exit_from is None or e < exit_from else 1.0 for e in range(4)])
    w2 = torch.stack([-sign, sign], 1)[:, :, None].expand(LAYERS, 2, 2) * 50.0
    save_file({"w1": w1.contiguous(), "w2": w2.contiguous()}, str(path))
    return str(path)


def test_full_budget_equals_unpruned(lvlm, samples):
    base = tokens(lvlm, samples)
    assert tokens(lvlm, samples, [{"name": "fastv", "keep": PATCHES}]) == base
    assert tokens(lvlm, samples, [{"name": "flowcut", "budget": PATCHES}]) == base
    beams = GenerationParams(max_new_tokens=6, num_beams=3)
    fastv = [{"name": "fastv", "keep": PATCHES}]
    assert tokens(lvlm, samples, fastv, beams) == tokens(lvlm, samples, (), beams)
    assert lvlm.plan([{"name": "fastv", "ratio": 0.0}]).prune_hooks == ()  # neutral
    assert tokens(lvlm, samples, [{"name": "fastv", "keep": 8}]) != base  # it does prune


def test_fastv_per_step_equals_a_full_recompute_each_step(lvlm, samples):
    """mode=per_step (the reference's use_cache=False path) against a plain greedy loop: each
    step runs the whole sequence through a fresh prefill that prunes at layer K."""
    spec = {"name": "fastv", "layer": 2, "keep": 6}
    per_step = tokens(lvlm, samples, [{**spec, "mode": "per_step"}])
    plan = compile_plan([spec], lvlm.info, PARAMS)
    eos = lvlm.processor.tokenizer.eos_token_id
    for sample, got in zip(samples, per_step, strict=True):
        prompt = build_rows(lvlm.processor, lvlm.info.image_token_id, plan, [sample], lvlm.device)
        generated: list[int] = []
        while len(generated) < PARAMS.max_new_tokens:
            n = len(generated)
            rows = replace(
                prompt,
                input_ids=torch.cat([prompt.input_ids, torch.tensor([generated]).long()], 1),
                attention_mask=torch.nn.functional.pad(prompt.attention_mask, (0, n), value=1),
                layout=ImageLayout(
                    torch.nn.functional.pad(prompt.layout.image_mask, (0, n)),
                    prompt.layout.key_start,
                ),
            )
            state = RowState.start(plan.views, 1, lvlm.device)
            token = int(Runner(lvlm.model, rows, plan, state, LAYERS).prefill().argmax(-1))
            if token == eos:
                break
            generated.append(token)
        assert got == generated
    assert per_step != tokens(lvlm, samples, [spec])  # the kept set does change per step


@pytest.mark.parametrize("params", [PARAMS, GenerationParams(max_new_tokens=6, num_beams=2)])
def test_fastv_per_step_with_views_batched_equals_alone(lvlm, samples, params):
    specs = [{"name": "fastv", "layer": 2, "keep": 6, "mode": "per_step"}, {"name": "ritual"}]
    alone = [tokens(lvlm, [s], specs, params)[0] for s in samples]
    assert tokens(lvlm, samples, specs, params) == alone
    with pytest.raises(PlanConflict, match="vhr"):
        lvlm.plan([specs[0], {"name": "vhr"}])


def test_fastv_cache_columns_and_positions(lvlm, samples):
    k, keep = 2, 10
    base = prefill(lvlm, samples)
    pruned = prefill(lvlm, samples, [{"name": "fastv", "layer": k, "keep": keep}])
    prompt = base.layout.image_mask.shape[1]
    for layer in range(LAYERS):
        cols = pruned.layout.columns_at(layer)
        keys = pruned.cache.layers[layer].keys
        if layer < k:
            assert cols is None and keys.shape[2] == prompt
            torch.testing.assert_close(keys, base.cache.layers[layer].keys)
            continue
        image = pruned.layout.at_layer(layer).image_mask
        assert image.sum(-1).tolist() == [keep, keep]
        # the longest prompt has no padding; the other row's padding became fillers
        assert keys.shape[2] == cols.shape[1] == prompt - PATCHES + keep
        for row in cols:
            real = row[row >= 0]
            assert bool((real[1:] > real[:-1]).all())  # kept columns strictly increasing
        if layer == k:  # a kept column's input is unchanged: same key iff same position
            index = cols.clamp(min=0)[:, None, :, None].expand_as(keys)
            expected = base.cache.layers[layer].keys.gather(2, index)
            real = (cols >= 0)[:, None, :, None].expand_as(keys)  # fillers hold junk
            torch.testing.assert_close(keys[real], expected[real])
    # the first decode step sits at the same position: layer 0 (unpruned) caches the same key
    assert torch.equal(pruned.positions, base.positions)
    step = torch.full((2, 1), 7)
    base.forward(step)
    pruned.forward(step)
    torch.testing.assert_close(pruned.cache.layers[0].keys, base.cache.layers[0].keys)
    assert pruned.cache.layers[k].keys.shape[2] == prompt - PATCHES + keep + 1


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "fastv", "keep": 10},
        {"name": "fastv", "ratio": 0.5, "score_mode": "mean", "layer": 1},
        {"name": "flowcut", "budget": 16},
    ],
)
def test_batch_equals_alone(lvlm, samples, spec):
    together = tokens(lvlm, samples, [spec])
    alone = [tokens(lvlm, [s], [spec])[0] for s in samples]
    assert together == alone
    beams = GenerationParams(max_new_tokens=5, num_beams=2)
    assert tokens(lvlm, samples, [spec], beams) == [
        tokens(lvlm, [s], [spec], beams)[0] for s in samples
    ]


def flowcut_tower(lvlm, samples, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run only the vision tower under a FlowCut plan: (features [N, T, C], kept patch ids)."""
    plan = compile_plan([{"name": "flowcut", "budget": budget}], lvlm.info, PARAMS)
    batch = build_rows(lvlm.processor, lvlm.info.image_token_id, plan, samples, lvlm.device)
    state = RowState.start(plan.views, len(samples), lvlm.device)
    ctx = ForwardContext(plan, state, batch.layout, "prefill", lvlm.info.num_layers)
    with forward_context(ctx), torch.inference_mode():
        out = lvlm.model.model.get_image_features(
            batch.pixel_values, vision_feature_layer=-2, vision_feature_select_strategy="default"
        )
    assert batch.layout.n_image.tolist() == [budget] * len(samples)  # placeholders cut too
    return torch.stack(out.pooler_output), ctx.scratch["vision.patch_ids"]


@pytest.mark.parametrize("budget", [8, 16, 40])
def test_flowcut_budget_order_and_batch_independence(lvlm, samples, budget):
    features, ids = flowcut_tower(lvlm, samples, budget)
    assert features.shape[:2] == (2, budget)
    assert bool((ids[:, 0] == 0).all())  # CLS stays first
    patches = ids[:, 1:]
    assert patches.shape[1] == budget and bool((patches[:, 1:] > patches[:, :-1]).all())
    for row, sample in enumerate(samples):  # per-sample counts: batch-mates change nothing
        alone_features, alone_ids = flowcut_tower(lvlm, [sample], budget)
        assert torch.equal(alone_ids[0], ids[row])
        torch.testing.assert_close(alone_features[0], features[row], atol=1e-5, rtol=1e-4)
    again = flowcut_tower(lvlm, samples, budget)[1]
    assert torch.equal(again, ids)  # deterministic


def test_dyvte_never_exit_equals_baseline(lvlm, samples, tmp_path):
    hidden = lvlm.info.hidden_size
    never = router_file(tmp_path / "never.safetensors", hidden, exit_from=None)
    spec = {"name": "dyvte", "router": never}
    assert tokens(lvlm, samples, [spec]) == tokens(lvlm, samples)
    runner = prefill(lvlm, samples, [spec])
    assert runner.state["dyvte.exit_layer"].tolist() == [-1, -1]
    assert all(runner.layout.columns_at(layer) is None for layer in range(LAYERS))


@pytest.mark.parametrize("exit_from", [0, 1])
def test_dyvte_exit_drops_all_image_tokens(lvlm, samples, tmp_path, exit_from):
    path = router_file(tmp_path / "exit.safetensors", lvlm.info.hidden_size, exit_from)
    spec = {"name": "dyvte", "router": path}
    runner = prefill(lvlm, samples, [spec])
    assert runner.state["dyvte.exit_layer"].tolist() == [exit_from, exit_from]
    prompt = runner.layout.image_mask.shape[1]
    base = prefill(lvlm, samples)
    for layer in range(LAYERS):
        keys = runner.cache.layers[layer].keys
        if layer <= exit_from:
            assert keys.shape[2] == prompt
        else:
            assert keys.shape[2] == prompt - PATCHES
            assert not bool(runner.layout.at_layer(layer).image_mask.any())
            if layer == exit_from + 1:  # original positions: text keys equal the baseline's
                cols = runner.layout.columns_at(layer)
                index = cols.clamp(min=0)[:, None, :, None].expand_as(keys)
                expected = base.cache.layers[layer].keys.gather(2, index)
                real = (cols >= 0)[:, None, :, None].expand_as(keys)
                torch.testing.assert_close(keys[real], expected[real])
    together = tokens(lvlm, samples, [spec])
    assert together == [tokens(lvlm, [s], [spec])[0] for s in samples]
    assert together != tokens(lvlm, samples)


def test_dyvte_rows_exit_at_different_layers(lvlm, samples, tmp_path):
    """Row 0 exits after layer 0, row 1 never (it has no image); rows pack to the longest."""
    path = router_file(tmp_path / "exit0.safetensors", lvlm.info.hidden_size, 0)
    spec = {"name": "dyvte", "router": path}
    mixed = [samples[0], Sample("hello there", ())]
    runner = prefill(lvlm, mixed, [spec])
    assert runner.state["dyvte.exit_layer"].tolist() == [0, -1]
    cols = runner.layout.columns_at(1)
    lengths = runner.batch.attention_mask.sum(-1)
    assert cols.shape[1] == max(int(lengths[0]) - PATCHES, int(lengths[1]))
    assert int((cols >= 0).sum(-1)[0]) == int(lengths[0]) - PATCHES
    assert int((cols >= 0).sum(-1)[1]) == int(lengths[1])  # untouched, fillers on its left
    assert tokens(lvlm, mixed, [spec]) == [tokens(lvlm, [s], [spec])[0] for s in mixed]


def test_dyvte_without_router_is_a_clear_error(lvlm, samples):
    with pytest.raises(ValueError, match="dyvte_train"):
        lvlm.generate(samples, [{"name": "dyvte", "router": "auto"}])
    with pytest.raises(ValueError, match="router"):
        lvlm.plan([{"name": "dyvte"}])


class _SeeColumns(Intervention):
    """Records which key columns attention hooks see as image columns, per layer (prefill)."""

    name: ClassVar[str] = "test_see_columns"
    hooks: ClassVar[frozenset] = frozenset({"attention", "views"})
    seen: dict = {}

    def contribute(self, model) -> Contribution:
        seen = self.seen

        class Hook:
            def edits(self, call):
                if call.ctx.phase == "prefill":
                    seen[call.layer] = call.image_columns().sum(-1).tolist()
                return None

            def after(self, call, out, stats):
                return None

        text_only = View("text", weight=lambda t: 0.0, drop_image=True)
        return Contribution(attention=Hook(), views=(text_only,))


def test_pruning_composes_with_attention_hooks_and_views(lvlm, samples):
    probe = _SeeColumns()
    both = [{"name": "flowcut", "budget": 16}, {"name": "fastv", "layer": 2, "keep": 6}, probe]
    together = tokens(lvlm, samples, both)
    # rows: (sample, view); the text-only view rows have no image columns at all
    assert probe.seen[0] == [16, 0, 16, 0] and probe.seen[1] == [16, 0, 16, 0]
    assert probe.seen[2] == probe.seen[3] == [6, 0, 6, 0]
    assert together == [tokens(lvlm, [s], both)[0] for s in samples]
    with pytest.raises(PlanConflict, match="vision tower"):
        lvlm.plan([{"name": "flowcut"}, _Flowcut2()])


class _Flowcut2(Intervention):
    name: ClassVar[str] = "test_second_vision"
    hooks: ClassVar[frozenset] = frozenset({"vision"})

    def contribute(self, model) -> Contribution:
        return Contribution(vision=object())


def test_bad_configs(lvlm, tmp_path):
    with pytest.raises(ValueError, match="layer=9"):
        lvlm.plan([{"name": "fastv", "layer": 9}])
    with pytest.raises(ValueError, match="ratio"):
        lvlm.plan([{"name": "fastv", "ratio": 1.5}])
    info = lvlm.info.__class__(**{**lvlm.info.__dict__, "family": "llava_onevision"})
    with pytest.raises(ValueError, match="no CLS token"):
        compile_plan([{"name": "flowcut"}], info, PARAMS)
    with pytest.raises(ValueError, match="LLaVA-NeXT only"):
        lvlm.plan([{"name": "flowcut", "llm_layer": 2}])
    small = router_file(tmp_path / "small.safetensors", 8, None)
    with pytest.raises(ValueError, match="hidden size 8"):
        lvlm.plan([{"name": "dyvte", "router": small}])


def test_dyvte_training_command_writes_loadable_routers(lvlm, samples, tmp_path):
    from lvlm_fix.methods.dyvte_train import main

    out = tmp_path / "router.safetensors"
    model_dir = lvlm.info.path
    main(["--model", model_dir, "--out", str(out), "--samples", "4", "--batch-size", "4",
          "--width", "8", "--lr", "1e-3"])  # fmt: skip
    spec = {"name": "dyvte", "router": str(out), "threshold": 0.0}  # exit at the first router
    runner = prefill(lvlm, samples, [spec])
    assert runner.state["dyvte.exit_layer"].tolist() == [0, 0]
    assert len(tokens(lvlm, samples, [spec])[0]) == PARAMS.max_new_tokens


@pytest.mark.parametrize(
    ("pruning", "other"),
    [
        ({"name": "fastv", "keep": 10}, {"name": "ritual"}),
        ({"name": "flowcut", "budget": 16}, {"name": "vcd"}),
        ({"name": "flowcut", "budget": 16}, {"name": "ritual"}),
        ({"name": "flowcut", "budget": 16}, {"name": "var"}),
        ({"name": "fastv", "keep": 10}, {"name": "pai"}),
        ({"name": "fastv", "keep": 10}, {"name": "vhr"}),
    ],
)
def test_pruning_composes_with_other_methods(lvlm, samples, pruning, other):
    both = [pruning, other]
    together = tokens(lvlm, samples, both)
    assert together == [tokens(lvlm, [s], both)[0] for s in samples]
    full = {**pruning, **({"keep": PATCHES} if "keep" in pruning else {"budget": PATCHES})}
    assert tokens(lvlm, samples, [full, other]) == tokens(lvlm, samples, [other])


def test_pruning_with_opera(lvlm, samples):
    opera = {"name": "opera", "num_beams": 2, "candidates": 2}
    params = GenerationParams(max_new_tokens=5)
    both = [{"name": "flowcut", "budget": 16}, opera]  # a shorter prompt: nothing else changes
    together = tokens(lvlm, samples, both, params)
    assert together == [tokens(lvlm, [s], both, params)[0] for s in samples]
    with pytest.raises(PlanConflict, match="'fastv' and 'opera'"):
        lvlm.plan([{"name": "fastv"}, opera])
    with pytest.raises(PlanConflict, match="'fastv' and 'var'"):
        lvlm.plan([{"name": "fastv"}, {"name": "var"}])


def masked_reference(
    lvlm, sample: Sample, dropped: dict[int, torch.Tensor], token: int | None = None
) -> torch.Tensor:
    """Next-token logits [V] of the stock layers run one by one (no cache), where layer l's
    queries may not see the prompt columns dropped[l] (bool [S]); `token` is appended to the
    prompt when given. Physical pruning (cache included) must equal this masking."""
    model = lvlm.model.model
    plan = compile_plan([], lvlm.info, PARAMS)
    batch = build_rows(lvlm.processor, lvlm.info.image_token_id, plan, [sample], lvlm.device)
    if token is not None:
        batch = replace(
            batch,
            input_ids=torch.cat([batch.input_ids, torch.tensor([[token]])], 1),
            attention_mask=torch.nn.functional.pad(batch.attention_mask, (0, 1), value=1),
            layout=replace(
                batch.layout, image_mask=torch.nn.functional.pad(batch.layout.image_mask, (0, 1))
            ),
        )
        dropped = {k: torch.nn.functional.pad(v, (0, 1)) for k, v in dropped.items()}
    with torch.inference_mode():
        hidden = model.get_input_embeddings()(batch.input_ids)
        features = model.get_image_features(
            batch.pixel_values, vision_feature_layer=-2, vision_feature_select_strategy="default"
        ).pooler_output
        hidden[batch.layout.image_mask] = torch.cat(list(features)).to(hidden.dtype)
        positions = batch.position_ids
        rotary = model.language_model.rotary_emb(hidden, position_ids=positions)
        size = hidden.shape[1]
        causal = torch.ones(size, size, dtype=torch.bool).tril()
        for index, layer in enumerate(model.language_model.layers):
            hidden_cols = dropped.get(index, torch.zeros(size, dtype=torch.bool))
            mask = causal & (~hidden_cols[None] | torch.eye(size, dtype=torch.bool))
            hidden = layer(hidden, attention_mask=mask[None, None], position_embeddings=rotary,
                           position_ids=positions)  # fmt: skip
        hidden = model.language_model.norm(hidden)
        return lvlm.model.lm_head(hidden[0, -1]).float()


def test_physical_pruning_equals_masking(lvlm, samples, tmp_path):
    sample = samples[1]
    fastv, logits = prefill_logits(lvlm, [sample], [{"name": "fastv", "layer": 2, "keep": 10}])
    cols = fastv.layout.columns_at(2)[0]
    gone = torch.ones(fastv.layout.image_mask.shape[1], dtype=torch.bool)
    gone[cols] = False
    expected = masked_reference(lvlm, sample, {2: gone, 3: gone})
    torch.testing.assert_close(logits, expected[None], atol=1e-4, rtol=1e-4)
    step = fastv.forward(torch.tensor([[7]]))[:, -1]  # decode through the pruned cache
    expected = masked_reference(lvlm, sample, {2: gone, 3: gone}, token=7)
    torch.testing.assert_close(step, expected[None], atol=1e-4, rtol=1e-4)
    path = router_file(tmp_path / "exit.safetensors", lvlm.info.hidden_size, 1)
    dyvte, logits = prefill_logits(lvlm, [sample], [{"name": "dyvte", "router": path}])
    image = dyvte.layout.image_mask[0]
    expected = masked_reference(lvlm, sample, {2: image, 3: image})
    torch.testing.assert_close(logits, expected[None], atol=1e-4, rtol=1e-4)


def test_flowcut_when_the_llm_reads_the_first_vision_layer(tiny_llava_path, images):
    """The default tiny tower has 2 layers and the LLM reads layer 0: one forced cut there."""
    small = LVLM.from_pretrained(tiny_llava_path)
    spec = [{"name": "flowcut", "budget": 8}]
    pairs = [Sample(q, (im,)) for q, im in zip(QUESTIONS, images, strict=True)]
    together = tokens(small, pairs, spec)
    assert together == [tokens(small, [s], spec)[0] for s in pairs]
    assert prefill(small, pairs, spec).layout.n_image.tolist() == [8, 8]


# LLaVA-NeXT (anyres): FlowCut per crop in the tower, then once inside the LLM.

NEXT_PATCHES = 16  # per crop: 32 px crops, 8 px patches
NEXT_LAYER = 1  # the LLM layer that scores (the default llm_layer)


@pytest.fixture(scope="module")
def next_lvlm(tmp_path_factory) -> LVLM:
    path = tmp_path_factory.mktemp("deep") / "llava_next"
    build_tiny("llava_next", path, layers=LAYERS)
    config = AutoConfig.from_pretrained(path)
    config.vision_config.num_hidden_layers = 6  # FlowCut needs stages before the read layer
    torch.manual_seed(1)
    LlavaNextForConditionalGeneration(config).save_pretrained(path)
    return LVLM.from_pretrained(path)


@pytest.fixture(scope="module")
def next_samples() -> list[Sample]:
    """A wide image (base + 2 sub-crops, unpadded rows) and a small one (base + 1 sub-crop)."""
    images = [make_image((200, 20, 20), (64, 40)), make_image((20, 160, 40), (20, 20))]
    return [Sample(q, (im,)) for q, im in zip(QUESTIONS, images, strict=True)]


def test_flowcut_next_full_budget_equals_unpruned(next_lvlm, next_samples):
    base = tokens(next_lvlm, next_samples)
    spec = {"name": "flowcut", "budget": 1000, "keep_newlines": True}
    assert tokens(next_lvlm, next_samples, [spec]) == base
    beams = GenerationParams(max_new_tokens=5, num_beams=2)
    assert tokens(next_lvlm, next_samples, [spec], beams) == tokens(
        next_lvlm, next_samples, (), beams
    )
    runner = prefill(next_lvlm, next_samples, [spec])
    assert all(runner.layout.columns_at(layer) is None for layer in range(LAYERS))
    assert tokens(next_lvlm, next_samples, [{"name": "flowcut", "budget": 12}]) != base


def test_flowcut_next_token_counts(next_lvlm, next_samples):
    budget, crop = 12, 5
    full = prefill(next_lvlm, next_samples).layout.n_image  # with newlines: [44, 36]
    runner = prefill(next_lvlm, next_samples, [{"name": "flowcut", "budget": budget,
                                               "crop_budget": crop}])  # fmt: skip
    crops = torch.tensor([3, 2])  # base + sub-crops of each image
    entering = runner.layout.at_layer(0).n_image  # before the LLM cut
    assert bool((entering >= crop).all()) and bool((entering <= crops * crop).all())
    assert bool((entering < full).all())
    for layer in range(LAYERS):
        n_image = runner.layout.at_layer(layer).n_image
        cols = runner.layout.columns_at(layer)
        assert runner.cache.layers[layer].keys.shape[2] == cols.shape[1]
        for row in cols:
            real = row[row >= 0]
            assert bool((real[1:] > real[:-1]).all())  # kept columns stay in order
        if layer <= NEXT_LAYER:
            assert torch.equal(n_image, entering)
        else:
            assert n_image.tolist() == entering.clamp(max=budget).tolist()
    default = prefill(next_lvlm, next_samples, [{"name": "flowcut", "budget": 4}])
    assert default.layout.at_layer(NEXT_LAYER + 1).n_image.tolist() == [4, 4]
    assert bool((default.layout.at_layer(0).n_image >= 2).all())  # crop_budget = budget // 2


def test_flowcut_next_crop_survivors_in_raster_order(next_lvlm, next_samples):
    """Per crop at most crop_budget survivors; the LLM gets the base image's survivors, then the
    sub-crops' in the raster order of the stitched grid, and no newline tokens."""
    from lvlm_fix.anyres import NEWLINE, packed_ids

    crop = 5
    spec = {"name": "flowcut", "budget": 1000, "crop_budget": crop}
    runner = prefill(next_lvlm, [next_samples[0]], [spec])
    plan = compile_plan([spec], next_lvlm.info, PARAMS)
    batch = runner.batch
    state = RowState.start(plan.views, 1, next_lvlm.device)
    ctx = ForwardContext(plan, state, batch.layout, "prefill", LAYERS,
                         image_sizes=batch.image_sizes)  # fmt: skip
    with forward_context(ctx), torch.inference_mode():
        next_lvlm.model.model.get_image_features(batch.pixel_values, batch.image_sizes)
    assert ctx.scratch["vision.patch_ids"].shape == (3, 1 + crop)  # CLS + crop_budget per crop
    ids = packed_ids(next_lvlm.model.model, batch.image_sizes, NEXT_PATCHES, "default")
    image = batch.layout.image_mask[0]
    kept = runner.layout.columns_at(0)[0]
    kept_ids = ids[image.cumsum(0)[kept[image[kept]]] - 1].long()  # packed id of each kept one
    assert not bool((ids[image.cumsum(0)[kept[image[kept]]] - 1] == NEWLINE).any())
    base, subs = kept_ids[:crop], kept_ids[crop:]
    assert bool((base < NEXT_PATCHES).all()) and bool((base[1:] > base[:-1]).all())
    # The wide image's sub-crops sit side by side (1 row x 2 crops of 4 x 4 patches).
    crop_index, patch = subs // NEXT_PATCHES - 1, subs % NEXT_PATCHES
    raster = (patch // 4) * 8 + crop_index * 4 + patch % 4
    assert 0 < len(subs) <= 2 * crop and bool((raster[1:] > raster[:-1]).all())


def next_reference(lvlm, sample: Sample, runner: Runner, renumber: bool, token=None):
    """Next-token logits [V] of the stock NeXT layers run one by one (no cache) on the tokens the
    runner kept: layers <= NEXT_LAYER see its layer-0 columns, later layers its cut columns,
    numbered 0.. per stage (`renumber`) or at their original positions. The tower is unpruned
    here, so the image features are stock ones."""
    model, next_model = lvlm.model, lvlm.model.model
    batch = runner.batch
    with torch.inference_mode():
        embeds = next_model.get_input_embeddings()(batch.input_ids)
        features = next_model.get_image_features(batch.pixel_values, batch.image_sizes)
        embeds[batch.layout.image_mask] = torch.cat(features.pooler_output).to(embeds.dtype)
        extra = next_model.get_input_embeddings()(torch.tensor([[token]])) if token else None
        stages = [runner.layout.columns_at(0)[0], runner.layout.columns_at(NEXT_LAYER + 1)[0]]
        hidden, kept = embeds[:, stages[0]], stages[0]
        prompt = batch.input_ids.shape[1]
        for index, layer in enumerate(next_model.language_model.layers):
            if index == NEXT_LAYER + 1:
                hidden, kept = hidden[:, torch.isin(kept, stages[1])], stages[1]
            x = hidden if extra is None else torch.cat([hidden, extra], 1)
            if renumber:
                positions = torch.arange(x.shape[1])[None]
            else:
                positions = torch.cat([kept, torch.tensor([prompt])])[None, : x.shape[1]]
            rotary = next_model.language_model.rotary_emb(x, position_ids=positions)
            mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()[None, None]
            x = layer(x, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
            hidden, extra = (x, None) if extra is None else (x[:, :-1], x[:, -1:])
            last = x[:, -1:]
        return model.lm_head(next_model.language_model.norm(last))[0, -1].float()


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_flowcut_next_llm_cut_equals_stepwise_reference(next_lvlm, next_samples, positions):
    """No tower cut (crop_budget = all patches): layer 0 drops the newlines, layer 2 cuts to the
    budget; prefill and a decode step through the pruned cache match the stock layers."""
    sample = next_samples[0]
    spec = {"name": "flowcut", "budget": 10, "crop_budget": NEXT_PATCHES, "positions": positions}
    runner, logits = prefill_logits(next_lvlm, [sample], [spec])
    assert runner.layout.at_layer(NEXT_LAYER + 1).n_image.tolist() == [10]
    renumber = positions == "compact"
    expected = next_reference(next_lvlm, sample, runner, renumber)
    torch.testing.assert_close(logits, expected[None], atol=1e-4, rtol=1e-4)
    step = runner.forward(torch.tensor([[7]]))[:, -1]
    expected = next_reference(next_lvlm, sample, runner, renumber, token=7)
    torch.testing.assert_close(step, expected[None], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "flowcut", "budget": 8},
        {"name": "flowcut", "budget": 12, "positions": "original", "keep_newlines": True},
    ],
)
def test_flowcut_next_batch_equals_alone(next_lvlm, next_samples, spec):
    together = tokens(next_lvlm, next_samples, [spec])
    assert together == [tokens(next_lvlm, [s], [spec])[0] for s in next_samples]
    beams = GenerationParams(max_new_tokens=5, num_beams=2)
    assert tokens(next_lvlm, next_samples, [spec], beams) == [
        tokens(next_lvlm, [s], [spec], beams)[0] for s in next_samples
    ]
    mixed = [next_samples[0], Sample("hello there", ())]  # a row with no image at all
    assert tokens(next_lvlm, mixed, [spec]) == [tokens(next_lvlm, [s], [spec])[0] for s in mixed]


def test_flowcut_next_scores_follow_the_formula():
    """The LLM-stage score on random tensors vs a per-row, per-head loop of the spec formula."""
    from lvlm_fix.methods.flowcut_llm import visual_scores
    from lvlm_fix.model import ImageLayout

    torch.manual_seed(0)
    rows, heads, kv_heads, k_len, dim = 2, 4, 2, 9, 8
    query = torch.randn(rows, heads, 3, dim)
    key, value = torch.randn(rows, kv_heads, k_len, dim), torch.randn(rows, kv_heads, k_len, dim)
    image = torch.zeros(rows, k_len, dtype=torch.bool)
    image[0, 2:6], image[1, 1:8] = True, True
    layout = ImageLayout(image_mask=image, key_start=torch.tensor([0, 1]))
    ctx = ForwardContext(None, None, layout, "prefill", LAYERS)
    call = AttentionCall(1, query, key, value, dim**-0.5, ctx)
    scores = visual_scores(call)
    for r in range(rows):
        cols = image[r].nonzero().flatten()
        rel = torch.stack([(query[r, h, -1] @ key[r, h // 2, cols].T * dim**-0.5).softmax(-1)
                           for h in range(heads)]).mean(0)  # fmt: skip
        sem = torch.stack([(value[r, h, -1] @ value[r, h, cols].T * dim**-0.5).softmax(-1)
                           for h in range(kv_heads)]).mean(0)  # fmt: skip
        norm = value[r, :, cols].mean(0).abs().sum(-1)
        expected = (rel / rel.sum() + sem / sem.sum()) * norm
        torch.testing.assert_close(scores[r, cols], expected)


def test_flowcut_next_bad_configs(next_lvlm):
    with pytest.raises(ValueError, match="llm_layer=3"):
        next_lvlm.plan([{"name": "flowcut", "llm_layer": 3}])
    with pytest.raises(PlanConflict, match="'flowcut' and 'var'"):
        next_lvlm.plan([{"name": "flowcut"}, {"name": "var"}])
    with pytest.raises(PlanConflict, match="'flowcut' and 'opera'"):
        next_lvlm.plan([{"name": "flowcut"}, {"name": "opera"}])


@pytest.mark.parametrize(
    "other", [{"name": "ritual"}, {"name": "vcd"}, {"name": "fastv", "layer": 3, "keep": 4}]
)
def test_flowcut_next_composes(next_lvlm, next_samples, other):
    both = [{"name": "flowcut", "budget": 8}, other]
    together = tokens(next_lvlm, next_samples, both)
    assert together == [tokens(next_lvlm, [s], both)[0] for s in next_samples]
    full = {"name": "flowcut", "budget": 1000, "keep_newlines": True}
    assert tokens(next_lvlm, next_samples, [full, other]) == tokens(
        next_lvlm, next_samples, [other]
    )
