"""CHAIR (Rohrbach et al., EMNLP 2018) as computed by OPERA's chair.py ("the reference").

    CHAIR_i = hallucinated mentions / COCO-object mentions   (micro, duplicates counted)
    CHAIR_s = captions with >= 1 hallucinated mention / captions
    Recall  = sum |distinct mentioned nodes & GT| / sum |GT|  (micro)
    Len     = mean number of units (tokens after double-word merging, punctuation included)

Overall metrics are reported x100 (Len as is), like the reference prints them.

Documented non-compat deviation: NLTK's tagger and WordNet data cannot be downloaded here, so
tokens are lemmatized as nouns with lemminflect instead (like the original CHAIR's POS-free
`singularize`); participles such as "skiing" or "tied" therefore never count as objects.
How captions become object mentions (tokenization, lemmas, double words, synonyms, the compat
mode and our documented deviations from the reference) is in chair_words.py.

Not reproduced: the pickle cache (ground truth can be restricted to the evaluated images
instead) and the misaligned debug index list after the toilet-seat rule.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from lvlm_fix.evals.chair_words import WordExtractor, drop_incomplete_sentence, load_synonyms


class ChairConfig(BaseModel):
    """CHAIR scoring options. Recorded with every result."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    compat: bool = Field(
        False, description="True keeps the reference's quirks (dead entries, bigram list)."
    )
    drop_incomplete_sentence: bool = Field(
        False,
        description="True drops text after the last sentence end (the 64-token setting); "
        "False scores captions as given.",
    )
    synonyms_path: str | None = Field(
        None, description="Synonym file in the reference format; None = the bundled table."
    )


def make_extractor(config: ChairConfig) -> WordExtractor:
    """The word extractor that `config` asks for."""
    return WordExtractor(load_synonyms(config.synonyms_path, compat=config.compat))


# --------------------------------------------------------------------------- ground truth


def _read_json(path: str | Path) -> dict:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "annotations" not in data:
        raise ValueError(f"{path}: not a COCO annotation file (no 'annotations' key)")
    return data


def load_ground_truth(
    extractor: WordExtractor,
    instances: Iterable[str | Path],
    captions: Iterable[str | Path] = (),
    image_ids: Iterable[int] | None = None,
) -> dict[int, frozenset[str]]:
    """GT(img): node words from COCO instance annotations, plus (optionally) the objects that
    the reference captions mention, run through the same word extraction.

    Images listed in an instances file without annotations get an empty set. `image_ids`
    restricts the work to the images being evaluated (the full train+val captions are ~600k).
    """
    keep = None if image_ids is None else set(image_ids)
    gt: dict[int, set[str]] = {}
    for path in instances:
        data = _read_json(path)
        names = {c["id"]: c["name"] for c in data.get("categories", [])}
        for img in data.get("images", []):
            if keep is None or img["id"] in keep:
                gt.setdefault(img["id"], set())
        for ann in data["annotations"]:
            if keep is not None and ann["image_id"] not in keep:
                continue
            name = names.get(ann["category_id"])
            if name not in extractor.synonyms.to_node:
                raise ValueError(f"{path}: category {name!r} is not in the synonym table")
            gt.setdefault(ann["image_id"], set()).add(extractor.synonyms.to_node[name])
    for path in captions:
        for ann in _read_json(path)["annotations"]:
            if keep is None or ann["image_id"] in keep:
                nodes = extractor.extract(ann["caption"]).nodes
                gt.setdefault(ann["image_id"], set()).update(nodes)
    return {img: frozenset(objs) for img, objs in gt.items()}


# --------------------------------------------------------------------------- scoring


