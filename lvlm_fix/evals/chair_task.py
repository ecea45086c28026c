"""CHAIR for the runner: COCO instances (+ captions) -> EvalItems, captions -> CHAIR metrics.

The images are those listed in the instances files, in image-id order; `limit` keeps N of them,
chosen by a hash of the id. Ground truth is restricted to the chosen images.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lvlm_fix.evals.bootstrap import SampleSet
from lvlm_fix.evals.chair import (
    ChairCaption,
    ChairConfig,
    evaluate_chair,
    load_ground_truth,
    make_extractor,
    score_caption,
)
from lvlm_fix.evals.chair_words import WordExtractor, drop_incomplete_sentence
from lvlm_fix.evals.report import method_metrics
from lvlm_fix.evals.runner import EvalItem, TaskScore, check_keys, subset_order


def _chair_s(sums: np.ndarray) -> np.ndarray:
    return 100.0 * sums[..., 0] / sums[..., 3]


def _chair_i(sums: np.ndarray) -> np.ndarray:
    """Ratio of sums over mentions, 0 without mentions (as evaluate_chair)."""
    mentions = sums[..., 2]
    return np.where(mentions > 0, 100.0 * sums[..., 1] / np.where(mentions > 0, mentions, 1), 0.0)


def chair_sample_set(captions: list[ChairCaption]) -> SampleSet:
    """Per image: [hallucinated caption, hallucinated mentions, mentions, 1] for the bootstrap."""
    counts = np.array(
        [[c.chair_s, len(c.hallucinated), len(c.words), 1] for c in captions], dtype=float
    )
    return SampleSet("chair", counts, {"chair/chair_s": _chair_s, "chair/chair_i": _chair_i})


@dataclass(frozen=True)
class ChairTask:
    prompt: str
    chair: ChairConfig
    extractor: WordExtractor
    ground_truth: dict[int, frozenset[str]]
    items: list[EvalItem]
    sources: dict[str, list[str]]  # instances / captions files, recorded in the settings
    benchmark: str = "chair"

    def settings(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "chair": self.chair.model_dump(), **self.sources}

    def record(self, item: EvalItem, answer: str) -> dict[str, Any]:
        """The per-caption reading: object mentions (as nodes) and the hallucinated ones."""
        drop = self.chair.drop_incomplete_sentence
        caption = drop_incomplete_sentence(answer) if drop else answer
        gt = self.ground_truth[item.fields["image_id"]]
        scored = score_caption(item.fields["image_id"], caption, gt, self.extractor)
        return {"objects": scored.node_words, "hallucinated": [n for _, n in scored.hallucinated]}

    def score(self, lines: list[dict[str, Any]]) -> TaskScore:
        captions = [(ln["image_id"], ln["answer"]) for ln in lines]
        result = evaluate_chair(captions, self.ground_truth, self.extractor, self.chair)
        summary = result.summary
        samples = [chair_sample_set(result.captions)]
        return TaskScore(summary.model_dump(), method_metrics(chair=summary), samples)


def _coco_images(instances: Sequence[Path]) -> dict[int, str]:
    """image id -> file name, from the `images` lists of COCO instances files."""
    images: dict[int, str] = {}
    for path in instances:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or "images" not in data:
            raise ValueError(f"{path}: not a COCO instances file (no 'images' list)")
        for img in data["images"]:
            images[int(img["id"])] = str(img["file_name"])
    return images


def _existing(paths: Sequence[str | Path], what: str) -> list[Path]:
    out = [Path(p) for p in paths]
    for path in out:
        if not path.is_file():
            raise ValueError(f"{what} file {str(path)!r} does not exist")
    return out


def build_chair_task(
    instances: Sequence[str | Path],
    images: str | Path,
    prompt: str,
    config: ChairConfig,
    captions: Sequence[str | Path] = (),
    limit: int | None = None,
    keys: frozenset[str] | None = None,
) -> ChairTask:
    """Load annotations and pick the images; ValueError on missing files or images.

    `keys` (image ids as strings, from another run's subset.json) keeps exactly those images.
    """
    if not instances:
        raise ValueError("CHAIR needs at least one --instances file")
    if not prompt.strip():
        raise ValueError("the caption prompt is empty")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    instance_files = _existing(instances, "instances")
    caption_files = _existing(captions, "captions")
    if config.synonyms_path is not None:
        _existing([config.synonyms_path], "synonyms")
    image_root = Path(images)
    if not image_root.is_dir():
        raise ValueError(f"image folder {str(image_root)!r} does not exist")
    files = _coco_images(instance_files)
    ids = sorted(i for i in files if keys is None or str(i) in keys)
    if limit is not None:
        ids = sorted(sorted(ids, key=lambda i: subset_order(f"chair/{i}"))[:limit])
    extractor = make_extractor(config)
    gt = load_ground_truth(extractor, instance_files, caption_files, image_ids=ids)
    items = []
    for image_id in ids:
        path = image_root / files[image_id]
        if not path.is_file():
            raise ValueError(f"image {files[image_id]!r} not found in {str(image_root)!r}")
        fields = {"image_id": image_id, "image": files[image_id]}
        items.append(EvalItem(key=str(image_id), prompt=prompt, image=str(path), fields=fields))
    check_keys(keys, items)
    sources = {
        "instances": [p.name for p in instance_files],
        "captions": [p.name for p in caption_files],
    }
    return ChairTask(prompt, config, extractor, gt, items, sources)
