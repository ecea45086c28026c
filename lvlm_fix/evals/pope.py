"""POPE (Li et al., EMNLP 2023): question files, prompt suffix, answer parsers and metrics.

The runner that drives a model calls into this file; nothing here touches a model.

* Question files come in two layouts (JSONL, or one JSON array). Both are accepted, `\\r` is
  stripped (some official files have CRLF endings) and labels map 'no' -> 0, anything else -> 1.
* Three incompatible answer parsers exist in the literature; all three are here, selected by name:
  "official" (POPE's evaluate.py, the default), "ritual" (RITUAL's recorder, with its one-
  prediction-per-line bug fixed by joining lines) and "vcd" (VCD's eval_pope.py, which is
  label-dependent: its substring test differs for yes- and no-labelled questions).
* Answers are joined to questions on `question_id`, never on order: the released files do not
  agree on the order of yes/no questions.
* `PopeSettings.protocol` switches to lmms-eval's or VLMEvalKit's prompt, reading and metric
  definitions (protocols.py); the suffix and parser options belong to the official protocol.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lvlm_fix.evals.protocols import (
    ProtocolName,
    count_columns,
    pope_rates,
    protocol_prompt,
    read_lmms_eval,
    read_vlmevalkit,
)

# Named prompt suffixes. "one_word" is what VCD appends (and the default here); "none" sends the
# bare question, as RITUAL's released script and OPERA-style setups do.
PROMPT_SUFFIXES: Mapping[str, str] = MappingProxyType(
    {"none": "", "one_word": " Please answer this question with one word."}
)
ParserName = Literal["official", "ritual", "vcd"]
PARSERS: tuple[str, ...] = ("official", "ritual", "vcd")


class PopeSettings(BaseModel):
    """How questions are asked and answers read. Recorded with every result."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    protocol: ProtocolName = Field(
        "official", description='"official", "lmms-eval" or "vlmevalkit" (protocols.py).'
    )
    prompt_suffix: str = Field(
        "one_word",
        description='Preset name from PROMPT_SUFFIXES; "none" sends the bare question.',
    )
    parser: ParserName = Field(
        "official", description='Answer parser: "official" (POPE), "ritual" or "vcd".'
    )

    @field_validator("prompt_suffix")
    @classmethod
    def _known_suffix(cls, name: str) -> str:
        if name not in PROMPT_SUFFIXES:
            choices = list(PROMPT_SUFFIXES)
            raise ValueError(f"unknown prompt_suffix {name!r}; choose one of {choices}")
        return name

    @model_validator(mode="after")
    def _official_options(self) -> PopeSettings:
        """lmms-eval and VLMEvalKit fix their own prompt and reading: no suffix/parser choice."""
        chosen = self.prompt_suffix != "one_word" or self.parser != "official"
        if self.protocol != "official" and chosen:
            raise ValueError(
                f"prompt_suffix and parser are options of the official protocol; protocol "
                f"{self.protocol!r} fixes its own prompt and answer reading"
            )
        return self

    @property
    def suffix_text(self) -> str:
        """The literal text after the question ("" for VLMEvalKit, which sends it bare)."""
        return protocol_prompt(self.protocol, "", PROMPT_SUFFIXES[self.prompt_suffix])

    def prompt(self, question_text: str) -> str:
        """The user turn sent to the model (the chat template is applied by the runner)."""
        return protocol_prompt(self.protocol, question_text, PROMPT_SUFFIXES[self.prompt_suffix])

    def read(self, answer: str, label: int) -> int:
        """1 (yes), 0 (no), or -1 (neither: only lmms-eval and VLMEvalKit have that case)."""
        if self.protocol == "lmms-eval":
            return read_lmms_eval(answer)
        if self.protocol == "vlmevalkit":
            return read_vlmevalkit(answer)
        return parse_answer(answer, self.parser, label)


class PopeQuestion(BaseModel):
    """One line of a POPE question file, label already mapped to 0/1."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    question_id: int
    image: str = Field(description="File name relative to the image root.")
    text: str = Field(description='The question, e.g. "Is there a dog in the image?".')
    label: int = Field(ge=0, le=1, description="1 = yes (object present), 0 = no.")


class PopePrediction(BaseModel):
    """One scored question: the question, the raw model answer and the parsed prediction."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    question_id: int
    image: str
    text: str
    label: int = Field(ge=0, le=1)
    answer: str
    pred: int = Field(ge=-1, le=1, description="1 yes, 0 no, -1 read as neither.")


