"""POPE: loading, prompt suffix, the three answer parsers and the metrics (spec pope.md §2-4)."""

import json
import warnings

import pytest
from pydantic import ValidationError

from lvlm_fix.evals.pope import (
    PopeSettings,
    load_answers,
    load_questions,
    parse_answer,
    pope_metrics,
    score,
    summarize,
)

# The spec's worked example (§4): (label, answer, A official, B RITUAL, C VCD); 1 = yes.
WORKED = [
    ("yes", "Yes, there is a dog.", 1, 1, 1),
    ("no", "No, there is no car.", 0, 0, 0),
    ("yes", "No.", 0, 0, 0),
    ("no", "Yes", 1, 1, 1),
    ("yes", "yes", 1, 1, 1),
    ("no", "There is not a bus in the image.", 0, 0, 0),
    ("yes", "Yes. No wait.", 1, 0, 1),
    ("no", "NO", 1, 0, 0),
    ("no", "I don't think so", 1, 0, 1),
    ("yes", "Yes, I know.", 1, 1, 1),
]
# Hand-computed table: TP, FP, TN, FN, acc, precision, recall, F1, yes_ratio.
EXPECTED = {
    "official": (4, 3, 2, 1, 0.6, 4 / 7, 0.8, 8 / 12, 0.7),
    "ritual": (3, 1, 4, 2, 0.7, 0.75, 0.6, 6 / 9, 0.4),
    "vcd": (4, 2, 3, 1, 0.7, 2 / 3, 0.8, 8 / 11, 0.6),
}
COLUMN = {"official": 2, "ritual": 3, "vcd": 4}


def _write_worked_example(tmp_path):
    """Questions as CRLF JSONL (like the official popular/adversarial files), answers reversed."""
    qfile = tmp_path / "coco_pope_popular.json"
    lines = [
        json.dumps(
            {
                "question_id": i + 1,
                "image": f"COCO_val2014_{i:012d}.jpg",
                "label": label,
                "text": "Is there a dog in the image?",
            }
        )
        for i, (label, *_rest) in enumerate(WORKED)
    ]
    qfile.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    afile = tmp_path / "answers.jsonl"
    answers = [{"question_id": i + 1, "answer": row[1]} for i, row in enumerate(WORKED)]
    afile.write_text("\n".join(json.dumps(a) for a in reversed(answers)) + "\n")
    return qfile, afile


@pytest.mark.parametrize("parser", ["official", "ritual", "vcd"])
def test_worked_example(tmp_path, parser):
    qfile, afile = _write_worked_example(tmp_path)
    questions = load_questions(qfile)
    assert [q.label for q in questions] == [1 if row[0] == "yes" else 0 for row in WORKED]
    rows, m = score(questions, load_answers(afile), parser)
    assert [r.pred for r in rows] == [row[COLUMN[parser]] for row in WORKED]
    tp, fp, tn, fn, acc, prec, rec, f1, yes = EXPECTED[parser]
    assert (m.tp, m.fp, m.tn, m.fn, m.n) == (tp, fp, tn, fn, 10)
    assert m.acc == pytest.approx(acc)
    assert m.precision == pytest.approx(prec)
    assert m.recall == pytest.approx(rec)
    assert m.f1 == pytest.approx(f1)
    assert m.f1 == pytest.approx(2 * prec * rec / (prec + rec))
    assert m.yes_ratio == pytest.approx(yes)


def test_join_on_question_id_not_order(tmp_path):
    """Array layout (the SEEM files) with shuffled ids: answers must follow their ids."""
    qfile = tmp_path / "gqa_pope_seem_random.json"
    recs = [
        {"question_id": 7, "image": "2405722.jpg", "text": "Is there a car in the image?",
         "label": "no"},
        {"question_id": 3, "image": "2405722.jpg", "text": "Is there a tree in the image?",
         "label": "yes"},
    ]  # fmt: skip
    qfile.write_text(json.dumps(recs, indent=2))
    questions = load_questions(qfile)
    assert [(q.question_id, q.label) for q in questions] == [(7, 0), (3, 1)]
    rows, m = score(questions, {3: "Yes.", 7: "No, there is none."})
    assert [(r.question_id, r.pred) for r in rows] == [(7, 0), (3, 1)]
    assert m.acc == 1.0