class ChairCaption(BaseModel):
    """Per-caption details. chair_i here is informational; the headline is a ratio of sums."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_id: int
    caption: str = Field(description="The caption as scored (after truncation, if enabled).")
    words: list[str] = Field(description="Vocabulary units found, in order, duplicates kept.")
    node_words: list[str]
    hallucinated: list[tuple[str, str]] = Field(description="(word, node) pairs not in GT.")
    ground_truth: list[str]
    covered: list[str] = Field(description="Distinct mentioned node words that are in GT.")
    n_units: int
    chair_s: bool
    chair_i: float


class ChairSummary(BaseModel):
    """Overall metrics (x100 like the reference; length is the mean unit count) and counts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chair_s: float
    chair_i: float
    recall: float
    length: float
    n_captions: int
    n_mentions: int
    n_hallucinated: int
    n_hallucinated_captions: int
    n_gt: int
    n_covered: int
    config: ChairConfig


class ChairResult(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    summary: ChairSummary
    captions: list[ChairCaption]


def score_caption(
    image_id: int, caption: str, gt: frozenset[str], extractor: WordExtractor
) -> ChairCaption:
    objs = extractor.extract(caption)
    hallucinated = [(w, n) for w, n in zip(objs.words, objs.nodes, strict=True) if n not in gt]
    return ChairCaption(
        image_id=image_id,
        caption=caption,
        words=list(objs.words),
        node_words=list(objs.nodes),
        hallucinated=hallucinated,
        ground_truth=sorted(gt),
        covered=sorted(set(objs.nodes) & gt),
        n_units=len(objs.units),
        chair_s=bool(hallucinated),
        chair_i=len(hallucinated) / len(objs.words) if objs.words else 0.0,
    )


def evaluate_chair(
    captions: Sequence[tuple[int, str]],
    ground_truth: Mapping[int, Iterable[str]],
    extractor: WordExtractor,
    config: ChairConfig | None = None,
) -> ChairResult:
    """Score (image_id, caption) pairs against GT node-word sets."""
    config = config or ChairConfig(compat=extractor.synonyms.compat)
    if config.compat != extractor.synonyms.compat:
        raise ValueError("ChairConfig.compat differs from the extractor's synonym table mode")
    if not captions:
        raise ValueError("no captions to score")
    rows = []
    for image_id, caption in captions:
        if image_id not in ground_truth:
            raise ValueError(f"image_id {image_id} has no ground truth (wrong annotation file?)")
        if config.drop_incomplete_sentence:
            caption = drop_incomplete_sentence(caption)
        rows.append(score_caption(image_id, caption, frozenset(ground_truth[image_id]), extractor))
    n_mentions = sum(len(r.words) for r in rows)
    n_hall = sum(len(r.hallucinated) for r in rows)
    n_gt = sum(len(r.ground_truth) for r in rows)
    n_covered = sum(len(r.covered) for r in rows)
    n_hall_caps = sum(r.chair_s for r in rows)
    summary = ChairSummary(
        chair_s=100.0 * n_hall_caps / len(rows),
        chair_i=100.0 * n_hall / n_mentions if n_mentions else 0.0,
        recall=100.0 * n_covered / n_gt if n_gt else 0.0,
        length=sum(r.n_units for r in rows) / len(rows),
        n_captions=len(rows),
        n_mentions=n_mentions,
        n_hallucinated=n_hall,
        n_hallucinated_captions=n_hall_caps,
        n_gt=n_gt,
        n_covered=n_covered,
        config=config,
    )
    return ChairResult(summary=summary, captions=rows)


def load_captions(path: str | Path) -> list[tuple[int, str]]:
    """Read generated captions: JSONL (or a JSON array) of {"image_id": int, "caption": str}."""
    path = Path(path)
    text = path.read_text(encoding="utf-8").replace("\r", "")
    if text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = [json.loads(line) for line in text.split("\n") if line.strip()]
    out = []
    for rec in records:
        if not isinstance(rec, dict) or "image_id" not in rec or "caption" not in rec:
            raise ValueError(f"{path}: record {rec!r} needs 'image_id' and 'caption'")
        out.append((int(rec["image_id"]), str(rec["caption"])))
    return out