class PopeMetrics(BaseModel):
    """Confusion counts and the derived rates (fractions in [0, 1]; yes is the positive class)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tp: int
    fp: int
    tn: int
    fn: int
    other: int = Field(0, description="Answers read as neither yes nor no (toolkit protocols).")
    n: int
    acc: float
    precision: float = Field(description="0 when nothing was predicted yes (TP+FP = 0).")
    recall: float = Field(description="0 when there are no yes labels (TP+FN = 0).")
    f1: float = Field(description="2TP/(2TP+FP+FN); 0 when that denominator is 0.")
    yes_ratio: float = Field(description="Share of yes answers; lmms-eval: of yes LABELS.")


class PopeSummary(BaseModel):
    """Metrics for one split together with the settings that produced them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    split: str = Field(description='e.g. "coco_random".')
    settings: PopeSettings
    suffix_text: str = Field(description="The literal suffix appended to every question.")
    metrics: PopeMetrics


# --------------------------------------------------------------------------- loading


def read_records(text: str, source: str) -> list[dict]:
    """Parse a JSON array or JSONL (one object per non-blank line)."""
    text = text.replace("\r", "")
    if text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = []
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{source}:{lineno}: not a JSON object ({err.msg})") from err
    if not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{source}: every record must be a JSON object")
    return records


def load_questions(path: str | Path) -> list[PopeQuestion]:
    """Read a POPE question file (JSONL or JSON array) in file order."""
    path = Path(path)
    questions, seen = [], set()
    for rec in read_records(path.read_text(encoding="utf-8"), str(path)):
        missing = {"question_id", "image", "text", "label"} - rec.keys()
        if missing:
            raise ValueError(f"{path}: record {rec!r} lacks {sorted(missing)}")
        qid = int(rec["question_id"])
        if qid in seen:
            raise ValueError(f"{path}: duplicate question_id {qid}")
        seen.add(qid)
        # RITUAL's loader rule: exactly 'no' is negative, anything else is positive.
        label = 0 if rec["label"] == "no" else 1
        questions.append(
            PopeQuestion(question_id=qid, image=rec["image"], text=rec["text"], label=label)
        )
    return questions


def load_answers(path: str | Path, field: str = "answer") -> dict[int, str]:
    """Read model answers keyed by question_id from JSONL / a JSON array.

    `field` names the answer key: "answer" in our predictions files, "text" in LLaVA-style
    answer files.
    """
    path = Path(path)
    answers: dict[int, str] = {}
    for rec in read_records(path.read_text(encoding="utf-8"), str(path)):
        if "question_id" not in rec or field not in rec:
            raise ValueError(f"{path}: record {rec!r} lacks 'question_id' or {field!r}")
        qid = int(rec["question_id"])
        if qid in answers:
            raise ValueError(f"{path}: duplicate question_id {qid}")
        answers[qid] = str(rec[field])
    return answers


# --------------------------------------------------------------------------- parsers


def parse_official(answer: str) -> int:
    """POPE evaluate.py: first sentence, no commas, split on ' ', case-sensitive negations."""
    if "." in answer:
        answer = answer.split(".")[0]
    words = answer.replace(",", "").split(" ")
    return 0 if any(w in ("No", "not", "no") for w in words) else 1


def parse_ritual(answer: str) -> int:
    """RITUAL's recorder, but over the whole answer.

    RITUAL emits one prediction per output line, which desynchronises predictions from labels on
    multi-line answers. We join the lines instead and warn, so one answer gives one prediction.
    """
    if "\n" in answer:
        warnings.warn(
            "RITUAL parser: multi-line answer joined into one line (the reference would emit "
            "one prediction per line)",
            stacklevel=2,
        )
        answer = " ".join(answer.split("\n"))
    words = answer.replace(".", "").replace(",", "").split(" ")
    negative = any(w in ("No", "not", "no", "NO") or w.endswith("n't") for w in words)
    return 0 if negative else 1


