"""Attention modifiers: edits the fused kernel does not cover run on the plain-torch path.

A modifier is FlexAttention's score_mod shape over index tensors (kernels.edits.Modifier). The
checks: a score modifier that states PAI's gain and a probability modifier that states VHR's
head scale equal the built-in edits; a test-only intervention that states PAI as a modifier
decodes the built-in PAI's tokens, in a lane of its own, and says that the "modifiers" path ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from lvlm_fix import LVLM, EngineConfig, GenerationParams, Sample
from lvlm_fix.kernels import AttentionEdits, edited_attention
from lvlm_fix.kernels.edits import IMAGE, REST
from lvlm_fix.methods import Contribution, Intervention


@dataclass(frozen=True)
class ImageGain:
    """PAI's s + alpha*|s| on image columns of each row's last query row, as a score modifier."""

    image: torch.Tensor  # bool [B, G]: image columns (columns G.. are not)
    alpha: torch.Tensor  # float32 [B, H]

    def __call__(self, score, b, h, q_idx, kv_idx):
        K = score.shape[-1]
        image = torch.nn.functional.pad(self.image, (0, K - self.image.shape[1]))[b, kv_idx]
        last = q_idx == q_idx.amax(2, keepdim=True)
        return torch.where(image & last, score + self.alpha[b, h] * score.abs(), score)


@dataclass(frozen=True)
class HeadScale:
    """VHR's output scale per head, as a probability modifier (P @ V is linear in P)."""

    scale: torch.Tensor  # float32 [B, H]

    def __call__(self, probs, b, h, q_idx, kv_idx):
        return probs * self.scale[b, h]


def random_call(B=2, H=4, Hkv=2, Q=3, K=9, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, L, D, generator=g) for n, L in ((H, Q), (Hkv, K), (Hkv, K)))
    key_start = torch.tensor([0, 2])
    groups = torch.full((B, K), REST, dtype=torch.int8)
    groups[:, 1:5] = IMAGE
    return q, k, v, key_start, groups


def test_a_score_modifier_equals_the_built_in_gain():
    q, k, v, key_start, groups = random_call()
    B, H, Q = q.shape[:3]
    alpha = torch.rand(B, H)
    last_row = torch.zeros(B, Q, dtype=torch.bool)
    last_row[:, -1] = True
    built_in = AttentionEdits(col_group=groups, image_gain=alpha, gain_rows=last_row,
                              want_last_row=True)  # fmt: skip
    modified = AttentionEdits(score_mods=(ImageGain(groups == IMAGE, alpha),), want_last_row=True)
    expected, expected_stats = edited_attention(q, k, v, scale=0.3, key_start=key_start,
                                                edits=built_in)  # fmt: skip
    out, stats = edited_attention(q, k, v, scale=0.3, key_start=key_start, edits=modified)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(stats["last_row"], expected_stats["last_row"], rtol=0, atol=1e-6)
    assert not torch.equal(out, edited_attention(q, k, v, scale=0.3, key_start=key_start,
                                                 edits=AttentionEdits())[0])  # fmt: skip


def test_probability_modifiers_compose_with_the_built_in_edits():
    q, k, v, key_start, groups = random_call(seed=1)
    B, H = q.shape[:2]
    scale, alpha = torch.rand(B, H) + 0.5, torch.rand(B, H)
    rows = torch.ones(B, q.shape[2], dtype=torch.bool)
    gain = {"col_group": groups, "image_gain": alpha, "gain_rows": rows}
    built_in = AttentionEdits(**gain, head_scale=scale)
    mixed = AttentionEdits(**gain, prob_mods=(HeadScale(scale),))
    key_end = torch.tensor([7, 9])  # a preallocated cache whose rows end apart
    call = {"scale": 0.3, "key_start": key_start, "key_end": key_end}
    expected, _ = edited_attention(q, k, v, edits=built_in, **call)
    out, _ = edited_attention(q, k, v, edits=mixed, **call)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_modifiers_must_be_a_tuple_of_functions():
    q, k, v, key_start, _ = random_call()
    for bad in ([HeadScale(torch.ones(2, 4))], (1.0,)):
        with pytest.raises(ValueError, match="edits.prob_mods must be a tuple of modifiers"):
            edited_attention(q, k, v, scale=0.3, key_start=key_start,
                             edits=AttentionEdits(prob_mods=bad))  # fmt: skip


@dataclass(frozen=True)
class GainByModifier:
    """AttentionHook: PAI's decode and prefill edits, stated as a score modifier."""

    layers: frozenset[int]
    alpha: float

    def edits(self, call):
        if call.layer not in self.layers:
            return None
        R, H = call.query.shape[:2]
        alpha = torch.where(call.ctx.state["row.edited"], self.alpha, 0.0)
        gain = alpha.float()[:, None].expand(R, H)
        return {"score_mods": (ImageGain(call.layout.image_mask, gain),)}

    def after(self, call, out, stats):
        return None


class PAIByModifier(Intervention):
    """A test-only intervention: PAI (default layers and first-token edit) through a modifier."""

    name: ClassVar[str] = "test_pai_by_modifier"
    hooks: ClassVar[frozenset] = frozenset({"attention"})
    alpha: float = 0.2

    def contribute(self, model) -> Contribution:
        return Contribution(attention=GainByModifier(frozenset(range(2, model.num_layers)),
                                                     self.alpha))  # fmt: skip


