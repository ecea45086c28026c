"""vLLM's stop extras (stop_token_ids, ignore_eos, min_tokens) on both lanes of the engine and
on every search, against transformers where it has the same rule. On the bundled gym model: a
trained one, whose answers end with a real EOS ("No" to a question about a missing object)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from transformers import AutoModelForImageTextToText

from lvlm_fix import LVLM, GenerationParams, Sample
from lvlm_fix.decoding import combine_views
from lvlm_fix.generation import decode_text
from lvlm_fix.model import default_model_path, render_prompt

EXAMPLE = Path(__file__).resolve().parents[1] / "lvlm_fix" / "gym" / "data" / "example.png"
DESCRIBE = "Please describe this image in detail."  # a long answer
ASK = "Is there a cup in the image?"  # "No", then EOS
# Each lane as (interventions, params): shared batch plain and with views, own lanes.
LANES = {
    "shared": ([], {}),
    "shared vcd": ([{"name": "vcd"}], {}),
    "own fastv": ([{"name": "fastv", "layer": 1, "keep": 8}], {}),
    "own beams": ([], {"num_beams": 2}),
    "own opera": ([{"name": "opera", "num_beams": 2}], {}),
}
ONE_BEAM = ["shared", "shared vcd", "own fastv"]  # a token chosen is a token kept


@pytest.fixture(scope="module")
def lvlm():
    lvlm = LVLM.from_pretrained()
    yield lvlm
    lvlm.close()


@pytest.fixture(scope="module")
def image():
    return Image.open(EXAMPLE).convert("RGB")


def run(lvlm, image, question, lane, **params):
    interventions, extra = LANES[lane]
    sample = Sample(question, (image,))
    [out] = lvlm.generate([sample], interventions, GenerationParams(**extra, **params))
    return out


@pytest.fixture(scope="module")
def reference():
    return AutoModelForImageTextToText.from_pretrained(
        default_model_path(), attn_implementation="sdpa"
    )


@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize("question", [DESCRIBE, ASK])
def test_same_tokens_as_transformers_eos_list_and_min_new_tokens(
    lvlm, reference, image, question, num_beams
):
    """Stop ids end a sample as transformers' extra EOS ids do (for beams: a hypothesis), and
    min_tokens masks EOS and them as its min_new_tokens does (beams: after the log-softmax)."""
    prompt = render_prompt(lvlm.processor, question, 1)
    inputs = lvlm.processor(images=[image], text=[prompt], return_tensors="pt")
    eos = lvlm.processor.tokenizer.eos_token_id
    first, _, third = run(lvlm, image, DESCRIBE, "shared", max_new_tokens=3).token_ids
    cases = [
        ({"stop_token_ids": (third,)}, {"eos_token_id": [eos, third]}),
        ({"min_tokens": 3}, {"min_new_tokens": 3}),
        ({"stop_token_ids": (first,), "min_tokens": 4},
         {"eos_token_id": [eos, first], "min_new_tokens": 4}),
    ]  # fmt: skip
    for ours, theirs in cases:
        out = reference.generate(**inputs, do_sample=False, max_new_tokens=12,
                                 num_beams=num_beams, **theirs)  # fmt: skip
        row = out[0, inputs["input_ids"].shape[1] :].tolist()
        ending = set(theirs.get("eos_token_id", [eos]))
        end = next((i for i, token in enumerate(row) if token in ending), None)
        params = GenerationParams(max_new_tokens=12, num_beams=num_beams, **ours)
        [got] = lvlm.generate([Sample(question, (image,))], params=params)
        assert got.token_ids == row[:end], ours
        assert got.finish_reason == ("length" if end is None else "stop"), ours


@pytest.mark.parametrize("lane", ONE_BEAM)
def test_a_stop_token_ends_the_sample_before_it(lvlm, image, lane):
    full = run(lvlm, image, DESCRIBE, lane, max_new_tokens=12)
    third = full.token_ids[2]
    assert third not in full.token_ids[:2]
    cut = run(lvlm, image, DESCRIBE, lane, max_new_tokens=12, stop_token_ids=(third,))
    assert cut.token_ids == full.token_ids[:2] and cut.finish_reason == "stop"
    assert cut.text == decode_text(lvlm.processor.tokenizer, full.token_ids[:2]).strip()


@pytest.mark.parametrize("lane", LANES)
def test_a_stop_token_acts_as_eos(lvlm, image, lane):
    """EOS given as a stop id, with ignore_eos, ends samples exactly as EOS does: in beams
    too, where ended hypotheses compete with running ones."""
    eos = lvlm.processor.tokenizer.eos_token_id
    for question in (DESCRIBE, ASK):
        plain = run(lvlm, image, question, lane, max_new_tokens=30)
        as_stop = run(lvlm, image, question, lane, max_new_tokens=30, ignore_eos=True,
                      stop_token_ids=(eos,))  # fmt: skip
        assert as_stop == plain


@pytest.mark.parametrize("lane", LANES)
def test_min_tokens_holds_eos_and_stop_tokens_back(lvlm, image, lane):
    eos = lvlm.processor.tokenizer.eos_token_id
    short = run(lvlm, image, ASK, lane, max_new_tokens=8)
    assert short.finish_reason == "stop" and len(short.token_ids) < 3  # ended by EOS
    held = run(lvlm, image, ASK, lane, max_new_tokens=8, min_tokens=3)
    assert len(held.token_ids) >= 3 and eos not in held.token_ids
    first = run(lvlm, image, DESCRIBE, lane, max_new_tokens=8).token_ids[0]
    late = run(lvlm, image, DESCRIBE, lane, max_new_tokens=8, stop_token_ids=(first,),
               min_tokens=4)  # fmt: skip
    assert len(late.token_ids) >= 4 and first not in late.token_ids


@pytest.mark.parametrize("lane", LANES)
def test_ignore_eos_keeps_eos_as_a_token(lvlm, image, lane):
    eos = lvlm.processor.tokenizer.eos_token_id
    short = run(lvlm, image, ASK, lane, max_new_tokens=8)
    assert short.finish_reason == "stop" and len(short.token_ids) < 8
    going = run(lvlm, image, ASK, lane, max_new_tokens=8, ignore_eos=True)
    assert going.finish_reason == "length" and len(going.token_ids) == 8
    assert eos in going.token_ids
    assert going.text == decode_text(lvlm.processor.tokenizer, going.token_ids).strip()
    if lane in ONE_BEAM:  # the same tokens, EOS kept where it ended the sample
        assert going.token_ids[: len(short.token_ids) + 1] == [*short.token_ids, eos]


@pytest.mark.parametrize("lane", LANES)
def test_stop_strings_count_after_min_tokens(lvlm, image, lane):
    """vLLM's detokenizer rule: a stop string counts where it ends after the text of the first
    min_tokens tokens, so one inside them is kept and a later one cuts."""
    tokenizer = lvlm.processor.tokenizer
    ids = run(lvlm, image, DESCRIBE, lane, max_new_tokens=30).token_ids
    text = decode_text(tokenizer, ids)
    first = text.index(" is")
    second = text.index(" is", first + 1)
    # the fewest tokens whose text holds the first " is"
    k = next(n for n in range(1, 31) if len(decode_text(tokenizer, ids[:n])) >= first + 3)
    for min_tokens, cut in [(k - 1, first), (k, second)]:
        out = run(lvlm, image, DESCRIBE, lane, max_new_tokens=30, stop=(" is",),
                  min_tokens=min_tokens)  # fmt: skip
        assert out.text == text[:cut].strip() and out.finish_reason == "stop", min_tokens


@pytest.mark.parametrize("lane", ["shared", "own fastv"])
def test_streamed_pieces_add_up(lvlm, image, lane):
    interventions, _ = LANES[lane]
    full = run(lvlm, image, DESCRIBE, lane, max_new_tokens=30)
    for params in [
        GenerationParams(max_new_tokens=30, stop_token_ids=(full.token_ids[5],)),
        GenerationParams(max_new_tokens=30, stop=(" is",), min_tokens=5),
        GenerationParams(max_new_tokens=30, ignore_eos=True),
    ]:
        *pieces, final = lvlm.stream(Sample(DESCRIBE, (image,)), interventions, params)
        assert "".join(pieces) == final.text and final.text
        assert final == run(lvlm, image, DESCRIBE, lane, **params.model_dump())


@pytest.mark.parametrize("lane", ONE_BEAM)
def test_log_probs_are_from_the_scores_before_the_mask(lvlm, image, lane):
    """As vLLM's raw log-probs: the EOS that min_tokens held back still shows, the likeliest."""
    eos = lvlm.processor.tokenizer.eos_token_id
    out = run(lvlm, image, ASK, lane, max_new_tokens=4, min_tokens=3, logprobs=2)
    step = out.logprobs[1]  # where "No" would have ended
    assert step.top[0][0] == eos and out.token_ids[1] != eos
    assert step.logprob == step.top[1][1]  # greedy: the likeliest token it may pick


