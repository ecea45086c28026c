"""The gym: deterministic world, POPE/CHAIR files by protocol, training tensors, shipped model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lvlm_fix.gym import make_eval
from lvlm_fix.gym.data import (
    CAPTION_PROMPT,
    caption,
    category_frequencies,
    make_example,
    prompt_text,
    train_text,
)
from lvlm_fix.gym.model import GymModelConfig, build_processor
from lvlm_fix.gym.quick_eval import caption_objects, planted_false_yes, pope_metrics
from lvlm_fix.gym.world import (
    CANVAS,
    CATEGORIES,
    NAMES,
    PAIRS,
    render,
    sample_probe_scene,
    sample_train_scene,
    scene_rng,
)
from lvlm_fix.tiny import train_tokenizer

GYM = Path(__file__).resolve().parents[1] / "lvlm_fix" / "gym"
WORD_TO_NODE = {w: c.name for c in CATEGORIES for w in (c.name, *c.synonyms)}


@pytest.fixture(scope="module")
def pope_records() -> list[tuple[str, list[str]]]:
    return [(name, scene.names) for name, scene in make_eval.pope_scenes(0)]


def test_world_is_a_function_of_the_seed():
    a = sample_train_scene(scene_rng(0, "train", 7))
    b = sample_train_scene(scene_rng(0, "train", 7))
    c = sample_train_scene(scene_rng(1, "train", 7))
    assert a == b and a != c
    image = np.asarray(render(a))
    assert image.shape == (CANVAS, CANVAS, 3)
    assert np.array_equal(image, np.asarray(render(b)))
    for obj in a.objects:
        x0, y0, x1, y1 = obj.bbox
        assert 0 <= x0 < x1 <= CANVAS and 0 <= y0 < y1 <= CANVAS


def test_training_scenes_plant_the_pairs_and_probes_break_them():
    train = [sample_train_scene(scene_rng(0, "train", i)).names for i in range(600)]
    probe = [sample_probe_scene(scene_rng(0, "probe", i), 1, 0.2).names for i in range(600)]
    for trigger, partner in PAIRS.items():
        with_t = [names for names in train if trigger in names]
        assert sum(partner in n for n in with_t) / len(with_t) > 0.85, trigger
    kept = [PAIRS[n[0]] in n for n in probe]
    assert 0.1 < sum(kept) / len(kept) < 0.3


def test_pope_files_follow_the_protocol(pope_records):
    objects = dict(pope_records)
    stats = make_eval.pope_statistics(pope_records)
    for trigger, partner in PAIRS.items():  # the planted partner is each trigger's top co-occurrer
        assert stats["co_occur"][trigger][0] == partner
    for split in make_eval.SPLITS:
        qs = make_eval.build_pope(pope_records, split, seed=0)
        assert [q["question_id"] for q in qs] == list(range(1, 3001))
        assert set(qs[0]) == {"question_id", "image", "text", "label"}
        for i in range(0, 3000, 6):
            block = qs[i : i + 6]
            image = block[0]["image"]
            assert {q["image"] for q in block} == {image}
            asked = [q["text"].split()[3] for q in block]
            assert [q["label"] for q in block] == ["yes", "no"] * 3
            assert asked[0::2] == objects[image][:3]
            assert not set(asked[1::2]) & set(objects[image]) and len(set(asked)) == 6
            if split == "adversarial":
                for pos, neg in zip(asked[0::2], asked[1::2], strict=True):
                    partner = PAIRS.get(pos)
                    if (
                        partner
                        and partner not in objects[image]
                        and partner not in asked[: 2 * asked.index(pos) + 1]
                    ):
                        assert neg == partner
        assert qs[1]["text"].startswith("Is there a") and qs[1]["text"].endswith(" in the image?")


def test_committed_manifests_regenerate_exactly(tmp_path):
    manifest = make_eval.write_eval(tmp_path, seed=0, images=False)
    for name in [
        *manifest["pope_files"].values(),
        "instances_gym.json",
        "synonyms_gym.txt",
        "chair_prompt.txt",
        "manifest.json",
    ]:
        assert (tmp_path / name).read_bytes() == (GYM / "data" / name).read_bytes(), name


def test_chair_files_match_the_scenes():
    scenes = make_eval.chair_scenes(0)
    instances = json.loads((GYM / "data" / "instances_gym.json").read_text())
    names = {c["id"]: c["name"] for c in instances["categories"]}
    assert sorted(names.values()) == sorted(NAMES)
    assert [im["id"] for im in instances["images"]] == [s[0] for s in scenes]
    per_image: dict[int, list[str]] = {}
    for ann in instances["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(names[ann["category_id"]])
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and x + w <= CANVAS and y + h <= CANVAS
    for image_id, file_name, scene in scenes:
        assert per_image[image_id] == scene.names and file_name.endswith(".png")
    lines = (GYM / "data" / "synonyms_gym.txt").read_text().splitlines()
    words = [w for line in lines for w in line.split(", ")]
    assert len(lines) == len(NAMES) and len(words) == len(set(words))
    assert [line.split(", ")[0] for line in lines] == list(NAMES)
    assert (GYM / "data" / "chair_prompt.txt").read_text().strip() == CAPTION_PROMPT


def test_captions_name_every_object_and_pope_metrics():
    for i in range(50):
        rng = scene_rng(0, "caption-test", i)
        scene = sample_train_scene(rng)
        mentioned = caption_objects(caption(scene, rng), WORD_TO_NODE)
        assert sorted(mentioned) == sorted(scene.names)
    # specs/pope.md §4, official rule: TP 4, FP 3, TN 2, FN 1.
    labels = ["yes", "no", "yes", "no", "yes", "no", "yes", "no", "no", "yes"]
    answers = [
        "Yes, there is a dog.",
        "No, there is no car.",
        "No.",
        "Yes",
        "yes",
        "There is not a bus in the image.",
        "Yes. No wait.",
        "NO",
        "I don't think so",
        "Yes, I know.",
    ]
    m = pope_metrics(labels, answers)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (4, 3, 2, 1)
    assert m["accuracy"] == pytest.approx(0.6) and m["f1"] == pytest.approx(8 / 12)
    rows = [
        {"image": "a.png", "text": "Is there a cup in the image?", "label": "yes"},
        {"image": "a.png", "text": "Is there a saucer in the image?", "label": "no"},
        {"image": "a.png", "text": "Is there a fork in the image?", "label": "no"},
        {"image": "b.png", "text": "Is there a saucer in the image?", "label": "no"},
    ]
    assert planted_false_yes(rows, ["Yes", "Yes", "Yes", "Yes"]) == 1  # only a.png's saucer


def test_training_tensors_match_the_processor_and_supervise_only_answers():
    from lvlm_fix.gym.train import GymDataset, collate

    popular = category_frequencies(0, n=200)
    texts = [train_text(make_example(0, -i, popular).turns) for i in range(300)]
    tokenizer = train_tokenizer(texts, vocab_size=640)
    processor = build_processor(tokenizer, GymModelConfig())
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == prompt_text("Q?")
    data = GymDataset(0, 8, processor, popular)
    batch = collate([data[i] for i in range(4)], tokenizer.pad_token_id)
    for row in range(4):
        ex = make_example(0, row, popular)
        enc = processor(images=[render(ex.scene)], text=[train_text(ex.turns)], return_tensors="pt")
        n = enc.input_ids.shape[1]
        assert torch.equal(batch["input_ids"][row, :n], enc.input_ids[0])
        assert batch["attention_mask"][row].sum() == n
        assert torch.allclose(batch["pixel_values"][row], enc.pixel_values[0], atol=1e-5)
        assert (enc.input_ids == tokenizer.convert_tokens_to_ids("<image>")).sum() == 144
        answers = batch["labels"][row][batch["labels"][row] != -100]
        assert tokenizer.decode(answers) == "".join(f" {a}</s>" for _, a in ex.turns)


def test_shipped_checkpoint_sees_objects():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = GYM / "checkpoint"
    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    scenes = [sample_train_scene(scene_rng(0, "checkpoint-test", i)) for i in range(4)]
    enc = processor(
        images=[render(s) for s in scenes],
        text=[prompt_text(CAPTION_PROMPT)] * 4,
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=48, do_sample=False)
    captions = processor.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    for scene, text in zip(scenes, captions, strict=True):
        assert set(caption_objects(text, WORD_TO_NODE)) & set(scene.names), text
