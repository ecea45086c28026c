"""Measure a checkpoint on the gym's POPE and CHAIR files with transformers' own greedy `generate`.

`python -m lvlm_fix.gym.quick_eval --model DIR --eval-dir DIR [--limit N] [--out metrics.json]`

A small stand-alone measuring script (plain transformers, no interventions): POPE accuracy,
precision, recall, F1 and yes-ratio per split (official POPE answer parsing), and CHAIR_i,
CHAIR_s and recall of captions against the scenes' ground truth and the gym's synonym list,
with which objects were hallucinated and how many of them are planted partners.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from lvlm_fix.gym.data import ONE_WORD_SUFFIX, prompt_text
from lvlm_fix.gym.make_eval import SPLITS
from lvlm_fix.gym.world import PAIRS


def says_no(answer: str) -> bool:
    """Official POPE parsing: first sentence, ',' removed, any word exactly No / not / no."""
    words = answer.split(".")[0].replace(",", "").split(" ")
    return any(w in ("No", "not", "no") for w in words)


def pope_metrics(labels: list[str], answers: list[str]) -> dict:
    """POPE's metrics with "yes" as the positive class (zero divisions give 0)."""
    pred_yes = [not says_no(a) for a in answers]
    gold_yes = [label != "no" for label in labels]
    tp = sum(p and g for p, g in zip(pred_yes, gold_yes, strict=True))
    fp = sum(p and not g for p, g in zip(pred_yes, gold_yes, strict=True))
    fn = sum(g and not p for p, g in zip(pred_yes, gold_yes, strict=True))
    tn = len(labels) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {
        "n": len(labels),
        "accuracy": (tp + tn) / len(labels),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(pred_yes) / len(labels),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def caption_objects(caption: str, word_to_node: dict[str, str]) -> list[str]:
    """Node words of every object mention in `caption` (duplicates kept). Plurals are undone
    naively ("cups" -> "cup", "boxes" -> "box"); the gym's words need nothing more (its
    captions use no plurals at all), unlike COCO's, for which CHAIR lemmatises with NLTK."""
    nodes = []
    for word in re.findall(r"[a-z]+", caption.lower()):
        forms = [
            word,
            word[:-1] if word.endswith("s") else "",
            word[:-2] if word.endswith("es") else "",
        ]
        node = next((word_to_node[f] for f in forms if f in word_to_node), None)
        if node is not None:
            nodes.append(node)
    return nodes


def chair_metrics(
    captions: dict[int, str], truth: dict[int, set[str]], word_to_node: dict[str, str]
) -> dict:
    """CHAIR_i (hallucinated / all mentions), CHAIR_s (captions with one), recall (covered GT
    objects / all GT objects), and how many hallucinations are the partner of a trigger that
    IS in the image: the planted prior at work."""
    mentions = hallucinated = hallucinated_caps = covered = gt_total = planted = 0
    which: Counter = Counter()
    for image_id, caption in captions.items():
        nodes, gt = caption_objects(caption, word_to_node), truth[image_id]
        bad = [n for n in nodes if n not in gt]
        mentions, hallucinated = mentions + len(nodes), hallucinated + len(bad)
        hallucinated_caps += bool(bad)
        covered, gt_total = covered + len(set(nodes) & gt), gt_total + len(gt)
        which.update(bad)
        planted += sum(1 for n in bad if any(PAIRS.get(t) == n for t in gt))
    return {
        "n": len(captions),
        "chair_i": hallucinated / max(1, mentions),
        "chair_s": hallucinated_caps / max(1, len(captions)),
        "recall": covered / gt_total,
        "mentions": mentions,
        "hallucinated": hallucinated,
        "planted_partner_share": planted / max(1, hallucinated),
        "hallucinated_objects": dict(which.most_common()),
    }


@torch.no_grad()
def generate(
    model, processor, images: list[Image.Image], questions: list[str], max_new_tokens: int
) -> list[str]:
    texts = [prompt_text(q) for q in questions]
    enc = processor(images=images, text=texts, padding=True, return_tensors="pt")
    enc = enc.to(model.device)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, enc.input_ids.shape[1] :]  # (B, T) the generated tokens only
    return [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]