def test_requests_with_extras_beside_plain_ones_each_get_their_own_tokens(lvlm, image):
    """All at once in the engine, two samples a request: each sample's tokens are those it
    gets alone, whatever its batch-mates' stops and minimums."""
    eos = lvlm.processor.tokenizer.eos_token_id
    samples = [Sample(DESCRIBE, (image,)), Sample(ASK, (image,))]
    extras = [{}, {"stop_token_ids": (426, 478)}, {"min_tokens": 5}, {"ignore_eos": True},
              {"min_tokens": 3, "stop_token_ids": (eos, 19), "ignore_eos": True}]  # fmt: skip
    jobs = [
        (interventions, GenerationParams(max_new_tokens=10, **extra, **more))
        for interventions, more in LANES.values()
        for extra in extras
    ]
    alone = [[lvlm.generate([s], i, p)[0] for s in samples] for i, p in jobs]
    requests = [lvlm.submit(samples, i, p) for i, p in jobs]
    together = [request.result(timeout=600) for request in requests]
    assert together == alone
    assert len({tuple(g.token_ids) for gens in together for g in gens}) > 10  # they differ


def test_a_stop_string_in_an_own_lane_leaves_no_padding(lvlm, image):
    """A sample that a stop string ends while its batch-mate goes on keeps its tokens only."""
    samples = [Sample(DESCRIBE, (image,)), Sample("Is there a crab in the image?", (image,))]
    params = GenerationParams(max_new_tokens=8, stop=("Yes",))
    fastv = LANES["own fastv"][0]
    together = lvlm.generate(samples, fastv, params)
    assert together == [lvlm.generate([sample], fastv, params)[0] for sample in samples]
    assert together[1].finish_reason == "stop" and len(together[1].token_ids) == 1


