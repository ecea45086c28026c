"""Write the gym's evaluation files in the real benchmarks' formats.

`python -m lvlm_fix.gym.make_eval OUT_DIR [--seed 0] [--no-images]` writes:
- `images/`: the PNGs of 500 POPE and 500 CHAIR held-out scenes (regenerated, never committed),
- `gym_pope_{random,popular,adversarial}.json`: POPE JSONL (question_id, image, text, label),
  built by POPE's own protocol from the scenes' ground truth,
- `instances_gym.json` (COCO-format instances), `synonyms_gym.txt` (CHAIR's synonym format) and
  `chair_prompt.txt` for CHAIR, and `manifest.json` describing all of it.
Held-out scenes are probe scenes (see world.py): triggers first, partners often missing.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from lvlm_fix.gym.data import CAPTION_PROMPT, ONE_WORD_SUFFIX, POPE_TEMPLATE, with_article
from lvlm_fix.gym.world import (
    CANVAS,
    CATEGORIES,
    PAIRS,
    Scene,
    WorldConfig,
    render,
    sample_probe_scene,
    scene_rng,
)

SPLITS = ("random", "popular", "adversarial")
N_IMAGES = 500  # POPE's --img_num and CHAIR's usual image count
POPE_POOL = 600  # candidate scenes POPE samples its 500 from
POPE_PARTNER_RATE = 0.5  # a POPE scene keeps each trigger's partner half the time
CHAIR_PARTNER_RATE = 0.2  # a CHAIR scene keeps it a fifth of the time


def pope_scenes(seed: int) -> list[tuple[str, Scene]]:
    """(file name, scene) of the 500 POPE images: POPE keeps images with >= 3 objects and
    `random.sample`s 500 of them."""
    pool = [
        sample_probe_scene(scene_rng(seed, "pope", i), 2, POPE_PARTNER_RATE)
        for i in range(POPE_POOL)
    ]
    eligible = [i for i, s in enumerate(pool) if len(s.objects) >= 3]
    chosen = random.Random(f"lvlm_fix.gym/{seed}/pope-select").sample(eligible, N_IMAGES)
    return [(f"gym_pope_{i:06d}.png", pool[i]) for i in chosen]


def chair_scenes(seed: int) -> list[tuple[int, str, Scene]]:
    """(image id, file name, scene) of the 500 CHAIR images (one or two triggers each)."""
    out = []
    for image_id in range(1, N_IMAGES + 1):
        rng = scene_rng(seed, "chair", image_id)
        scene = sample_probe_scene(rng, rng.choice((1, 2)), CHAIR_PARTNER_RATE)
        out.append((image_id, f"gym_chair_{image_id:06d}.png", scene))
    return out


def _negative(
    split: str, pos: str, objects: list[str], history: list[str], stats: dict, rng: random.Random
) -> str:
    """One negative for positive `pos`, by POPE's rule for `split`."""
    valid = [o for o in stats["all"] if o not in objects and o not in history]
    if split == "popular":
        ranked = stats["popular"]
    elif split == "adversarial":
        ranked = stats["co_occur"].get(pos, [])
    else:
        ranked = []
    for candidate in ranked:
        if candidate in valid:
            return candidate
    while True:  # random split, and POPE's fallback when no ranked candidate is valid
        candidate = rng.choice(stats["all"])
        if candidate not in objects and candidate not in history:
            return candidate


def pope_statistics(records: list[tuple[str, list[str]]]) -> dict:
    """POPE's statistics over the selected images only: frequency ranking and, per object,
    the other objects ranked by how many images hold both (ties broken by name)."""
    freq = Counter(o for _, objects in records for o in set(objects))
    pairs = Counter((a, b) for _, objs in records for a in objs for b in objs if a != b)
    co_occur: dict[str, list[str]] = {}
    for a, b in pairs:
        co_occur.setdefault(a, []).append(b)
    for a, partners in co_occur.items():
        partners.sort(key=lambda b: (-pairs[(a, b)], b))
    return {
        "all": sorted(freq),
        "popular": sorted(freq, key=lambda o: (-freq[o], o)),
        "co_occur": co_occur,
    }


