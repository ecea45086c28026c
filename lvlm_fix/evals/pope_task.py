"""POPE for the runner: question files -> EvalItems, answers -> predictions -> per-split metrics.

Several question files are several splits; a split is named after its file ("coco_pope_random.json"
-> "coco_pope_random"). `limit` keeps N questions per split, chosen by a hash of their key (not
file order, which groups questions by image), and then asked in file order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lvlm_fix.evals.pope import PopeQuestion, PopeSettings, load_questions, parse_answer, summarize
from lvlm_fix.evals.report import method_metrics
from lvlm_fix.evals.runner import EvalItem, check_keys, subset_order


def split_name(path: str | Path) -> str:
    name = Path(path).name
    for ext in (".jsonl", ".json"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


@dataclass(frozen=True)
class PopeTask:
    splits: dict[str, list[PopeQuestion]]
    image_root: Path
    pope: PopeSettings
    items: list[EvalItem]
    benchmark: str = "pope"

    def settings(self) -> dict[str, Any]:
        return {
            "prompt_suffix": self.pope.prompt_suffix,
            "suffix_text": self.pope.suffix_text,
            "parser": self.pope.parser,
            "splits": list(self.splits),
        }

    def record(self, item: EvalItem, answer: str) -> dict[str, Any]:
        return {"pred": parse_answer(answer, self.pope.parser, item.fields["label"])}

    def score(self, lines: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, float]]:
        """Metrics per split, recomputed from the raw answers with the current parser."""
        details, metrics = {}, {}
        for split, questions in self.splits.items():
            answers = {ln["question_id"]: ln["answer"] for ln in lines if ln["split"] == split}
            _, summary = summarize(split, questions, answers, self.pope)
            details[split] = summary.metrics.model_dump()
            metrics[split] = summary.metrics
        return details, method_metrics(pope=metrics)


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
    if not image_root.is_dir():
        raise ValueError(f"image folder {str(image_root)!r} does not exist")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    splits: dict[str, list[PopeQuestion]] = {}
    for path in data:
        if not Path(path).is_file():
            raise ValueError(f"POPE question file {str(path)!r} does not exist")
        name = split_name(path)
        if name in splits:
            raise ValueError(f"two question files give the same split name {name!r}")
        splits[name] = _subset(name, load_questions(path), limit, keys)
    if not splits:
        raise ValueError("POPE needs at least one --data question file")
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
