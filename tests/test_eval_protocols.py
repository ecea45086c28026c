"""POPE under the official, lmms-eval and VLMEvalKit protocols, read from each tool's own files."""

import argparse
import base64
import io
import json

import pytest
from conftest import make_image
from pydantic import ValidationError

from lvlm_fix.evals.cli import add_eval_args, eval_main
from lvlm_fix.evals.pope import PopeSettings, score
from lvlm_fix.evals.pope_sources import load_splits
from lvlm_fix.evals.pope_task import build_pope_task
from lvlm_fix.evals.protocols import read_lmms_eval, read_vlmevalkit, vlmevalkit_punctuation


def png_base64(color) -> str:
    buffer = io.BytesIO()
    make_image(color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# (question_id, label, answer) and how each protocol reads it: official / lmms-eval / VLMEvalKit
# (1 yes, 0 no, -1 neither).
ANSWERS = [
    (1, "yes", " Yes\n", 1, 1, 1),
    (2, "yes", "yes.", 1, -1, 1),  # lmms-eval: exact match only; VLMEvalKit drops the period
    (3, "yes", "No", 0, 0, 0),
    (4, "yes", "Yes, there is a dog.", 1, -1, 1),
    (5, "no", "no", 0, 0, 0),
    (6, "no", "Yes", 1, 1, 1),
    (7, "no", "No, there is not.", 0, -1, 0),
    (8, "no", "I am not sure. Yes or no?", 0, -1, -1),  # official: first sentence has "not"
    (9, "yes", "Yes", 1, 1, 1),
    (11, "yes", "Yes and no.", 0, -1, -1),  # official: "no" in the first sentence
]
# Hand-computed (6 yes labels, 4 no labels, N = 10):
# official:   TP 4 (1,2,4,9) FN 2 (3,11) FP 1 (6) TN 3 (5,7,8).  acc 7/10, P 4/5, R 4/6,
#             F1 = 2TP/(2TP+FP+FN) = 8/11, yes_ratio = predicted yes 5/10.
# lmms-eval:  TP 2 (1,9) FN 1 (3) FP 1 (6) TN 1 (5), neither 5 (2,4,11 | 7,8).  acc 3/10 (neither is
#             wrong), P 2/3, R = TP/(TP+FN) = 2/3 (neither left out), F1 2/3,
#             yes_ratio = yes LABELS 6/10.
# VLMEvalKit: TP 4 (1,2,4,9) FN 1 (3) FP 1 (6) TN 2 (5,7), Unknown 2 (11 | 8).  acc 6/10,
#             P 4/5, R = 4/(4+1+1) = 2/3 (Unknown counts as no), F1 = 8/11, yes_ratio 5/10.
EXPECTED = {  # tp, fp, tn, fn, other, acc, precision, recall, f1, yes_ratio
    "official": (4, 1, 3, 2, 0, 0.7, 4 / 5, 4 / 6, 8 / 11, 0.5),
    "lmms-eval": (2, 1, 1, 1, 5, 0.3, 2 / 3, 2 / 3, 2 / 3, 0.6),
    "vlmevalkit": (4, 1, 2, 1, 2, 0.6, 4 / 5, 2 / 3, 8 / 11, 0.5),
}
COLUMN = {"official": 3, "lmms-eval": 4, "vlmevalkit": 5}


@pytest.fixture
def lmms_eval_export(tmp_path):
    """lmms-lab/POPE saved as JSONL: string question_ids, image as {"bytes": base64}."""
    records = [
        {"id": str(i), "question_id": str(qid), "question": "Is there a dog in the image? ",
         "answer": label, "image_source": f"COCO_val2014_{qid:012d}",
         "image": {"bytes": png_base64((40 * (qid % 5), 90, 20)), "path": None},
         "category": "random"}
        for i, (qid, label, *_rest) in enumerate(ANSWERS)
    ]  # fmt: skip
    path = tmp_path / "pope_test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("protocol", ["official", "lmms-eval", "vlmevalkit"])
def test_protocol_metrics_by_hand(lmms_eval_export, tmp_path, protocol):
    splits = load_splits(lmms_eval_export, tmp_path / "images")
    [(split, questions)] = splits.items()
    assert split == "pope_test_random"
    assert [q.question_id for q in questions] == [row[0] for row in ANSWERS]
    assert [q.label for q in questions] == [int(row[1] == "yes") for row in ANSWERS]
    assert questions[0].image == "COCO_val2014_000000000001.png"
    assert (tmp_path / "images" / questions[0].image).read_bytes()[:4] == b"\x89PNG"
    rows, m = score(questions, {row[0]: row[2] for row in ANSWERS}, PopeSettings(protocol=protocol))
    assert [r.pred for r in rows] == [row[COLUMN[protocol]] for row in ANSWERS]
    tp, fp, tn, fn, other, acc, precision, recall, f1, yes_ratio = EXPECTED[protocol]
    assert (m.tp, m.fp, m.tn, m.fn, m.other, m.n) == (tp, fp, tn, fn, other, 10)
    assert (m.acc, m.precision, m.recall) == pytest.approx((acc, precision, recall))
    assert (m.f1, m.yes_ratio) == pytest.approx((f1, yes_ratio))


def test_prompts():
    question = " Is there a dog in the image? "
    lmms = PopeSettings(protocol="lmms-eval")
    assert lmms.prompt(question) == (
        "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    )
    assert PopeSettings(protocol="vlmevalkit").prompt(question) == question
    assert PopeSettings(protocol="vlmevalkit").suffix_text == ""
    assert PopeSettings().prompt("Q?") == "Q? Please answer this question with one word."
    with pytest.raises(ValidationError, match="options of the official protocol"):
        PopeSettings(protocol="lmms-eval", parser="vcd")


def test_readers():
    assert [read_lmms_eval(a) for a in ("YES ", "Yes.", "no", "No, it is not")] == [1, -1, 0, -1]
    # VLMEvalKit: a mark beside a space is deleted, elsewhere it becomes a space.
    assert vlmevalkit_punctuation("yes, it (is) a dog-cat.") == "yes it is a dog cat"
    assert read_vlmevalkit("Yes/No") == -1  # "/" -> " ": both words
    assert read_vlmevalkit("Answer: NO!") == 0
    assert read_vlmevalkit("I don't know") == -1
    assert read_vlmevalkit("3.5 yes") == 1  # a period between digits stays


def write_tsv(path):
    """VLMEvalKit's POPE.tsv layout: rows 2, 4 and 6 point at the image of rows 1, 3 and 5."""
    rows = [
        (1, png_base64((200, 20, 20)), "Is there a dog in the image?", "Yes", "random"),
        (2, "1", "Is there a cat in the image?", "No", "random,popular"),
        (3, png_base64((20, 20, 200)), "Is there a car in the image?", "Yes", "popular"),
        (4, "3", "Is there a bus in the image?", "No", "adversarial"),
        (5, png_base64((20, 200, 20)), "Is there a cup in the image?", "Yes", "adversarial"),
        (6, "5", "Is there a bird in the image?", "No", "popular,adversarial"),
    ]
    lines = ["index\timage\tquestion\tanswer\tcategory"]
    lines += ["\t".join(map(str, row)) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def test_vlmevalkit_tsv_loads(tmp_path):
    write_tsv(tmp_path / "POPE.tsv")
    splits = load_splits(tmp_path / "POPE.tsv", tmp_path / "images")
    ids = {split: [q.question_id for q in qs] for split, qs in splits.items()}
    assert ids == {"POPE_random": [1, 2], "POPE_popular": [2, 3, 6], "POPE_adversarial": [4, 5, 6]}
    random = splits["POPE_random"]
    assert [q.image for q in random] == ["pope_1.png", "pope_1.png"]  # shared, written once
    assert [(q.text, q.label) for q in random] == [
        ("Is there a dog in the image?", 1), ("Is there a cat in the image?", 0)
    ]  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "pope_1.png", "pope_3.png", "pope_5.png"
    ]  # fmt: skip
    assert load_splits(tmp_path / "POPE.tsv", tmp_path / "images") == splits  # rerun: same files


def test_vlmevalkit_scores_per_category_and_overall(tmp_path):
    """VLMEvalKit counts a question once per category and pools them all in "Overall"."""
    write_tsv(tmp_path / "POPE.tsv")
    settings = PopeSettings(protocol="vlmevalkit")
    task = build_pope_task([tmp_path / "POPE.tsv"], tmp_path / "images", settings)
    assert len(task.items) == 8 and task.items[0].prompt == "Is there a dog in the image?"
    answers = {1: "Yes.", 2: "No", 3: "I think so", 4: "Yes", 5: "yes", 6: "No."}
    lines = [{"split": it.fields["split"], "question_id": it.fields["question_id"],
              "answer": answers[it.fields["question_id"]]} for it in task.items]  # fmt: skip
    got = task.score(lines).details
    # random [1 TP, 2 TN]: all 1.   popular [2 TN, 3 Unknown(yes label), 6 TN]: acc 2/3, TP = 0
    # so P = R = F1 = 0.   adversarial [4 FP, 5 TP, 6 TN]: acc 2/3, P 1/2, R 1, F1 2/3.
    # overall, the 8 rows: TP 2, FP 1, TN 4, Unknown 1: acc 6/8, P 2/3, R 2/3, F1 4/6.
    expected = {
        "POPE_random": (1, 1, 1, 1),
        "POPE_popular": (2 / 3, 0, 0, 0),
        "POPE_adversarial": (2 / 3, 1 / 2, 1, 2 / 3),
        "overall": (0.75, 2 / 3, 2 / 3, 2 / 3),
    }
    assert list(got) == list(expected)
    for split, values in expected.items():
        m = got[split]
        assert (m["acc"], m["precision"], m["recall"], m["f1"]) == pytest.approx(values), split


def test_official_protocol_has_no_pooled_split(tmp_path):
    write_tsv(tmp_path / "POPE.tsv")
    task = build_pope_task([tmp_path / "POPE.tsv"], tmp_path / "images", PopeSettings())
    lines = [{"split": it.fields["split"], "question_id": it.fields["question_id"],
              "answer": "Yes"} for it in task.items]  # fmt: skip
    assert "overall" not in task.score(lines).details


def test_bad_sources(tmp_path):
    (tmp_path / "pope.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="pyarrow"):
        load_splits(tmp_path / "pope.parquet", tmp_path / "images")
    bad = tmp_path / "bad.tsv"
    bad.write_text("index\timage\tquestion\tanswer\n1\t7\tIs there a dog?\tYes\n")
    with pytest.raises(ValueError, match="holds no image"):
        load_splits(bad, tmp_path / "images")
    export = tmp_path / "lmms.json"
    export.write_text(json.dumps([{"question_id": "1", "question": "Q?", "answer": "maybe"}]))
    with pytest.raises(ValueError, match="neither yes nor no"):
        load_splits(export, tmp_path / "images")


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_eval_args(parser)
    return eval_main(parser.parse_args(argv))


def test_cli_rejects_official_options_with_another_protocol(tmp_path, capsys):
    write_tsv(tmp_path / "POPE.tsv")
    argv = ["pope", "--data", str(tmp_path / "POPE.tsv"), "--images", str(tmp_path / "im"),
            "--out", str(tmp_path / "out"), "--protocol", "lmms-eval",
            "--parser", "vcd"]  # fmt: skip
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert "--parser: options of --protocol official" in err and "lmms-eval" in err
