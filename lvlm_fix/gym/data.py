"""The gym's training mix: captions, yes/no questions and color questions about a scene.

Every example is a pure function of (seed, index): `make_example` draws a training scene and a
conversation about it: either one caption turn, or 3-6 short question turns (yes/no and color).
Several questions per image give the yes/no skill many answers per rendered image; captions stay
alone so that no earlier turn can hand the model the answer. Texts use LLaVA-1.5's layout
(`lvlm_fix.tiny.CHAT_TEMPLATE`): `USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:
{a2}</s>...`; the loss is on the answers only.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from lvlm_fix.gym.world import (
    BY_NAME,
    CANVAS,
    NAMES,
    PAIRS,
    Scene,
    sample_train_scene,
    scene_rng,
)

CAPTION_PROMPT = "Please describe this image in detail."
POPE_TEMPLATE = "Is there {} in the image?"  # POPE's question, with the right article
ONE_WORD_SUFFIX = " Please answer this question with one word."  # the VCD-style POPE suffix
_CAPTION_PROMPTS = (CAPTION_PROMPT, "Describe the image.", "What is in this picture?")
_YES_NO = (POPE_TEMPLATE, "Is there {} in this picture?", "Does the image contain {}?")
# How an attached partner is named right after its trigger: "a red cup on a blue saucer".
RELATIONS = {
    "cup": "on",
    "cloud": "in front of",
    "boat": "with",
    "house": "in front of",
    "lock": "with",
}
_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "center", "right")
_OPENINGS = (
    "The image shows a few objects on a textured background.",
    "This is a simple scene with several objects.",
    "Several objects are scattered over a plain background.",
)


@dataclass(frozen=True)
class Example:
    scene: Scene
    turns: tuple[tuple[str, str], ...]  # (user text, assistant text without </s>) per turn


def prompt_text(question: str) -> str:
    """`CHAT_TEMPLATE` rendered for one image and `question`, up to the generation prompt."""
    return f"USER: <image>\n{question} ASSISTANT:"


def train_segments(turns: tuple[tuple[str, str], ...]) -> list[tuple[str, bool]]:
    """The conversation as (text, is_answer) pieces; joined they are `CHAT_TEMPLATE` rendered
    with every turn (the processor adds <s> and expands <image>)."""
    pieces = []
    for k, (question, answer) in enumerate(turns):
        pieces.append((prompt_text(question) if k == 0 else f"USER: {question} ASSISTANT:", False))
        pieces.append((f" {answer}</s>", True))
    return pieces


def train_text(turns: tuple[tuple[str, str], ...]) -> str:
    return "".join(text for text, _ in train_segments(turns))


def with_article(word: str) -> str:
    """'a cup', 'an anchor' (POPE's generator wrote 'an' by a buggy replace; this is correct)."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def position(bbox: tuple[int, int, int, int]) -> str:
    """A rough position phrase from the box centre on a 3 x 3 grid: 'in the top left'."""
    row = _ROWS[min(2, int((bbox[1] + bbox[3]) / 2 * 3 / CANVAS))]
    col = _COLS[min(2, int((bbox[0] + bbox[2]) / 2 * 3 / CANVAS))]
    if row == "middle":
        return "in the center" if col == "center" else f"on the {col}"
    return f"at the {row}" if col == "center" else f"in the {row} {col}"


def _word(name: str, rng: random.Random) -> str:
    """The category's node word, or one of its synonyms 30% of the time."""
    synonyms = BY_NAME[name].synonyms
    return rng.choice(synonyms) if synonyms and rng.random() < 0.3 else name


def _phrases(scene: Scene, rng: random.Random) -> list[tuple[str, tuple[int, int, int, int]]]:
    """(noun phrase, box) units; an attached partner is folded into its trigger's phrase."""
    by_name = {o.category: o for o in scene.objects}
    units = []
    for obj in scene.objects:
        if obj.attached:
            continue
        text = with_article(f"{obj.color} {_word(obj.category, rng)}")
        partner = by_name.get(PAIRS.get(obj.category, ""))
        if partner is not None and partner.attached:
            p_text = with_article(f"{partner.color} {_word(partner.category, rng)}")
            text = f"{text} {RELATIONS[obj.category]} {p_text}"
        units.append((text, obj.bbox))
    return units


def _sentence(np_: str, pos: str, rng: random.Random) -> str:
    cap = np_[0].upper() + np_[1:]
    return rng.choice(
        (
            f"There is {np_} {pos}.",
            f"{cap} is {pos}.",
            f"{pos[0].upper() + pos[1:]}, there is {np_}.",
            f"I can see {np_} {pos}.",
            f"{cap} sits {pos}.",
        )
    )


def caption(scene: Scene, rng: random.Random) -> str:
    """A templated detailed caption naming every object with its color and rough position."""
    units = _phrases(scene, rng)
    if rng.random() < 0.5:  # reading order: rows top to bottom, then left to right
        units.sort(key=lambda u: (int((u[1][1] + u[1][3]) * 1.5 / CANVAS), u[1][0]))
    else:
        rng.shuffle(units)
    sentences = [rng.choice(_OPENINGS)] if rng.random() < 0.4 else []
    i = 0
    while i < len(units):
        a, pos_a = units[i][0], position(units[i][1])
        if i + 1 < len(units) and rng.random() < 0.3:
            b, box_b = units[i + 1]
            cap = a[0].upper() + a[1:]
            sentences.append(f"{cap} is {pos_a}, and {b} is {position(box_b)}.")
            i += 2
        else:
            sentences.append(_sentence(a, pos_a, rng))
            i += 1
    return " ".join(sentences)


def category_frequencies(seed: int, n: int = 2000) -> dict[str, float]:
    """Share of training scenes holding each category (used for 'popular' negatives)."""
    counts = Counter(
        name for i in range(n) for name in sample_train_scene(scene_rng(seed, "stats", i)).names
    )
    return {name: counts[name] / n for name in NAMES}


def yes_no(scene: Scene, rng: random.Random, popular: dict[str, float]) -> tuple[str, str, str]:
    """(category, question, answer) of a yes/no existence question: half positives, half
    negatives drawn random / popular / co-occurring (same context as an object of the scene),
    as POPE draws them."""
    present = scene.names
    absent = [n for n in NAMES if n not in present]
    if rng.random() < 0.5:
        name, answer = rng.choice(present), "Yes"
    else:
        kind = rng.random()
        contexts = {BY_NAME[n].context for n in present}
        mates = [n for n in absent if BY_NAME[n].context in contexts]
        if kind < 0.4 and mates:
            name = rng.choice(mates)
        elif kind < 0.6:
            name = rng.choices(absent, weights=[popular[n] for n in absent])[0]
        else:
            name = rng.choice(absent)
        answer = "No"
    template = _YES_NO[0] if rng.random() < 0.7 else rng.choice(_YES_NO[1:])
    question = template.format(with_article(_word(name, rng)))
    if rng.random() < 0.5:
        question += ONE_WORD_SUFFIX
    return name, question, answer


def color_question(scene: Scene, rng: random.Random, popular: dict) -> tuple[str, str, str]:
    """(category, question, answer) asking the color of one object of the scene (`popular` is
    unused: the signature matches `yes_no` so a conversation can draw either)."""
    obj = rng.choice(scene.objects)
    word = _word(obj.category, rng)
    return obj.category, f"What color is the {word}?", obj.color.capitalize()


def make_example(seed: int, index: int, popular: dict[str, float]) -> Example:
    """Training example `index` for `seed`: a scene and a conversation: a caption (35%) or
    3-6 questions, each yes/no (80%) or color (20%)."""
    rng = scene_rng(seed, "train", index)
    scene = sample_train_scene(rng)
    if rng.random() < 0.35:
        prompt = CAPTION_PROMPT if rng.random() < 0.7 else rng.choice(_CAPTION_PROMPTS)
        return Example(scene=scene, turns=((prompt, caption(scene, rng)),))
    n_turns, turns, asked = rng.randint(3, 6), [], set()
    for _ in range(4 * n_turns):
        ask = yes_no if rng.random() < 0.8 else color_question
        name, q, a = ask(scene, rng, popular)
        if name not in asked:  # one turn per object, or a later turn could copy an earlier answer
            asked.add(name)
            turns.append((q, a))
        if len(turns) == n_turns:
            break
    return Example(scene=scene, turns=tuple(turns))


def corpus(seed: int, n: int, popular: dict[str, float]) -> list[str]:
    """Training texts for the tokenizer: every word the model will read or write."""
    return [train_text(make_example(seed, -1 - i, popular).turns) for i in range(n)]