def test_plausibility_cut_relative_to_what_min_tokens_allows(lvlm):
    """A view method's cut keeps tokens near the best one; with EOS dominating and held back by
    min_tokens, it keeps those near the best other token, so something remains to choose."""
    plan = lvlm.plan([{"name": "vcd"}])
    eos, vocab = lvlm.processor.tokenizer.eos_token_id, lvlm.info.vocab_size
    logits = torch.randn(plan.n_views, vocab, generator=torch.Generator().manual_seed(0))
    logits[0, eos] = 30.0
    alone = combine_views(logits, plan, 0, 1)[0, 0]
    assert torch.isfinite(alone).nonzero().flatten().tolist() == [eos]
    held = combine_views(logits, plan, 0, 1, held=(eos,))[0, 0]
    best_other = logits[0].clone()
    best_other[eos] = float("-inf")
    assert torch.isfinite(held[best_other.argmax()]) and torch.isfinite(held).sum() > 1


def test_params_are_validated(lvlm):
    with pytest.raises(ValidationError, match="min_tokens"):
        GenerationParams(max_new_tokens=4, min_tokens=5)
    with pytest.raises(ValidationError, match="stop_token_ids"):
        GenerationParams(stop_token_ids=(-1,))
    with pytest.raises(ValidationError, match="stop_token_ids"):
        GenerationParams(stop_token_ids=tuple(range(65)))
    vocab = lvlm.info.vocab_size
    with pytest.raises(ValueError, match=rf"stop_token_ids \[{vocab}\] are outside"):
        lvlm.plan([], GenerationParams(stop_token_ids=(5, vocab)))