def _batches(rows: list, size: int):
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def run_pope(
    model, processor, eval_dir: Path, split: str, limit: int | None, batch: int, suffix: str
) -> dict:
    rows = [json.loads(line) for line in (eval_dir / f"gym_pope_{split}.json").open()]
    rows = rows[:limit] if limit else rows
    answers = []
    for chunk in _batches(rows, batch):
        images = [Image.open(eval_dir / "images" / r["image"]).convert("RGB") for r in chunk]
        answers += generate(model, processor, images, [r["text"] + suffix for r in chunk], 4)
    metrics = pope_metrics([r["label"] for r in rows], answers)
    metrics["fp_on_planted_partners"] = planted_false_yes(rows, answers)
    return metrics


def planted_false_yes(rows: list[dict], answers: list[str]) -> int:
    """False "yes" answers about a planted partner whose trigger is a "yes" object of the same
    image: the prior at work (the object is the 4th word of POPE's question)."""
    present: dict[str, set[str]] = {}
    for r in rows:
        if r["label"] == "yes":
            present.setdefault(r["image"], set()).add(r["text"].split()[3])
    return sum(
        1
        for r, a in zip(rows, answers, strict=True)
        if r["label"] == "no"
        and not says_no(a)
        and any(PAIRS.get(t) == r["text"].split()[3] for t in present.get(r["image"], ()))
    )


def run_chair(
    model, processor, eval_dir: Path, limit: int | None, batch: int, max_new_tokens: int
) -> tuple[dict, dict[int, str]]:
    instances = json.loads((eval_dir / "instances_gym.json").read_text())
    names = {c["id"]: c["name"] for c in instances["categories"]}
    truth: dict[int, set[str]] = {im["id"]: set() for im in instances["images"]}
    for ann in instances["annotations"]:
        truth[ann["image_id"]].add(names[ann["category_id"]])
    word_to_node = {}
    for line in (eval_dir / "synonyms_gym.txt").read_text().splitlines():
        words = [w.strip() for w in line.split(", ") if w.strip()]
        word_to_node.update({w: words[0] for w in words})
    prompt = (eval_dir / "chair_prompt.txt").read_text().strip()
    images = instances["images"][:limit] if limit else instances["images"]
    captions = {}
    for chunk in _batches(images, batch):
        pics = [Image.open(eval_dir / "images" / im["file_name"]).convert("RGB") for im in chunk]
        outs = generate(model, processor, pics, [prompt] * len(chunk), max_new_tokens)
        captions.update({im["id"]: c for im, c in zip(chunk, outs, strict=True)})
    truth = {k: truth[k] for k in captions}
    return chair_metrics(captions, truth, word_to_node), captions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--eval-dir", required=True, type=Path, help="make_eval's OUT_DIR")
    parser.add_argument("--limit", type=int, default=None, help="first N questions / images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="caption budget")
    parser.add_argument("--no-suffix", action="store_true", help="bare POPE questions")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="metrics JSON to write")
    args = parser.parse_args(argv)
    start = time.time()
    processor = AutoProcessor.from_pretrained(args.model)
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    model = model.to(args.device).eval()
    suffix = "" if args.no_suffix else ONE_WORD_SUFFIX
    result: dict = {"model": str(args.model), "pope_suffix": suffix, "limit": args.limit}
    for split in SPLITS:
        result[f"pope_{split}"] = run_pope(
            model, processor, args.eval_dir, split, args.limit, args.batch_size, suffix
        )
        print(split, json.dumps(result[f"pope_{split}"]), flush=True)
    chair, captions = run_chair(
        model, processor, args.eval_dir, args.limit, args.batch_size, args.max_new_tokens
    )
    result["chair"] = chair
    result["caption_examples"] = dict(list(captions.items())[:8])
    result["seconds"] = round(time.time() - start, 1)
    print(json.dumps({k: v for k, v in result.items() if k != "caption_examples"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
