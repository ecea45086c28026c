"""OPERA: reductions to beam search / greedy, column scores, the captured attention row,
rollback rules and batch independence (spec §7), on tiny random LLaVA models."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from lvlm_fix import LVLM, GenerationParams
from lvlm_fix.decoding import Runner, Sample, build_rows, decode
from lvlm_fix.methods import RowState, parse_intervention
from lvlm_fix.methods.opera import reference_prompt_ids
from lvlm_fix.methods.opera_state import (
    ROW_KEY,
    adjusted_logits,
    candidate_log_probs,
    column_scores,
    column_scores_fp16,
    mode_smallest,
    renormalised_row,
)
from lvlm_fix.model import render_prompt
from lvlm_fix.search import BeamSearch, Limits, Recording, advance_beams
from lvlm_fix.tiny import build_tiny

RED = Image.new("RGB", (32, 32), (200, 30, 30))
BLUE = Image.new("RGB", (32, 32), (20, 30, 230))
SAMPLES = [
    Sample("describe the image", (RED,)),
    Sample("what color is the cup in this picture please", (BLUE,)),
]
ROLLBACK = {"name": "opera", "threshold": 3, "min_rollback_loc": 0}


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return build_tiny("llava", tmp_path_factory.mktemp("tiny") / "llava")


@pytest.fixture(scope="module")
def lvlm(path):
    return LVLM.from_pretrained(path)


def run_recorded(lvlm, spec, samples, max_new_tokens):
    plan = lvlm.plan([spec], GenerationParams(max_new_tokens=max_new_tokens))
    recorder = Recording(plan.search)
    plan = replace(plan, search=recorder)
    tok = lvlm.processor.tokenizer
    limits = Limits(tok.eos_token_id, tok.pad_token_id, max_new_tokens, [None] * len(samples))
    events = list(decode(lvlm.model, lvlm.processor, lvlm.info, plan, samples, limits))
    return events[-1].result.tokens, recorder.state


def ids(generations):
    return [g.token_ids for g in generations]


# -- pure pieces ---------------------------------------------------------------------------


def test_column_scores_uniform_window():
    t, scale, eps = 4, 50.0, 1e-7
    a = torch.full((1, 1, t + 1), 0.01)
    logcol = torch.tensor([[(t - j) * math.log(scale * 0.01) for j in range(t)]])
    log_phi, loc, _ = column_scores(logcol, a, scale, eps)
    # column 0 collects the most factors (here all equal 0.5 < 1, so the newest column wins)
    expected = [math.log(eps) + (t + 1 - j) * math.log(0.5) for j in range(t + 1)]
    assert loc.item() == max(range(t + 1), key=lambda j: expected[j])
    assert log_phi.item() == pytest.approx(max(expected), rel=1e-6)


def test_column_scores_planted_column_and_diagonal():
    t, scale, eps, planted, a_c = 6, 50.0, 1e-7, 2, 0.2
    # committed rows: column 2 holds a_c from its own (diagonal) row on, everything else tiny
    rows = torch.full((t + 1, t + 1), 1e-3)
    rows[planted:, planted] = a_c
    logcol = torch.zeros(1, t)
    for i in range(t):
        logcol[0, : i + 1] += torch.log(scale * rows[i, : i + 1])
    log_phi, loc, _ = column_scores(logcol, rows[t][None, None], scale, eps)
    n = t + 1 - planted  # rows planted..t, the diagonal and the candidate row included
    assert loc.item() == planted
    assert log_phi.item() == pytest.approx(math.log(eps) + n * math.log(scale * a_c), rel=1e-5)


def test_fp16_column_scores_underflow_to_location_zero():
    """score_dtype=float16 (the reference's buffers): ε·product below fp16's range is 0, and a
    candidate whose columns are all 0 gets location 0, where log space finds the real maximum."""
    t, scale, eps = 3, 50.0, 1e-7
    logcol = torch.tensor([[(t - j) * math.log(scale * 1e-3) for j in range(t)]])  # σ·a = 0.05
    window = torch.full((1, 2, t + 1), 1e-3)  # candidate 0: every factor 0.05
    window[0, 1, t] = 0.9  # candidate 1: its own row puts σ·a = 45 on its own column
    log_phi, loc, _ = column_scores(logcol, window, scale, eps)
    assert loc.tolist() == [[t, t]]  # the column with the fewest factors < 1, or the 45
    log_phi16, loc16, _ = column_scores_fp16(logcol, window, scale, eps)
    assert loc16.tolist() == [[0, t]]
    assert log_phi16[0, 0] == float("-inf")  # eps * 0.05 = 5e-9: below fp16's smallest value
    assert log_phi16[0, 1].item() == pytest.approx(log_phi[0, 1].item(), abs=1e-2)


def test_length_normalisation_counts_the_prompt_as_transformers_4_29():
    """length_includes_prompt: a finished hypothesis is scored by its ids, prompt included and
    the final EOS not (transformers 4.29); by default by its generated tokens, EOS included."""
    limits = Limits(eos_id=0, pad_id=1, max_new_tokens=4, generators=[None])
    params = GenerationParams(num_beams=2)
    eos_first = torch.tensor([0.6, 0.3, 0.1]).log().expand(1, 2, 3)  # EOS is the best token
    prompt = 7
    for prompt_ids, first, second in ((None, 1, 2), (prompt, prompt, prompt + 1)):
        st = BeamSearch(params).start(1, limits, torch.device("cpu"))
        advance_beams(st, eos_first, params, prompt_ids)  # EOS at response index 0
        assert st.best_scores[0, 0].item() == pytest.approx(math.log(0.6) / first)
        advance_beams(st, eos_first, params, prompt_ids)  # token 1, then EOS at index 1
        expected = (math.log(0.3) + math.log(0.6)) / second
        assert torch.isclose(st.best_scores, torch.tensor(expected)).any()


def test_reference_prompt_counts_each_image_as_one_id(lvlm):
    plan = lvlm.plan([{"name": "opera", "length_includes_prompt": True}])
    batch = build_rows(lvlm.processor, lvlm.info.image_token_id, plan, SAMPLES, lvlm.device)
    tokenizer = lvlm.processor.tokenizer
    expected = [len(tokenizer(render_prompt(lvlm.processor, s.text, 1)).input_ids) for s in SAMPLES]
    assert reference_prompt_ids(batch, 1) == expected


def test_reproduction_switches_decode(lvlm):
    spec = {"name": "opera", "score_dtype": "float16", "length_includes_prompt": True}
    out = lvlm.generate(SAMPLES, [{**spec, "bonus_tokens": 0}], GenerationParams(max_new_tokens=6))
    assert [g.finish_reason for g in out] and all(len(g.token_ids) <= 6 for g in out)


def test_renormalised_row_is_max_over_heads_then_full_sum():
    probs = torch.tensor([[[0.5, 0.5, 0.0], [0.1, 0.2, 0.7]]])
    row = renormalised_row(probs)
    assert torch.allclose(row, torch.tensor([[0.5, 0.5, 0.7]]) / 1.7)


def test_mode_smallest_breaks_ties_low():
    values = torch.tensor([[3, 1, 3, 1, 2], [4, 4, 0, 0, 4]])
    assert mode_smallest(values, 10).tolist() == [1, 4]


def test_bonus_first_then_penalty():
    z, mass, log_phi = torch.zeros(1, 2), torch.tensor([[0.3, 0.1]]), torch.tensor([[0.0, 1.0]])
    bonus = adjusted_logits(z, mass, log_phi, 9, 2.0, 10)  # t+1 = 10
    assert torch.allclose(bonus, torch.tensor([[0.6, 0.2]]))
    penalised = adjusted_logits(z, mass, log_phi, 10, 2.0, 10)  # t+1 = 11
    assert torch.allclose(penalised, torch.tensor([[-2.0, -2 * math.e]]))


def test_candidate_log_probs_full_set_and_restriction():
    z = torch.randn(2, 7)
    full = candidate_log_probs(torch.arange(7).repeat(2, 1), z, 7)
    assert torch.allclose(full, z.log_softmax(-1))
    cut = candidate_log_probs(torch.tensor([[1, 4]]), torch.tensor([[0.0, 1.0]]), 7)
    assert cut[0, [1, 4]].exp().sum() == pytest.approx(1.0, abs=1e-6)
    assert torch.isinf(cut[0, [0, 2, 3, 5, 6]]).all()


def test_config_validation_and_plan(lvlm):
    assert parse_intervention({"name": "opera"}).candidates == 5
    with pytest.raises(ValueError, match="candidates"):
        parse_intervention({"name": "opera", "candidates": 0})
    with pytest.raises(ValueError, match="num_beams"):
        lvlm.plan([{"name": "opera"}], GenerationParams(num_beams=2))
    with pytest.raises(ValueError, match="logprobs are only available"):
        lvlm.plan([{"name": "opera"}], GenerationParams(logprobs=2))


# -- the captured attention row ------------------------------------------------------------


def eager_check(eager, runner, batch, fed, atol=1e-5):
    """Last-layer last-row attention and logits of eager attention on the full sequences."""
    rows = runner.state["row.sample"]
    input_ids = torch.cat([batch.input_ids[rows], fed], 1)
    mask = runner.attention_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = eager(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            pixel_values=batch.pixel_values[rows],
            output_attentions=True,
        )
    expected = renormalised_row(out.attentions[-1][:, :, -1].float())
    assert torch.allclose(runner.state[ROW_KEY], expected, atol=atol)
    return out.logits[:, -1].float()


def test_captured_row_matches_eager_through_reorder_crop_and_replay(lvlm, path):
    eager = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager")
    plan = lvlm.plan([{"name": "opera"}], GenerationParams())
    batch = build_rows(lvlm.processor, lvlm.info.image_token_id, plan, SAMPLES, "cpu")
    state = RowState.start(plan.views, 2, "cpu")
    runner = Runner(lvlm.model, batch, plan, state, lvlm.info.num_layers)
    runner.prefill()
    S = batch.input_ids.shape[1]
    runner.select_rows(torch.tensor([0, 0, 1, 1]))  # two beams per sample
    fed = torch.tensor([[7, 9], [8, 9], [10, 11], [12, 13]])
    logits = runner.forward(fed)[:, -1]
    assert torch.allclose(logits, eager_check(eager, runner, batch, fed), atol=1e-4)
    order = torch.tensor([1, 0, 3, 3])  # a beam reorder (with a duplicate)
    runner.select_rows(order)
    fed = torch.cat([fed[order], torch.tensor([[20], [21], [22], [23]])], 1)
    runner.forward(fed[:, -1:])
    eager_check(eager, runner, batch, fed)
    runner.crop(S)  # rollback: back to the prompt, replay rows of unequal length
    replay = torch.tensor([[5, 6, 7], [3, 3, 8], [3, 9, 9], [3, 3, 3]])
    mask = torch.tensor([[1, 1, 1], [0, 0, 1], [0, 1, 1], [0, 0, 0]])
    holes = (3 - mask.sum(-1))[:, None]
    runner.state["opera.hole"] = torch.cat([holes * 0 + S, S + holes], 1)
    runner.forward(replay, mask)
    logits = runner.forward(torch.tensor([[30], [31], [32], [33]]))[:, -1]
    fed = torch.cat([replay, torch.tensor([[30], [31], [32], [33]])], 1)
    assert torch.allclose(logits, eager_check(eager, runner, batch, fed), atol=1e-4)


# -- reductions ----------------------------------------------------------------------------


def test_full_candidate_set_without_penalty_is_beam_search(lvlm):
    V = lvlm.info.vocab_size
    spec = {"name": "opera", "num_beams": 3, "candidates": V, "penalty": 0.0, "threshold": 99}
    params = GenerationParams(max_new_tokens=6)
    opera = lvlm.generate(SAMPLES[:1], [spec], params)
    beam = lvlm.generate(SAMPLES[:1], params=GenerationParams(max_new_tokens=6, num_beams=3))
    assert ids(opera) == ids(beam)
    prompt = render_prompt(lvlm.processor, SAMPLES[0].text, 1)
    inputs = lvlm.processor(text=[prompt], images=[RED], return_tensors="pt")
    hf = lvlm.model.generate(**inputs, num_beams=3, max_new_tokens=6, do_sample=False)
    hf_ids = hf[0, inputs["input_ids"].shape[1] :].tolist()
    eos = lvlm.processor.tokenizer.eos_token_id
    assert opera[0].token_ids == (hf_ids[: hf_ids.index(eos)] if eos in hf_ids else hf_ids)


def test_one_candidate_is_greedy(lvlm):
    params = GenerationParams(max_new_tokens=14)
    greedy = ids(lvlm.generate(SAMPLES, params=params))
    one = {"name": "opera", "candidates": 1, "penalty": 3.0, "threshold": 99}
    assert ids(lvlm.generate(SAMPLES, [one], params)) == greedy
    single_beam = {"name": "opera", "num_beams": 1, "penalty": 0.0, "threshold": 99}
    assert ids(lvlm.generate(SAMPLES, [single_beam], params)) == greedy


# -- retrospection -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def together(lvlm):
    return run_recorded(lvlm, ROLLBACK, SAMPLES, 16)


def test_rollback_rules(together):
    tokens, state = together
    logs = [log for s in state.samples for log in s.rollbacks]
    assert logs, "the low threshold should trigger rollbacks"
    for s in state.samples:
        for log in s.rollbacks:
            assert log["to"] >= ROLLBACK["min_rollback_loc"]
            assert log["to"] < log["from"]
            assert not set(log["chosen"]) & set(map(tuple, log["banned"]))
        assert all(count <= 5 for count in s.rollback_count.values())  # β = C
    assert all(0 < len(row) <= 16 for row in tokens)


def test_no_rollback_within_ten_tokens(lvlm):
    _, state = run_recorded(lvlm, {"name": "opera", "threshold": 0}, SAMPLES, 10)
    assert not any(s.rollbacks for s in state.samples)


def test_batch_independence_with_rollback(lvlm, together):
    tokens, state = together
    for b, sample in enumerate(SAMPLES):
        alone, alone_state = run_recorded(lvlm, ROLLBACK, [sample], 16)
        assert alone[0] == tokens[b]
        assert alone_state.samples[0].rollbacks == state.samples[b].rollbacks
