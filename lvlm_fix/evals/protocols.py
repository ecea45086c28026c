"""POPE scored the way each tool scores it: "official" (POPE's evaluate.py and its variants),
"lmms-eval" (lmms_eval/tasks/pope) and "vlmevalkit" (VLMEvalKit's ImageYORNDataset, POPE).

A protocol fixes three things: the prompt, how an answer is read (yes / no / neither) and how the
metrics follow from the counts. The two toolkits differ from POPE's own code on all three:

* lmms-eval appends "\\nAnswer the question using a single word or phrase." to the stripped
  question, reads an answer as yes/no only if it IS "yes"/"no" after lower() and strip(), counts
  anything else as wrong, leaves it out of recall, and reports as "yes_ratio" the share of YES
  LABELS (not of yes answers). Its `pope` task pools the three categories; `pope_random` etc.
  report one each.
* VLMEvalKit sends the bare question, removes punctuation its own way (`process_punctuation`),
  splits on whitespace and reads yes iff "yes" is a word and "no" is not (and the reverse);
  anything else is "Unknown": wrong for accuracy and a "no" for precision, recall and F1. Its
  headline ("Overall") is F1 over all categories pooled; it reports no yes ratio.

Counts are kept in six columns, so that the same rate formulas serve a single evaluation and
every bootstrap resample at once (arrays of shape (..., 6)):
    tp, fp, tn, fn           the answer was read as yes/no
    other_pos, other_neg     read as neither, for a yes / no label (always 0 for "official")
"""

from __future__ import annotations

import re
from typing import Literal

import numpy as np

ProtocolName = Literal["official", "lmms-eval", "vlmevalkit"]
PROTOCOLS: tuple[str, ...] = ("official", "lmms-eval", "vlmevalkit")
COUNT_COLUMNS = ("tp", "fp", "tn", "fn", "other_pos", "other_neg")
YES, NO, NEITHER = 1, 0, -1

LMMS_EVAL_SUFFIX = "\nAnswer the question using a single word or phrase."
# The toolkits' own generation budgets: lmms-eval's pope*.yaml, VLMEvalKit's LLaVA wrapper.
MAX_NEW_TOKENS = {"official": 16, "lmms-eval": 128, "vlmevalkit": 2048}
# Which protocols report a number pooled over all splits (see the module docstring).
POOLED_SPLIT = "overall"
REPORTS_POOLED = frozenset({"lmms-eval", "vlmevalkit"})


def protocol_prompt(protocol: ProtocolName, question: str, official_suffix: str) -> str:
    """The user turn: official = question + the chosen suffix; the toolkits fix their own."""
    if protocol == "lmms-eval":
        return question.strip() + LMMS_EVAL_SUFFIX
    if protocol == "vlmevalkit":
        return question
    return question + official_suffix


def read_lmms_eval(answer: str) -> int:
    """lmms-eval's pope_process_results: exact match after lower() and strip()."""
    text = answer.lower().strip()
    return YES if text == "yes" else NO if text == "no" else NEITHER


# VLMEvalKit's process_punctuation (vlmeval/smp/misc.py), rule for rule.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")  # fmt: skip
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_LONE_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def vlmevalkit_punctuation(text: str) -> str:
    """A mark next to a space (in the ORIGINAL text), or any mark once the text has a digit
    comma, is deleted; otherwise it becomes a space. Then periods not touching a digit go.

    VLMEvalKit passes re.UNICODE (= 32) where `sub` takes its count, so at most 32 periods are
    removed; we keep that.
    """
    out = text
    strip_all = _DIGIT_COMMA.search(text) is not None
    for mark in _PUNCTUATION:
        spaced = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if spaced or strip_all else " ")
    return _LONE_PERIOD.sub("", out, count=int(re.UNICODE))


def read_vlmevalkit(answer: str) -> int:
    """VLMEvalKit's YOrN_Extraction with exact matching (no judge model)."""
    words = vlmevalkit_punctuation(answer.lower()).split()
    if "yes" in words and "no" not in words:
        return YES
    if "no" in words and "yes" not in words:
        return NO
    return NEITHER


def count_columns(label: int, reading: int) -> list[int]:
    """One question's contribution to the six count columns (one of them is 1)."""
    if reading == NEITHER:
        column = "other_pos" if label == 1 else "other_neg"
    else:
        column = {(1, 1): "tp", (0, 1): "fp", (0, 0): "tn", (1, 0): "fn"}[(label, reading)]
    return [int(name == column) for name in COUNT_COLUMNS]


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (the toolkits' and our zero-division guard)."""
    return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def pope_rates(protocol: ProtocolName, counts: np.ndarray) -> dict[str, np.ndarray]:
    """acc, precision, recall, f1, yes_ratio (fractions) from counts of shape (..., 6)."""
    tp, fp, tn, fn, other_pos, other_neg = np.moveaxis(np.asarray(counts, dtype=float), -1, 0)
    n = tp + fp + tn + fn + other_pos + other_neg
    if protocol == "vlmevalkit":
        fn = fn + other_pos  # "Unknown" is a predicted no for precision/recall/F1
    # lmms-eval drops answers that are neither from recall: fn counts only an exact "no".
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    yes_ratio = _ratio(tp + fn + other_pos, n) if protocol == "lmms-eval" else _ratio(tp + fp, n)
    return {
        "acc": _ratio(tp + tn, n),  # neither-answers are wrong in every protocol
        "precision": precision,
        "recall": recall,
        # 2PR/(P+R), written as 2TP/(2TP+FP+FN): equal whenever TP > 0, and 0 otherwise.
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "yes_ratio": yes_ratio,
    }