def build_pope(records: list[tuple[str, list[str]]], split: str, seed: int) -> list[dict]:
    """POPE questions for `records` = [(image, objects in annotation order)]: per image the first
    three objects as "yes", each followed by one "no" chosen by `split`'s rule."""
    if split not in SPLITS:
        raise ValueError(f"unknown POPE split {split!r}; expected one of {SPLITS}")
    stats = pope_statistics(records)
    rng = random.Random(f"lvlm_fix.gym/{seed}/pope-{split}")
    questions = []
    for image, objects in records:
        if len(objects) < 3:
            raise ValueError(f"{image}: POPE needs at least 3 objects, got {objects}")
        history: list[str] = []
        for pos in objects[:3]:
            history.append(pos)
            neg = _negative(split, pos, objects, history, stats, rng)
            history.append(neg)
            for name, label in ((pos, "yes"), (neg, "no")):
                text = POPE_TEMPLATE.format(with_article(name))
                questions.append(
                    {
                        "question_id": len(questions) + 1,
                        "image": image,
                        "text": text,
                        "label": label,
                    }
                )
    return questions


def coco_instances(scenes: list[tuple[int, str, Scene]]) -> dict:
    """COCO-format instances: categories, images, annotations (bbox = [x, y, w, h])."""
    cat_id = {c.name: i + 1 for i, c in enumerate(CATEGORIES)}
    images, annotations = [], []
    for image_id, file_name, scene in scenes:
        images.append({"id": image_id, "file_name": file_name, "width": CANVAS, "height": CANVAS})
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.bbox
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat_id[obj.category],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                    "attributes": {"color": obj.color, "attached": obj.attached},
                }
            )
    categories = [
        {"id": cat_id[c.name], "name": c.name, "supercategory": c.context} for c in CATEGORIES
    ]
    return {
        "info": {"description": "lvlm_fix gym CHAIR set"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def synonyms_text() -> str:
    """CHAIR's synonym file: one line per category, node word first, ', ' separated."""
    return "".join(", ".join((c.name, *c.synonyms)) + "\n" for c in CATEGORIES)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def write_eval(out: Path, seed: int, images: bool = True) -> dict:
    """Write every evaluation file for `seed` under `out`; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    pope = pope_scenes(seed)
    chair = chair_scenes(seed)
    records = [(name, scene.names) for name, scene in pope]
    for split in SPLITS:
        (out / f"gym_pope_{split}.json").write_text(_jsonl(build_pope(records, split, seed)))
    (out / "instances_gym.json").write_text(json.dumps(coco_instances(chair)))
    (out / "synonyms_gym.txt").write_text(synonyms_text())
    (out / "chair_prompt.txt").write_text(CAPTION_PROMPT + "\n")
    if images:
        (out / "images").mkdir(exist_ok=True)
        for name, scene in [*pope, *((n, s) for _, n, s in chair)]:
            render(scene).save(out / "images" / name)
    manifest = {
        "seed": seed,
        "image_root": "images",
        "canvas": CANVAS,
        "pope_files": {s: f"gym_pope_{s}.json" for s in SPLITS},
        "pope_template": POPE_TEMPLATE,
        "pope_suffix": ONE_WORD_SUFFIX,
        "chair_instances": "instances_gym.json",
        "chair_synonyms": "synonyms_gym.txt",
        "chair_prompt": CAPTION_PROMPT,
        "n_images": {"pope": len(pope), "chair": len(chair)},
        "planted_pairs": PAIRS,
        "partner_rate": {"pope": POPE_PARTNER_RATE, "chair": CHAIR_PARTNER_RATE},
        "world": asdict(WorldConfig()),
        "command": f"python -m lvlm_fix.gym.make_eval OUT_DIR --seed {seed}",
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the gym's POPE and CHAIR files.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-images", action="store_true", help="manifests only")
    args = parser.parse_args(argv)
    write_eval(args.out_dir, args.seed, images=not args.no_images)


if __name__ == "__main__":
    main()