def parse_vcd(answer: str, label: int) -> int:
    """VCD eval_pope.py. Label-dependent substring tests, expressed as a prediction:

    label yes -> predicted yes iff 'yes' occurs; label no -> predicted no iff 'no' occurs
    ("not", "know", "nothing" all contain 'no').
    """
    answer = answer.lower().strip()
    if label == 1:
        return 1 if "yes" in answer else 0
    return 0 if "no" in answer else 1


def parse_answer(answer: str, parser: ParserName, label: int) -> int:
    """Map a raw answer to 1 (yes) / 0 (no) with the named parser.

    `label` is only read by "vcd", whose rule depends on it.
    """
    if parser == "official":
        return parse_official(answer)
    if parser == "ritual":
        return parse_ritual(answer)
    if parser == "vcd":
        return parse_vcd(answer, label)
    raise ValueError(f"unknown parser {parser!r}; choose one of {list(PARSERS)}")


# --------------------------------------------------------------------------- metrics


def pope_counts(labels: Sequence[int], preds: Sequence[int]) -> np.ndarray:
    """(N, 6) per-question count columns (protocols.COUNT_COLUMNS), for sums and resampling."""
    if len(labels) != len(preds):
        raise ValueError(f"{len(labels)} labels but {len(preds)} predictions")
    if not labels:
        raise ValueError("cannot compute POPE metrics over zero questions")
    if any(y not in (0, 1) for y in labels) or any(p not in (-1, 0, 1) for p in preds):
        raise ValueError("labels must be 0 or 1 and predictions 0, 1 or -1 (neither)")
    rows = [count_columns(y, p) for y, p in zip(labels, preds, strict=True)]
    return np.array(rows, dtype=np.int64)


def metrics_from_counts(counts: np.ndarray, protocol: ProtocolName = "official") -> PopeMetrics:
    """PopeMetrics from summed count columns (shape (6,)) under `protocol`'s definitions."""
    tp, fp, tn, fn, other_pos, other_neg = (int(c) for c in counts)
    rates = {name: float(value) for name, value in pope_rates(protocol, counts).items()}
    other = other_pos + other_neg
    return PopeMetrics(tp=tp, fp=fp, tn=tn, fn=fn, other=other, n=int(counts.sum()), **rates)


def pope_metrics(
    labels: Sequence[int], preds: Sequence[int], protocol: ProtocolName = "official"
) -> PopeMetrics:
    """Confusion counts and rates; yes (1) is the positive class, -1 = read as neither."""
    return metrics_from_counts(pope_counts(labels, preds).sum(axis=0), protocol)


def score(
    questions: Sequence[PopeQuestion],
    answers: Mapping[int, str],
    settings: PopeSettings | ParserName = "official",
) -> tuple[list[PopePrediction], PopeMetrics]:
    """Join answers to questions on question_id, read them and compute the metrics.

    `settings` may be just a parser name (the official protocol). Every question needs exactly
    one answer and every answer a question; otherwise ValueError.
    """
    if isinstance(settings, str):
        settings = PopeSettings(parser=settings)
    qids = {q.question_id for q in questions}
    if len(qids) != len(questions):
        raise ValueError("questions contain duplicate question_id values")
    missing = sorted(qids - answers.keys())
    extra = sorted(answers.keys() - qids)
    if missing or extra:
        raise ValueError(
            f"answers do not match questions: {len(missing)} missing (first {missing[:5]}), "
            f"{len(extra)} unknown (first {extra[:5]})"
        )
    rows = [
        PopePrediction(
            **q.model_dump(),
            answer=answers[q.question_id],
            pred=settings.read(answers[q.question_id], q.label),
        )
        for q in questions
    ]
    labels, preds = [r.label for r in rows], [r.pred for r in rows]
    return rows, pope_metrics(labels, preds, settings.protocol)


def summarize(
    split: str,
    questions: Sequence[PopeQuestion],
    answers: Mapping[int, str],
    settings: PopeSettings,
) -> tuple[list[PopePrediction], PopeSummary]:
    """`score` with the settings, packaged with the settings for metrics.json."""
    rows, metrics = score(questions, answers, settings)
    summary = PopeSummary(
        split=split, settings=settings, suffix_text=settings.suffix_text, metrics=metrics
    )
    return rows, summary
