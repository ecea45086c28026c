"""POPE for the runner: question files -> EvalItems, answers -> predictions -> per-split metrics.

Question files give splits (pope_sources.py): a POPE file is one split named after it
("coco_pope_random.json" -> "coco_pope_random"); a VLMEvalKit TSV or an lmms-eval export gives one
per category. `limit` keeps N questions per split, chosen by a hash of their key (not file order,
which groups questions by image), and then asked in file order. Under the lmms-eval and
VLMEvalKit protocols an "overall" entry pools all splits, as those tools report it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lvlm_fix.evals.bootstrap import MetricFn, SampleSet
from lvlm_fix.evals.pope import (
    PopeMetrics,
    PopeQuestion,
    PopeSettings,
    metrics_from_counts,
    pope_counts,
    summarize,
)
from lvlm_fix.evals.pope_sources import load_splits
from lvlm_fix.evals.protocols import POOLED_SPLIT, REPORTS_POOLED, ProtocolName, pope_rates
from lvlm_fix.evals.report import method_metrics
from lvlm_fix.evals.runner import EvalItem, TaskScore, check_keys, subset_order

BOOTSTRAPPED = ("acc", "f1")  # the POPE metrics that get a difference-to-baseline interval


def _rate(protocol: ProtocolName, name: str) -> MetricFn:
    return lambda counts: pope_rates(protocol, counts)[name]


def _sample_set(split: str, counts: np.ndarray, protocol: ProtocolName) -> SampleSet:
    metrics = {f"pope/{split}/{name}": _rate(protocol, name) for name in BOOTSTRAPPED}
    return SampleSet(split, counts, metrics)


@dataclass(frozen=True)
class PopeTask:
    splits: dict[str, list[PopeQuestion]]
    image_root: Path
    pope: PopeSettings
    items: list[EvalItem]
    benchmark: str = "pope"

    def settings(self) -> dict[str, Any]:
        # Recorded only when not official, so that earlier run folders stay resumable.
        protocol = {} if self.pope.protocol == "official" else {"protocol": self.pope.protocol}
        return {
            **protocol,
            "prompt_suffix": self.pope.prompt_suffix,
            "suffix_text": self.pope.suffix_text,
            "parser": self.pope.parser,
            "splits": list(self.splits),
        }

    def record(self, item: EvalItem, answer: str) -> dict[str, Any]:
        return {"pred": self.pope.read(answer, item.fields["label"])}

    def score(self, lines: list[dict[str, Any]]) -> TaskScore:
        """Metrics per split, recomputed from the raw answers with the current settings."""
        metrics: dict[str, PopeMetrics] = {}
        samples = []
        for split, questions in self.splits.items():
            answers = {ln["question_id"]: ln["answer"] for ln in lines if ln["split"] == split}
            rows, summary = summarize(split, questions, answers, self.pope)
            metrics[split] = summary.metrics
            counts = pope_counts([r.label for r in rows], [r.pred for r in rows])
            samples.append(_sample_set(split, counts, self.pope.protocol))
        if self.pope.protocol in REPORTS_POOLED and len(self.splits) > 1:
            pooled = np.concatenate([s.counts for s in samples])
            metrics[POOLED_SPLIT] = metrics_from_counts(pooled.sum(axis=0), self.pope.protocol)
            samples.append(_sample_set(POOLED_SPLIT, pooled, self.pope.protocol))
        details = {split: m.model_dump() for split, m in metrics.items()}
        return TaskScore(details, method_metrics(pope=metrics), samples)


def _subset(
    split: str, questions: list[PopeQuestion], limit: int | None, keys: frozenset[str] | None
) -> list[PopeQuestion]:
    if keys is not None:
        questions = [q for q in questions if f"{split}/{q.question_id}" in keys]
    if limit is None or limit >= len(questions):
        return questions
    chosen = sorted(questions, key=lambda q: subset_order(f"{split}/{q.question_id}"))[:limit]
    keep = {q.question_id for q in chosen}
    return [q for q in questions if q.question_id in keep]


def build_pope_task(
    data: Sequence[str | Path],
    images: str | Path,
    settings: PopeSettings,
    limit: int | None = None,
    keys: frozenset[str] | None = None,
) -> PopeTask:
    """Load the question files; ValueError on missing files/images or repeated split names.

    `keys` (from another run's subset.json) keeps exactly those questions, `limit` N per split.
    """
    image_root = Path(images)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    splits: dict[str, list[PopeQuestion]] = {}
    for path in data:
        for name, questions in load_splits(path, image_root).items():
            if name == POOLED_SPLIT:
                raise ValueError(f"split name {name!r} is reserved for the pooled metrics")
            if name in splits:
                raise ValueError(f"two question files give the same split name {name!r}")
            splits[name] = _subset(name, questions, limit, keys)
    if not splits:
        raise ValueError("POPE needs at least one --data question file")
    if not image_root.is_dir():
        raise ValueError(f"image folder {str(image_root)!r} does not exist")
    items: list[EvalItem] = []
    for split, questions in splits.items():
        for q in questions:
            image = image_root / q.image
            if not image.is_file():
                raise ValueError(f"{split}: image {q.image!r} not found in {str(image_root)!r}")
            items.append(
                EvalItem(
                    key=f"{split}/{q.question_id}",
                    prompt=settings.prompt(q.text),
                    image=str(image),
                    fields={"split": split, **q.model_dump()},
                )
            )
    check_keys(keys, items)
    return PopeTask(splits, image_root, settings, items)