@pytest.fixture(scope="module", params=["llava", "llava_next", "llava_onevision"])
def lvlm(request, tiny_paths):
    lvlm = LVLM.from_pretrained(tiny_paths[request.param], engine=EngineConfig(slots=8))
    yield lvlm
    lvlm.close()


def test_a_method_stated_as_a_modifier_runs_on_the_plain_torch_path(lvlm, images):
    samples = [Sample("describe this", (images[0],)), Sample("what color", (images[1],))]
    params = GenerationParams(max_new_tokens=10, logprobs=0)
    built_in = lvlm.generate(samples, [{"name": "pai", "alpha": 1.0}], params)
    by_modifier = lvlm.generate(samples, [PAIByModifier(alpha=1.0)], params)
    plain = lvlm.generate(samples, [], params)
    assert [g.token_ids for g in by_modifier] == [g.token_ids for g in built_in]

    def chosen(generations):
        return torch.tensor([[t.logprob for t in g.logprobs] for g in generations])

    torch.testing.assert_close(chosen(by_modifier), chosen(built_in), rtol=0, atol=1e-5)
    assert not torch.allclose(chosen(built_in), chosen(plain), atol=1e-4)  # PAI did something
    # the engine says which path ran: built-in edits the fused kernel; modifiers plain torch
    assert built_in[0].attention_paths == ["fused", "sdpa"]  # prefill: layers 0-1 unedited
    assert by_modifier[0].attention_paths == ["modifiers", "sdpa"]  # a lane of its own
    assert plain[0].attention_paths == ["fused", "sdpa"]  # shared steps use the kernel


def test_modifier_requests_decode_beside_shared_ones(lvlm, images):
    """Requests on both paths in one engine at once each get their tokens alone."""
    params = GenerationParams(max_new_tokens=12)
    jobs = [([PAIByModifier(alpha=1.0)], 0), ([{"name": "vhr"}], 1), ([], 0)]
    expected = [
        lvlm.generate([Sample("describe this", (images[i],))], specs, params)[0].token_ids
        for specs, i in jobs
    ]
    requests = [
        lvlm.submit([Sample("describe this", (images[i],))], specs, params) for specs, i in jobs
    ]
    assert [r.result(60)[0].token_ids for r in requests] == expected


def test_the_users_words_are_found_in_every_template(lvlm):
    """ModelInfo.query_gap/query_tail locate a one-turn prompt's text (GIFT reads it there)."""
    from lvlm_fix.model import render_prompt

    tokenizer = lvlm.processor.tokenizer
    for text in ("what color is the star", "Is there a dog in the image?"):
        ids = tokenizer(render_prompt(lvlm.processor, text, 1)).input_ids
        last_image = max(i for i, t in enumerate(ids) if t == lvlm.info.image_token_id)
        words = ids[last_image + 1 + lvlm.info.query_gap : len(ids) - lvlm.info.query_tail]
        assert tokenizer.decode(words).strip() == text


@dataclass(frozen=True)
class LookAtRows:
    """AttentionHook: at prefill of one layer, compare AttentionCall.probabilities with the
    kernel's last row (both unedited)."""

    layer: int
    seen: list

    def edits(self, call):
        return {"want_last_row": True} if call.layer == self.layer else None

    def after(self, call, out, stats):
        if call.layer == self.layer and call.ctx.phase == "prefill":
            last = torch.tensor([call.query.shape[2] - 1])
            self.seen.append((call.probabilities(last)[:, :, 0], stats["last_row"]))


class Look(Intervention):
    name: ClassVar[str] = "test_look"
    hooks: ClassVar[frozenset] = frozenset({"attention"})

    def contribute(self, model) -> Contribution:
        return Contribution(attention=LookAtRows(1, []), shared_decode=False)


def test_hooks_can_look_at_the_probabilities_of_chosen_rows(lvlm, images):
    params = GenerationParams(max_new_tokens=1)
    plan = lvlm.plan([Look()], params)
    samples = [Sample("describe this", (images[0],)), Sample("what color is it", (images[1],))]
    lvlm.submit(samples, [Look()], params, plan=plan).result(60)
    [hook] = plan.attention_hooks
    ours, kernels = hook.seen[0]
    torch.testing.assert_close(ours, kernels, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.sum(-1), torch.ones_like(ours[..., 0]))


def test_edited_attention_never_sees_replay_holes(tiny_paths, images):
    """OPERA replays rows of unequal length with hole columns in the mask; edits (here PAI)
    then go through the plain-torch path, which masks them: a row with a hole equals the same
    row without the hole's token."""
    from lvlm_fix.decoding import Runner, build_rows
    from lvlm_fix.methods import RowState

    lvlm = LVLM.from_pretrained(tiny_paths["llava"])
    plan = lvlm.plan([{"name": "pai", "alpha": 1.0}])
    samples = [Sample("describe this", (images[0],))]

    def last_logits(tokens, mask):
        batch = build_rows(lvlm.processor, lvlm.info.image_token_id, plan, samples, lvlm.device)
        state = RowState.start(plan.views, 1, lvlm.device)
        runner = Runner(lvlm.model, batch, plan, state, lvlm.info.num_layers)
        runner.prefill()
        mask = None if mask is None else torch.tensor([mask])
        return runner.forward(torch.tensor([tokens]), mask)[:, -1], runner

    with_hole, runner = last_logits([5, 6, 7], [1, 0, 1])
    without, _ = last_logits([5, 7], None)
    torch.testing.assert_close(with_hole, without, rtol=0, atol=1e-5)
    assert "modifiers" in runner.paths