def test_minimal_balanced_fixture():
    m = pope_metrics([1, 1, 0, 0], [1, 0, 1, 0])
    assert (m.tp, m.fp, m.tn, m.fn) == (1, 1, 1, 1)
    assert (m.acc, m.precision, m.recall, m.f1, m.yes_ratio) == (0.5, 0.5, 0.5, 0.5, 0.5)


def test_zero_division_guards():
    all_no = pope_metrics([1, 1, 0, 0], [0, 0, 0, 0])  # nothing predicted yes: TP+FP = 0
    assert (all_no.tp, all_no.fp, all_no.tn, all_no.fn) == (0, 0, 2, 2)
    assert (all_no.precision, all_no.recall, all_no.f1, all_no.yes_ratio) == (0.0, 0.0, 0.0, 0.0)
    assert all_no.acc == 0.5
    only_negatives = pope_metrics([0, 0], [0, 0])  # 2TP+FP+FN = 0 as well
    assert (only_negatives.acc, only_negatives.f1, only_negatives.recall) == (1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="zero questions"):
        pope_metrics([], [])
    with pytest.raises(ValueError, match="0 or 1"):
        pope_metrics([1], [2])


def test_parser_details():
    # Official: first sentence only, case-sensitive, empty strings and refusals count as yes.
    assert parse_answer("Not sure.", "official", 1) == 1
    assert parse_answer("", "official", 1) == 1
    assert parse_answer("There is no, dog", "official", 1) == 0
    # RITUAL: a multi-line answer is one prediction over the joined lines, with a warning.
    with pytest.warns(UserWarning, match="multi-line"):
        assert parse_answer("Yes\nNo", "ritual", 1) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parse_answer("Yes, it isn't hidden.", "ritual", 1) == 0
    # VCD: substring tests that depend on the label.
    assert parse_answer("Yes, no doubt", "vcd", 1) == 1
    assert parse_answer("Yes, no doubt", "vcd", 0) == 0
    assert parse_answer("Nothing", "vcd", 0) == 0
    with pytest.raises(ValueError, match="unknown parser"):
        parse_answer("Yes", "gpt", 1)


def test_settings_and_summary(tmp_path):
    default = PopeSettings()
    assert (default.prompt_suffix, default.parser) == ("one_word", "official")
    q = "Is there a dog in the image?"
    assert default.prompt(q) == q + " Please answer this question with one word."
    assert PopeSettings(prompt_suffix="none").prompt(q) == q
    with pytest.raises(ValidationError, match="unknown prompt_suffix"):
        PopeSettings(prompt_suffix="two_words")
    with pytest.raises(ValidationError):
        PopeSettings(parser="gpt")
    qfile, afile = _write_worked_example(tmp_path)
    settings = PopeSettings(parser="vcd", prompt_suffix="none")
    _, summary = summarize("coco_popular", load_questions(qfile), load_answers(afile), settings)
    assert summary.suffix_text == ""
    assert summary.metrics.f1 == pytest.approx(8 / 11)
    assert json.loads(summary.model_dump_json())["settings"]["parser"] == "vcd"


def test_bad_inputs(tmp_path):
    qfile, _ = _write_worked_example(tmp_path)
    questions = load_questions(qfile)
    answers = {i + 1: row[1] for i, row in enumerate(WORKED)}
    del answers[4]
    with pytest.raises(ValueError, match="1 missing"):
        score(questions, answers)
    with pytest.raises(ValueError, match="1 unknown"):
        score(questions, {**answers, 4: "Yes", 99: "No"})
    dup = tmp_path / "dup.json"
    dup.write_text('{"question_id": 1, "image": "a.jpg", "text": "t", "label": "yes"}\n' * 2)
    with pytest.raises(ValueError, match="duplicate question_id 1"):
        load_questions(dup)
    short = tmp_path / "short.json"
    short.write_text('{"question_id": 1, "image": "a.jpg", "text": "t"}\n')
    with pytest.raises(ValueError, match="lacks"):
        load_questions(short)
