"""The core engine against transformers itself: same tokens, independent rows, clear errors."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import warnings
from typing import ClassVar

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from lvlm_fix import LVLM, Generation, GenerationParams, Sample
from lvlm_fix.methods import Contribution, Intervention
from lvlm_fix.model import render_prompt
from lvlm_fix.plan import PlanConflict, compile_plan
from lvlm_fix.tiny import build_tiny

QUESTIONS = ["describe this", "what color is the star in the picture on the left"]


@pytest.fixture(scope="module", params=["llava", "llava_next", "llava_onevision"])
def engines(request, tiny_paths):
    path = tiny_paths[request.param]
    reference = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa")
    return LVLM.from_pretrained(path), reference


def transformers_generate(lvlm: LVLM, reference, images, **kwargs) -> list[list[int]]:
    prompts = [render_prompt(lvlm.processor, q, 1) for q in QUESTIONS]
    inputs = lvlm.processor(images=images, text=prompts, return_tensors="pt", padding=True)
    out = reference.generate(**inputs, do_sample=False, **kwargs)
    eos, pad = lvlm.processor.tokenizer.eos_token_id, lvlm.processor.tokenizer.pad_token_id
    rows = out[:, inputs["input_ids"].shape[1] :].tolist()
    return [[t for t in row[: row.index(eos)] if t != pad] if eos in row else row for row in rows]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_same_tokens_as_transformers(engines, images, num_beams):
    lvlm, reference = engines
    samples = [Sample(q, (im,)) for q, im in zip(QUESTIONS, images, strict=True)]
    params = GenerationParams(max_new_tokens=10, num_beams=num_beams)
    ours = [g.token_ids for g in lvlm.generate(samples, params=params)]
    theirs = transformers_generate(lvlm, reference, images, max_new_tokens=10, num_beams=num_beams)
    assert ours == theirs


def test_rows_independent_of_batch_mates(engines, images):
    lvlm, _ = engines
    params = GenerationParams(max_new_tokens=8)
    together = lvlm.generate([(QUESTIONS[0], images[0]), (QUESTIONS[1], images[1])], params=params)
    alone = [
        lvlm.generate([(q, im)], params=params)[0] for q, im in zip(QUESTIONS, images, strict=True)
    ]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    # left padding really happened: the prompts differ in length
    assert together[0].prompt_tokens != together[1].prompt_tokens


def test_sampling_is_seeded_per_sample(tiny_llava_path, images):
    lvlm = LVLM.from_pretrained(tiny_llava_path)
    params = GenerationParams(max_new_tokens=12, do_sample=True, temperature=1.5, seed=7)
    first = lvlm.generate([Sample(QUESTIONS[0], (images[0],), seed=7)], params=params)
    batch = lvlm.generate(
        [Sample(QUESTIONS[1], (images[1],), seed=3), Sample(QUESTIONS[0], (images[0],), seed=7)],
        params=params,
    )
    assert batch[1].token_ids == first[0].token_ids
    other = lvlm.generate([Sample(QUESTIONS[0], (images[0],), seed=8)], params=params)
    assert other[0].token_ids != first[0].token_ids


def test_text_only_and_stream_match_generate(tiny_llava_path, images):
    lvlm = LVLM.from_pretrained(tiny_llava_path)
    params = GenerationParams(max_new_tokens=12)
    [text_only] = lvlm.generate([("hello there", None)], params=params)
    assert len(text_only.token_ids) > 0 and text_only.prompt_tokens > 0
    [full] = lvlm.generate([(QUESTIONS[0], images[0])], params=params)
    *pieces, final = lvlm.stream((QUESTIONS[0], images[0]), params=params)
    assert "".join(pieces) == full.text and final == full


def test_stop_strings_and_lengths(tiny_llava_path, images):
    lvlm = LVLM.from_pretrained(tiny_llava_path)
    [full] = lvlm.generate([(QUESTIONS[0], images[0])], params=GenerationParams(max_new_tokens=12))
    assert full.finish_reason == "length" and len(full.token_ids) == 12
    stop = full.text[len(full.text) // 2 :][:3]
    if stop.strip():
        params = GenerationParams(max_new_tokens=12, stop=(stop,))
        [cut] = lvlm.generate([(QUESTIONS[0], images[0])], params=params)
        assert stop not in cut.text and cut.finish_reason == "stop"


def streamed(lvlm: LVLM, sample, params: GenerationParams) -> tuple[list[str], Generation]:
    *pieces, final = lvlm.stream(sample, params=params)
    assert all(isinstance(piece, str) and piece for piece in pieces)
    assert "".join(pieces) == final.text, (pieces, final.text)
    for stop in params.stop:
        assert not any(stop in piece for piece in pieces) and stop not in final.text
    return pieces, final


def test_stream_pieces_add_up_to_the_final_text(tiny_llava_path, images):
    """Hot sampling on random weights gives stray bytes (split multi-byte characters, control
    characters, whitespace at either end); stop strings are cut from the generated text itself,
    so they really hit, and one begins in the text but never completes."""
    lvlm = LVLM.from_pretrained(tiny_llava_path)
    prompts = [(QUESTIONS[0], images[0]), ("hello there", None), (QUESTIONS[1], None)]
    texts = []
    for seed in range(12):
        sample = prompts[seed % len(prompts)]
        params = GenerationParams(max_new_tokens=10, do_sample=True, temperature=3.0, seed=seed)
        _, final = streamed(lvlm, sample, params)
        assert final.text == final.text.strip()
        texts.append(final.text)
        rng = random.Random(seed)
        starts = [i for i in range(1, len(final.text) - 2) if "\ufffd" not in final.text[i : i + 3]]
        if not starts:
            continue
        start = rng.choice(starts)
        stop = final.text[start : start + rng.randint(1, 3)]
        _, cut = streamed(lvlm, sample, params.model_copy(update={"stop": (stop,)}))
        assert cut.finish_reason == "stop" and final.text.startswith(cut.text)
        begun = final.text[start : start + 2] + "§¶"  # its start occurs, it never completes
        _, whole = streamed(lvlm, sample, params.model_copy(update={"stop": (begun,)}))
        assert whole.text == final.text
    assert any(not text.isascii() for text in texts)  # split multi-byte characters were met


@contextlib.contextmanager
def no_warnings(caplog):
    """Fail on any Python warning, and record what transformers' logger (which does not
    propagate to the root logger) says at WARNING or above."""
    logging.Logger.warning_once.cache_clear()  # transformers' once-per-process warnings
    logger = logging.getLogger("transformers")
    logger.addHandler(caplog.handler)
    try:
        with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
            warnings.simplefilter("error")
            yield
    finally:
        logger.removeHandler(caplog.handler)


def test_no_warnings_on_generate(tmp_path, images, caplog):
    """Our calls into transformers warn about nothing: not on wrapping a model, not on any
    generate or stream, with a tokenizer whose config asks for the space clean-up that
    transformers refuses (and warns about) on BPE tokenizers."""
    path = build_tiny("llava", tmp_path / "llava")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["clean_up_tokenization_spaces"] = True
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    sample = (QUESTIONS[0], images[0])
    greedy = GenerationParams(max_new_tokens=3, stop=("zz",))
    sampling = GenerationParams(max_new_tokens=3, do_sample=True, top_k=5, top_p=0.9, seed=1)
    with no_warnings(caplog):
        lvlm = LVLM(model, processor)
        lvlm.generate([sample], params=greedy)
        lvlm.generate([sample], params=GenerationParams(max_new_tokens=3, num_beams=2))
        lvlm.generate([sample], [{"name": "vhr"}, {"name": "pai"}], greedy)
        lvlm.generate([sample], [{"name": "ritual"}, {"name": "vcd"}], sampling)
        lvlm.generate([sample], [{"name": "fastv", "keep": 4}], greedy)
        lvlm.generate([sample], [{"name": "opera", "num_beams": 2, "candidates": 2}], greedy)
        list(lvlm.stream(sample, [{"name": "m3id"}], greedy))
    assert [record.getMessage() for record in caplog.records] == []


class _Views(Intervention):
    """A real intervention defined here: one identity view with weight `w` (0 = neutral)."""

    name: ClassVar[str] = "test_views"
    hooks: ClassVar[frozenset] = frozenset({"views"})
    conflicts: ClassVar[frozenset[str]] = frozenset({"test_other"})
    w: float = 0.0

    def is_neutral(self) -> bool:
        return self.w == 0

    def contribute(self, model) -> Contribution:
        from lvlm_fix.methods import View

        return Contribution(views=(View("same", weight=lambda t: self.w),), plausibility_beta=0.1)


class _Other(_Views):
    name: ClassVar[str] = "test_other"
    conflicts: ClassVar[frozenset[str]] = frozenset()


def test_views_identity_and_neutral(tiny_llava_path, images):
    lvlm = LVLM.from_pretrained(tiny_llava_path)
    params = GenerationParams(max_new_tokens=8)
    samples = [(QUESTIONS[0], images[0]), (QUESTIONS[1], images[1])]
    base = [g.token_ids for g in lvlm.generate(samples, params=params)]
    neutral = lvlm.generate(samples, [_Views(w=0.0)], params=params)
    assert [g.token_ids for g in neutral] == base
    # an identical view scales the logits by (1 + w): greedy is unchanged
    doubled = lvlm.generate(samples, [_Views(w=1.0)], params=params)
    assert [g.token_ids for g in doubled] == base
    assert doubled[0].config_id != neutral[0].config_id


def test_bad_inputs_give_clear_errors(tiny_llava_path, images):
    lvlm = LVLM.from_pretrained(tiny_llava_path)
    with pytest.raises(TypeError, match="PIL"):
        lvlm.generate([("q", "not an image")])
    with pytest.raises(ValueError, match="unknown intervention 'nope'"):
        lvlm.generate([("q", images[0])], [{"name": "nope"}])
    with pytest.raises(ValueError, match="no samples"):
        lvlm.generate([])
    with pytest.raises(ValueError, match="beam sampling"):
        GenerationParams(do_sample=True, num_beams=2)
    with pytest.raises(ValueError):
        GenerationParams(max_new_tokens=0)
    with pytest.raises(PlanConflict, match="'test_views' and 'test_other'"):
        compile_plan([_Views(w=1), _Other(w=1)], lvlm.info, GenerationParams())
    with pytest.raises(PlanConflict, match="listed twice"):
        compile_plan([_Views(w=1), _Views(w=2)], lvlm.info, GenerationParams())


def test_unsupported_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="unsupported model type 'gpt2'"):
        LVLM.from_pretrained(tmp_path)


def test_bundled_model_loads_offline():
    lvlm = LVLM.from_pretrained()
    assert lvlm.info.num_layers >= 1
    assert torch.is_tensor(next(lvlm.model.parameters()))


def test_search_without_view_support_refuses_view_methods(tiny_llava_path):
    lvlm = LVLM.from_pretrained(tiny_llava_path)
    with pytest.raises(PlanConflict, match="'opera' and 'vcd' cannot be combined"):
        lvlm.plan([{"name": "opera"}, {"name": "vcd"}])
    with pytest.raises(PlanConflict, match="do not also set num_beams"):
        lvlm.plan([{"name": "opera"}], GenerationParams(num_beams=3))
    lvlm.plan([{"name": "opera"}, {"name": "vhr"}, {"name": "pai"}])  # attention edits compose
