"""POPE question sets in the files people already have, each read into {split: [PopeQuestion]}.

* POPE's own question files (JSONL or a JSON array of question_id, image, text, label): one
  split, named after the file ("coco_pope_random.json" -> "coco_pope_random").
* VLMEvalKit's POPE.tsv: columns index, image (a base64 image, or, to save space, the index of
  the row whose image it shares), question, answer ("Yes"/"No"), category ("random", or several
  joined by "," for a question that belongs to several), and optionally image_path. Splits are
  "<file stem>_<category>". A question in several categories is asked once per category, which is
  how VLMEvalKit counts it (its scorer splits the category field and counts the row in each).
* lmms-eval's POPE, i.e. the HF dataset lmms-lab/POPE saved as JSON or JSONL: columns id,
  question_id, question, answer ("yes"/"no"), image_source, category and image. The image is
  read as base64 (a string, or {"bytes": base64}); without one, the file named after
  image_source (with or without .jpg/.png) must be in the image folder. Parquet would need
  pyarrow, which lvlm_fix does not depend on; export to JSON/JSONL instead.

Embedded images are written once into the image folder (VLMEvalKit does the same with its
LMUData/images), so that the runner and its workers read plain files.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import sys
from pathlib import Path

from lvlm_fix.evals.pope import PopeQuestion, load_questions, read_records

# Rows of POPE.tsv hold whole base64 images; csv's default field limit (128 kB) is too small.
_TSV_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)
# VLMEvalKit's rule: an image field this short is the index of another row, not an image.
_MAX_REFERENCE_LEN = 64


def split_name(path: str | Path) -> str:
    """The file name without .jsonl/.json/.tsv."""
    name = Path(path).name
    for ext in (".jsonl", ".json", ".tsv"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _decode(data: str, where: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"{where}: the image is not valid base64 ({err})") from None


def store_image(data: bytes, stem: str, image_root: Path) -> str:
    """Write an embedded image as `<stem>.<format>` once; return its name in image_root."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            ext = (image.format or "img").lower()
    except UnidentifiedImageError:
        raise ValueError(f"image {stem!r}: the bytes are not an image") from None
    path = image_root / f"{stem}.{ext}"
    if not path.exists():
        path.write_bytes(data)
    elif path.read_bytes() != data:
        raise ValueError(f"{str(path)!r} exists with other content; use another --images folder")
    return path.name


def _label(answer: object, where: str) -> int:
    text = str(answer).strip().lower()
    if text not in ("yes", "no"):
        raise ValueError(f"{where}: answer {answer!r} is neither yes nor no")
    return int(text == "yes")


Splits = dict[str, dict[int, PopeQuestion]]  # split -> question_id -> question, file order


def _add(splits: Splits, split: str, question: PopeQuestion) -> None:
    questions = splits.setdefault(split, {})
    if question.question_id in questions:
        raise ValueError(f"{split}: duplicate question_id {question.question_id}")
    questions[question.question_id] = question


def _lists(splits: Splits) -> dict[str, list[PopeQuestion]]:
    return {split: list(questions.values()) for split, questions in splits.items()}


def _categories(value: object, stem: str) -> list[str]:
    names = [c.strip() for c in str(value or "").split(",") if c.strip()]
    return [f"{stem}_{c}" for c in names] or [stem]


def load_vlmevalkit_tsv(path: Path, image_root: Path) -> dict[str, list[PopeQuestion]]:
    """VLMEvalKit's POPE.tsv; images are written into image_root."""
    csv.field_size_limit(_TSV_FIELD_LIMIT)
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    missing = {"index", "image", "question", "answer"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"{path}: not a VLMEvalKit TSV, no column {sorted(missing)}")
    images = {row["index"]: row["image"] for row in rows}
    image_root.mkdir(parents=True, exist_ok=True)
    stored: dict[str, str] = {}  # index of the row holding the image -> file name
    splits: Splits = {}
    for row in rows:
        where = f"{path.name} index {row['index']}"
        owner = row["image"] if len(row["image"]) <= _MAX_REFERENCE_LEN else row["index"]
        if owner not in images or len(images[owner]) <= _MAX_REFERENCE_LEN:
            raise ValueError(f"{where}: image refers to {owner!r}, which holds no image")
        if owner not in stored:
            stem = Path(row.get("image_path") or f"pope_{owner}").stem
            stored[owner] = store_image(_decode(images[owner], where), stem, image_root)
        question = PopeQuestion(
            question_id=int(row["index"]),
            image=stored[owner],
            text=row["question"],
            label=_label(row["answer"], where),
        )
        for split in _categories(row.get("category"), split_name(path)):
            _add(splits, split, question)
    return _lists(splits)


def _lmms_eval_image(record: dict, where: str, image_root: Path) -> str:
    """The image file of one lmms-lab/POPE record: embedded bytes, or a file in image_root."""
    image = record.get("image")
    if isinstance(image, dict):
        image = image.get("bytes")
    source = str(record.get("image_source") or f"pope_{record['question_id']}")
    if image:
        return store_image(_decode(str(image), where), Path(source).name, image_root)
    for name in (source, f"{source}.jpg", f"{source}.png"):
        if (image_root / name).is_file():
            return name
    raise ValueError(f"{where}: no embedded image and no file {source!r} in {str(image_root)!r}")


def load_lmms_eval(
    records: list[dict], path: Path, image_root: Path
) -> dict[str, list[PopeQuestion]]:
    """lmms-lab/POPE rows (JSON/JSONL export), one split per category."""
    image_root.mkdir(parents=True, exist_ok=True)
    splits: Splits = {}
    for record in records:
        missing = {"question_id", "question", "answer"} - record.keys()
        if missing:
            raise ValueError(f"{path}: record lacks {sorted(missing)}")
        where = f"{path.name} question_id {record['question_id']}"
        label = _label(record["answer"], where)  # before any image is written
        question = PopeQuestion(
            question_id=int(record["question_id"]),
            image=_lmms_eval_image(record, where, image_root),
            text=str(record["question"]),
            label=label,
        )
        for split in _categories(record.get("category"), split_name(path)):
            _add(splits, split, question)
    return _lists(splits)


def load_splits(path: str | Path, image_root: str | Path) -> dict[str, list[PopeQuestion]]:
    """Read any supported POPE file (see the module docstring) into its splits."""
    path, image_root = Path(path), Path(image_root)
    if not path.is_file():
        raise ValueError(f"POPE question file {str(path)!r} does not exist")
    if path.suffix == ".parquet":
        raise ValueError(
            f"{path}: reading parquet needs pyarrow, which lvlm_fix does not depend on; save "
            "the dataset as JSON/JSONL (images as base64) and pass that file"
        )
    if path.suffix == ".tsv":
        return load_vlmevalkit_tsv(path, image_root)
    records = read_records(path.read_text(encoding="utf-8"), str(path))
    if records and {"question", "answer"} <= records[0].keys():
        return load_lmms_eval(records, path, image_root)
    return {split_name(path): load_questions(path)}
