"""RITUAL, VCD, PAI-CFG and M3ID on a tiny random LLaVA: the invariants of specs/ritual.md §11."""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from lvlm_fix import LVLM, GenerationParams, Sample
from lvlm_fix.decoding import Runner, build_rows, combine_views, view_seed
from lvlm_fix.methods import REGISTRY, RowState, parse_intervention
from lvlm_fix.methods.m3id import m3id_weight
from lvlm_fix.methods.ritual import RITUAL
from lvlm_fix.methods.transforms import TRANSFORM_KEYS, random_transform, transformed_image
from lvlm_fix.methods.vcd import VCD, add_diffusion_noise, noise_schedule
from lvlm_fix.model import PromptBatch, render_prompt
from lvlm_fix.tiny import build_tiny

GREEDY = GenerationParams(max_new_tokens=8)
SAMPLING = GenerationParams(max_new_tokens=8, do_sample=True, seed=11)


@pytest.fixture(scope="module")
def lvlm(tmp_path_factory) -> LVLM:
    path = build_tiny("llava", tmp_path_factory.mktemp("tiny") / "llava")
    return LVLM.from_pretrained(path)


def noise_image(seed: int, size: tuple[int, int] = (40, 32)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def sample(seed: int = 5, text: str = "what is in the image?") -> Sample:
    return Sample(text, (noise_image(seed),), seed=seed)


def tokens(lvlm, specs, samples, params) -> list[list[int]]:
    return [g.token_ids for g in lvlm.generate(samples, specs, params)]


@contextlib.contextmanager
def captured_logits(lvlm):
    """Collect the last-position logits [R, V] of every forward the decode loop runs."""
    seen: list[torch.Tensor] = []
    hook = lvlm.model.lm_head.register_forward_hook(
        lambda module, args, out: seen.append(out[:, -1].float().clone())
    )
    try:
        yield seen
    finally:
        hook.remove()


def _identity_image(image, generator):
    return image, "identity"


def _identity_pixels(pixels, generator):
    return pixels


class IdentityRITUAL(RITUAL):
    """RITUAL's own weights, with the identity as its 'random' transform."""

    def contribute(self, model):
        c = super().contribute(model)
        return replace(c, views=tuple(replace(v, image_fn=_identity_image) for v in c.views))


class IdentityVCD(VCD):
    """VCD's own weights, with the noised view replaced by the original pixels."""

    def contribute(self, model):
        c = super().contribute(model)
        return replace(c, views=tuple(replace(v, pixel_fn=_identity_pixels) for v in c.views))


class ZeroWeightRITUAL(RITUAL):
    """RITUAL's transformed row, kept in the batch but weighted 0."""

    def contribute(self, model):
        c = super().contribute(model)
        return replace(c, views=tuple(replace(v, weight=lambda t: 0.0) for v in c.views))


# ---------------------------------------------------------------- configs


def test_registered_and_validated():
    assert {"ritual", "vcd", "pai_cfg", "m3id"} <= set(REGISTRY)
    assert parse_intervention({"name": "ritual"}).alpha_pos == 3.0
    assert parse_intervention({"name": "pai_cfg"}).gamma == 1.1
    with pytest.raises(ValueError, match="alpha"):
        parse_intervention({"name": "vcd", "alpha": -1})
    with pytest.raises(ValueError, match="noise_step"):
        parse_intervention({"name": "vcd", "noise_step": 1000})
    with pytest.raises(ValueError, match="gamma"):
        parse_intervention({"name": "pai_cfg", "gamma": 0.5})


def test_disagreeing_plausibility_cuts_conflict(lvlm):
    with pytest.raises(ValueError, match="plausibility"):
        lvlm.plan([{"name": "ritual", "beta": 0.1}, {"name": "vcd", "beta": 0.2}])


# ---------------------------------------------------------------- neutral = base


@pytest.mark.parametrize("params", [GREEDY, SAMPLING], ids=["greedy", "sampling"])
def test_neutral_settings_equal_base(lvlm, params):
    samples = [sample(5), sample(6, "describe it")]
    base = tokens(lvlm, [], samples, params)
    for specs in (
        [{"name": "ritual", "alpha_pos": 0}],
        [{"name": "vcd", "alpha": 0}],
        [{"name": "pai_cfg", "gamma": 1}],
        [{"name": "m3id", "decay": 0}],
        [{"name": "ritual", "alpha_pos": 0}, {"name": "vcd", "alpha": 0}],
    ):
        assert not lvlm.plan(specs, params).views
        assert tokens(lvlm, specs, samples, params) == base, specs


@pytest.mark.parametrize("params", [GREEDY, SAMPLING], ids=["greedy", "sampling"])
def test_zero_weight_view_without_cut_is_exact(lvlm, params):
    # A real transformed row with weight 0 and no cut: z == l0 bit for bit, tokens match base.
    spec = ZeroWeightRITUAL(beta=0.0)
    plan = lvlm.plan([spec], params)
    assert plan.view_weights(0) == [1.0, 0.0] and plan.plausibility_beta is None
    samples = [sample(5), sample(6, "describe it")]
    assert tokens(lvlm, [spec], samples, params) == tokens(lvlm, [], samples, params)


# ---------------------------------------------------------------- identity views


def test_identity_transform_scales_logits(lvlm):
    alpha = 3.0
    spec = IdentityRITUAL(alpha_pos=alpha, beta=0.0)
    samples = [sample(5)]
    with captured_logits(lvlm) as seen:
        out = tokens(lvlm, [spec], samples, GREEDY)
    plan = lvlm.plan([spec], GREEDY)
    for step, logits in enumerate(seen):  # [2, V]: original, identity view
        z = combine_views(logits, plan, step, 1)[:, 0]
        torch.testing.assert_close(z, (1 + alpha) * logits[:1], rtol=1e-5, atol=1e-5)
    assert out == tokens(lvlm, [], samples, GREEDY)


def test_vcd_self_contrast_is_original(lvlm):
    spec = IdentityVCD(alpha=1.0, beta=0.0)
    samples = [sample(5), sample(7, "what color?")]
    with captured_logits(lvlm) as seen:
        out = tokens(lvlm, [spec], samples, GREEDY)
    plan = lvlm.plan([spec], GREEDY)
    for step, logits in enumerate(seen):  # [B * 2, V]
        z = combine_views(logits, plan, step, 1)[:, 0]
        torch.testing.assert_close(z, logits[::2], rtol=1e-5, atol=1e-4)
    assert out == tokens(lvlm, [], samples, GREEDY)


def test_vcd_greedy_changes_scores_and_tokens(lvlm):
    # The reference's VCD is a no-op under greedy; ours contrasts the scores greedy picks from.
    samples = [sample(s, "describe the image") for s in range(4)]
    spec = [{"name": "vcd", "alpha": 1.0, "beta": 0.0}]
    with captured_logits(lvlm) as seen:
        contrasted = tokens(lvlm, spec, samples, GREEDY)
    z = combine_views(seen[0], lvlm.plan(spec, GREEDY), 0, 1)[:, 0]
    assert not torch.allclose(z, seen[0][::2])
    assert contrasted != tokens(lvlm, [], samples, GREEDY)


# ---------------------------------------------------------------- plausibility cut


def test_every_sampled_token_passes_the_cut(lvlm):
    beta = 0.1
    hot = GenerationParams(max_new_tokens=12, do_sample=True, temperature=5.0, seed=3)
    specs = [{"name": "ritual", "beta": beta}, {"name": "vcd", "beta": beta}]
    samples = [sample(5), sample(8, "tell me more about it")]
    with captured_logits(lvlm) as seen:
        out = tokens(lvlm, specs, samples, hot)
    checked = 0
    for b, ids in enumerate(out):
        for step, token in enumerate(ids):
            l0 = seen[step][b * 3]  # rows per sample: original, transformed, noised
            assert l0[token] >= l0.max() + math.log(beta) - 1e-6
            checked += 1
    assert checked >= 8


def test_beta_one_keeps_only_the_argmax(lvlm):
    params = GenerationParams(max_new_tokens=8, do_sample=True, temperature=3.0, seed=4)
    samples = [sample(5), sample(9, "is there a cat?")]
    with captured_logits(lvlm) as seen:
        out = tokens(lvlm, [{"name": "ritual", "beta": 1.0}], samples, params)
    for b, ids in enumerate(out):
        for step, token in enumerate(ids):
            assert token == int(seen[step][b * 2].argmax())


# ---------------------------------------------------------------- linearity / composition


def test_ritual_vcd_weights_are_the_sum(lvlm):
    ap, an = 3.0, 1.0
    specs = [{"name": "ritual", "alpha_pos": ap, "beta": 0.0}, {"name": "vcd", "alpha": an}]
    plan = lvlm.plan(specs[:1] + [{"name": "vcd", "alpha": an, "beta": 0.0}], GREEDY)
    assert plan.view_weights(0) == [1 + an, ap, -an]
    samples = [sample(5)]
    with captured_logits(lvlm) as seen:
        tokens(lvlm, plan.interventions, samples, GREEDY)
    l0, lt, ln = seen[0]
    z = combine_views(seen[0], plan, 0, 1)[0, 0]
    torch.testing.assert_close(z, l0 + ap * lt + an * (l0 - ln), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("params", [GREEDY, SAMPLING], ids=["greedy", "sampling"])
def test_composition_reduces_to_each_part(lvlm, params):
    samples = [sample(5), sample(6, "describe it")]
    ritual, vcd = {"name": "ritual"}, {"name": "vcd"}
    both = tokens(lvlm, [ritual, vcd], samples, params)
    assert tokens(lvlm, [vcd, ritual], samples, params) == both  # view order does not matter
    assert tokens(lvlm, [ritual, {"name": "vcd", "alpha": 0}], samples, params) == tokens(
        lvlm, [ritual], samples, params
    )
    assert tokens(lvlm, [{"name": "ritual", "alpha_pos": 0}, vcd], samples, params) == tokens(
        lvlm, [vcd], samples, params
    )


def test_text_only_views(lvlm):
    samples = [sample(5), sample(6, "describe it")]
    base = tokens(lvlm, [], samples, GREEDY)
    m3id = tokens(lvlm, [{"name": "m3id"}], samples, GREEDY)
    assert [ids[:1] for ids in m3id] == [ids[:1] for ids in base]  # c_0 = 0: first token is base
    assert m3id_weight(0, 0.02) == 0.0
    assert m3id_weight(10, 0.02) == pytest.approx((1 - math.exp(-0.2)) / math.exp(-0.2))
    gamma = 1.1
    spec = [{"name": "pai_cfg", "gamma": gamma}]
    with captured_logits(lvlm) as seen:
        tokens(lvlm, spec, samples, GREEDY)
    plan = lvlm.plan(spec, GREEDY)
    assert not plan.views[0].edited and plan.views[0].drop_image
    lc, lu = seen[0][::2], seen[0][1::2]
    z = combine_views(seen[0], plan, 0, 1)[:, 0]
    kept = lc >= lc.max(-1, keepdim=True).values + math.log(0.1)
    torch.testing.assert_close(z[kept], (gamma * lc - (gamma - 1) * lu)[kept])
    assert torch.isinf(z[~kept]).all()


TEXT_ONLY_METHODS = [{"name": "m3id"}, {"name": "pai_cfg"}, {"name": "vhr"}]


@pytest.mark.parametrize("spec", TEXT_ONLY_METHODS, ids=lambda s: s["name"])
def test_text_only_row_is_the_prompt_minus_its_image_tokens(lvlm, spec):
    samples = [sample(5), sample(6, "describe it")]
    image_id, tokenizer = lvlm.info.image_token_id, lvlm.processor.tokenizer

    def rows(mode: str) -> tuple[PromptBatch, list[list[int]]]:
        plan = lvlm.plan([{**spec, "text_only": mode}], GREEDY)
        batch = build_rows(lvlm.processor, image_id, plan, samples, lvlm.device)
        ids = [
            row[mask.bool()].tolist()
            for row, mask in zip(batch.input_ids, batch.attention_mask, strict=True)
        ]
        return batch, ids

    batch, ids = rows("drop_image_tokens")  # the default, the reference's construction
    assert parse_intervention(spec).text_only == "drop_image_tokens"
    for full, text_only in zip(ids[0::2], ids[1::2], strict=True):
        assert image_id in full and text_only == [i for i in full if i != image_id]
    assert batch.image_rows.tolist() == [0, 2]  # the text-only rows carry no image
    assert not batch.layout.image_mask[1::2].any()
    _, ids = rows("rerender")
    for s, text_only in zip(samples, ids[1::2], strict=True):
        assert text_only == tokenizer(render_prompt(lvlm.processor, s.text, 0)).input_ids


@pytest.mark.parametrize("mode", ["drop_image_tokens", "rerender"])
@pytest.mark.parametrize("spec", TEXT_ONLY_METHODS, ids=lambda s: s["name"])
def test_text_only_modes_decode(lvlm, spec, mode):
    samples = [sample(5), sample(6, "describe it")]
    batched = tokens(lvlm, [{**spec, "text_only": mode}], samples, GREEDY)
    alone = [tokens(lvlm, [{**spec, "text_only": mode}], [s], GREEDY)[0] for s in samples]
    assert batched == alone and all(len(ids) > 0 for ids in batched)


# ---------------------------------------------------------------- rows, caches, batches


def _solo(batch: PromptBatch, row: int) -> PromptBatch:
    """One row of a batch on its own, padding removed."""
    keep = batch.attention_mask[row].bool()
    image_mask = batch.layout.image_mask[row : row + 1, keep]
    return PromptBatch(
        input_ids=batch.input_ids[row : row + 1, keep],
        attention_mask=batch.attention_mask[row : row + 1, keep],
        pixel_values=batch.pixel_values[batch.image_rows == row],
        image_sizes=None,
        image_rows=torch.zeros(1, dtype=torch.long),
        layout=replace(batch.layout, image_mask=image_mask, key_start=torch.zeros(1).long()),
    )


def _run(lvlm, batch, plan, fed: list[int]) -> torch.Tensor:
    """Prefill, then feed the same tokens to every row: logits [steps, R, V]."""
    runner = Runner(lvlm.model, batch, plan, RowState(), lvlm.info.num_layers)
    out = [runner.prefill()]
    rows = batch.input_ids.shape[0]
    for token in fed:
        out.append(runner.forward(torch.full((rows, 1), token))[:, -1])
    return torch.stack(out)


def test_views_have_their_own_rows_and_caches(lvlm):
    plan = lvlm.plan([{"name": "ritual"}, {"name": "vcd"}], GREEDY)
    s = sample(5)
    batch = build_rows(lvlm.processor, lvlm.info.image_token_id, plan, [s], lvlm.device)
    # Row 1 is the processed transformed image, row 2 the noised processed original.
    generator = torch.Generator().manual_seed(view_seed(s.seed))
    transformed, _ = transformed_image(s.images[0], generator, lvlm.info.image_size)
    expected = lvlm.processor.image_processor(transformed, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch.pixel_values[1:2], expected, rtol=0, atol=0)
    noised = add_diffusion_noise(batch.pixel_values[0:1], 500, generator)
    assert torch.equal(batch.pixel_values[2:3], noised)

    fed = [7, 30, 12]
    together = _run(lvlm, batch, plan, fed)  # [4, 3, V]
    empty = lvlm.plan([], GREEDY)
    for row in range(3):
        alone = _run(lvlm, _solo(batch, row), empty, fed)[:, 0]
        torch.testing.assert_close(together[:, row], alone, rtol=0, atol=1e-4)


@pytest.mark.parametrize("params", [GREEDY, SAMPLING], ids=["greedy", "sampling"])
def test_batch_independence(lvlm, params):
    specs = [{"name": "ritual"}, {"name": "vcd"}]
    a = sample(5, "what?")
    b = sample(6, "a much longer question about the picture and all of its many colors")
    plan = lvlm.plan(specs, params)
    alone = build_rows(lvlm.processor, lvlm.info.image_token_id, plan, [a], lvlm.device)
    pair = build_rows(lvlm.processor, lvlm.info.image_token_id, plan, [b, a], lvlm.device)
    assert pair.attention_mask.shape[1] > alone.attention_mask.shape[1]
    assert torch.equal(pair.pixel_values[3:], alone.pixel_values)  # same transform, same noise
    assert tokens(lvlm, specs, [b, a], params)[1] == tokens(lvlm, specs, [a], params)[0]


def test_determinism():
    image = noise_image(1)
    first = random_transform(image, torch.Generator().manual_seed(3), 32)
    again = random_transform(image, torch.Generator().manual_seed(3), 32)
    assert first[1] == again[1] and first[0].tobytes() == again[0].tobytes()
    pixels = torch.rand(2, 3, 8, 8)
    noise = [add_diffusion_noise(pixels, 500, torch.Generator().manual_seed(4)) for _ in range(2)]
    assert torch.equal(noise[0], noise[1])
    draws = {
        str(random_transform(image, torch.Generator().manual_seed(s), 32)[1]) for s in range(8)
    }
    assert len(draws) > 1  # another seed, another draw


def test_sampling_is_reproducible(lvlm):
    specs = [{"name": "ritual"}, {"name": "vcd"}, {"name": "m3id", "beta": 0.1}]
    samples = [sample(5), sample(6, "describe it")]
    assert tokens(lvlm, specs, samples, SAMPLING) == tokens(lvlm, specs, samples, SAMPLING)


def test_views_work_with_beam_search(lvlm):
    params = GenerationParams(max_new_tokens=6, num_beams=3)
    out = lvlm.generate([sample(5), sample(6, "describe it")], [{"name": "ritual"}], params)
    assert all(0 < len(g.token_ids) <= 6 for g in out)


# ---------------------------------------------------------------- transforms and noise


def test_transform_distribution_and_sizes():
    image = noise_image(2, size=(14, 10))
    generator = torch.Generator().manual_seed(0)
    counts = dict.fromkeys(TRANSFORM_KEYS, 0)
    n = 6000
    for _ in range(n):
        out, applied = random_transform(image, generator, 12)
        counts[applied.key] += 1
        assert out.mode == "RGB"
        assert out.size == ((12, 12) if applied.key == "crop" else image.size)
        if applied.key == "rotation":
            assert -180 <= applied.params["angle"] <= 180
        elif applied.key == "crop":
            area = applied.params["height"] * applied.params["width"]
            assert area <= image.width * image.height
        elif applied.key == "gaussian blur":
            assert 1.5 <= applied.params["sigma"] <= 2.0
    chi_square = sum((c - n / 6) ** 2 / (n / 6) for c in counts.values())
    assert chi_square < 20.515  # chi2 with 5 dof: p > 0.001


def test_ritual_crop_is_a_square_at_the_input_size(lvlm):
    """The reference's RandomResizedCrop(336): on a non-square image the crop comes out square at
    the model's input side, so the processor keeps all of it."""
    image = noise_image(3, size=(50, 37))
    [view] = RITUAL().contribute(lvlm.info).views
    side = lvlm.info.image_size
    crops = 0
    for seed in range(40):
        out, note = view.image_fn(image, torch.Generator().manual_seed(seed))
        if note.startswith("crop"):
            crops += 1
            assert out.size == (side, side)
            processor = lvlm.processor.image_processor
            pixels = processor(out, return_tensors="pt")["pixel_values"]
            whole = processor(out, do_resize=False, do_center_crop=False, return_tensors="pt")
            torch.testing.assert_close(pixels, whole["pixel_values"])  # nothing cut away
        else:
            assert out.size == image.size
    assert crops > 0


def test_transformed_image_preprocesses_to_the_same_shape(lvlm):
    image = noise_image(3, size=(50, 37))
    processor = lvlm.processor.image_processor
    base = processor(image, return_tensors="pt")["pixel_values"]
    for seed in range(12):
        out, _ = transformed_image(image, torch.Generator().manual_seed(seed), lvlm.info.image_size)
        assert processor(out, return_tensors="pt")["pixel_values"].shape == base.shape


def test_noise_schedule_constants():
    signal, noise = noise_schedule()
    assert signal[500].item() == pytest.approx(0.8630, abs=1e-4)
    assert noise[500].item() == pytest.approx(0.5052, abs=1e-4)
    assert signal[999].item() == pytest.approx(0.2850, abs=1e-4)
    assert noise[999].item() == pytest.approx(0.9585, abs=1e-4)
    assert noise[0].item() == pytest.approx(0.0047, abs=1e-4)
    with pytest.raises(ValueError, match="noise_step"):
        add_diffusion_noise(torch.zeros(1, 3, 4, 4), 1000, torch.Generator())


def test_bad_transform_input():
    with pytest.raises(TypeError, match="PIL"):
        random_transform(torch.zeros(3, 4, 4), torch.Generator(), 4)


def test_views_on_llava_next(tmp_path):
    # anyres: a transform that keeps the image size gives the view the same image tokens; the
    # crop (a square at the input side) gives it its own count.
    lvlm = LVLM.from_pretrained(build_tiny("llava_next", tmp_path / "next"))
    specs = [{"name": "ritual"}, {"name": "vcd"}, {"name": "m3id"}]
    samples = [Sample("what?", (noise_image(4, (48, 30)),), seed=1), sample(5)]
    plan = lvlm.plan(specs, GREEDY)
    batch = build_rows(lvlm.processor, lvlm.info.image_token_id, plan, samples, lvlm.device)
    n_image = batch.layout.n_image.view(2, 4)  # [B, views]: original, transformed, noised, text
    assert (n_image[:, 2] == n_image[:, 0]).all() and (n_image[:, 3] == 0).all()
    cropped = [note["ritual.transformed"][0].startswith("crop") for note in batch.view_notes]
    assert cropped == [False, True]  # seed 1 draws a blur, seed 5 a crop
    assert n_image[0, 1] == n_image[0, 0] and n_image[1, 1] > 0
    out = tokens(lvlm, specs, samples, GenerationParams(max_new_tokens=4, do_sample=True, seed=2))
    assert all(len(ids) > 0 for ids in out)


def test_ritual_records_its_transform_per_sample(lvlm):
    a, b = sample(5), sample(6, text="Is there a red square in the picture?")
    [alone] = lvlm.generate([a], [{"name": "ritual"}], GREEDY)
    together = lvlm.generate([b, a], [{"name": "ritual"}], GREEDY)
    [note] = alone.views["ritual.transformed"]
    assert note.split("(")[0] in TRANSFORM_KEYS
    assert together[1].views == alone.views  # the draw does not depend on batch-mates
    assert lvlm.generate([a], [], GREEDY)[0].views == {}
