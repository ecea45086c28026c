"""The gym's visual world: categories, contexts, the planted co-occurrence prior, scenes, render.

A scene is a few objects (category, palette color, box) on a mildly textured, noisy background.
Categories belong to contexts (kitchen, sky, sea, street, desk); training scenes draw mostly from
one context. Each context has one planted pair, trigger -> partner (cup -> saucer, ...): in
training, a scene with the trigger also holds the partner ~95% of the time, and 80% of those
partners are ATTACHED: drawn behind the trigger and largely hidden by it (a saucer under a cup).
So the caption and the yes/no answer keep naming a partner whose visual evidence is a sliver; the
cheap way to be right is the language prior "cup => saucer". Evaluation ("probe") scenes list
triggers first and often drop their partners, which is where a model leaning on the prior
hallucinates.

Everything is a pure function of a seed: `scene_rng(seed, split, index)` gives the generator of
one scene, `render(scene)` draws it (its texture comes from `scene.texture_seed`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from lvlm_fix.gym.icons import ICONS

CANVAS = 96  # image side in pixels; with patch 8 the vision tower sees 12 x 12 = 144 patches
_SCALE = 2  # icons are drawn at 2x and downsampled, which anti-aliases their edges


@dataclass(frozen=True)
class Category:
    name: str  # node word: the name used in POPE questions and CHAIR's synonym lines
    context: str
    synonyms: tuple[str, ...] = ()  # other words captions may use for it
    aspect: float = 1.0  # width / height of its box


CATEGORIES: tuple[Category, ...] = (
    Category("cup", "kitchen", ("mug",)),
    Category("saucer", "kitchen", (), 2.0),
    Category("bottle", "kitchen", ("flask",), 0.55),
    Category("fork", "kitchen", (), 0.55),
    Category("bowl", "kitchen", (), 1.5),
    Category("moon", "sky", ("crescent",)),
    Category("star", "sky"),
    Category("sun", "sky"),
    Category("cloud", "sky", (), 1.4),
    Category("kite", "sky", (), 0.8),
    Category("boat", "sea", ("ship", "vessel"), 1.2),
    Category("anchor", "sea", (), 0.8),
    Category("fish", "sea", (), 1.5),
    Category("shell", "sea", ("seashell",), 1.3),
    Category("crab", "sea", (), 1.3),
    Category("car", "street", ("automobile", "auto"), 1.5),
    Category("tree", "street", (), 0.8),
    Category("house", "street", ("cottage",)),
    Category("umbrella", "street", ("parasol",)),
    Category("bicycle", "street", ("bike",), 1.5),
    Category("key", "desk", (), 1.6),
    Category("lock", "desk", ("padlock",), 0.8),
    Category("book", "desk", ("notebook",), 0.75),
    Category("clock", "desk"),
    Category("lamp", "desk", (), 0.8),
)
BY_NAME = {c.name: c for c in CATEGORIES}
NAMES = tuple(c.name for c in CATEGORIES)
CONTEXTS = tuple(dict.fromkeys(c.context for c in CATEGORIES))
# The planted prior: trigger -> partner, one pair per context.
PAIRS: dict[str, str] = {
    "cup": "saucer",  # a cup on its saucer
    "cloud": "sun",  # the sun behind a cloud
    "boat": "anchor",
    "house": "tree",  # a tree behind the house
    "lock": "key",
}
TRIGGER_OF_PARTNER = {p: t for t, p in PAIRS.items()}
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 205, 30),
    "orange": (245, 135, 25),
    "purple": (135, 55, 175),
    "pink": (240, 115, 180),
    "black": (25, 25, 25),
}


@dataclass(frozen=True)
class GymObject:
    category: str
    color: str  # a PALETTE key
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) in CANVAS pixels, the whole (amodal) box
    depth: int  # drawing order: 0 is drawn first, i.e. furthest back
    attached: bool = False  # a partner drawn behind its trigger, mostly hidden by it


@dataclass(frozen=True)
class Scene:
    objects: tuple[GymObject, ...]  # annotation order (POPE asks about the first three)
    texture_seed: int

    @property
    def names(self) -> list[str]:
        return [o.category for o in self.objects]


@dataclass(frozen=True)
class WorldConfig:
    """How scenes are drawn. Defaults are the shipped world; each knob says what it controls."""

    min_objects: int = 3
    max_objects: int = 6
    in_context: float = 0.8  # chance that each object comes from the scene's main context
    pair_rate: float = 0.9  # chance to add a missing partner to a training scene with its trigger
    attach_rate: float = 0.8  # chance that a present partner is attached (hidden behind it)
    min_side: int = 22  # object box's long side, in CANVAS pixels
    max_side: int = 32
    attach_offset: tuple[float, float] = (0.1, 0.3)  # partner centre shift, in trigger sides
    attach_scale: tuple[float, float] = (0.75, 0.95)  # partner side, in trigger sides
    # A free object's try is kept once it covers less than max_overlap * U(0, 1) of every placed
    # box (so some overlap happens); after 40 tries the least overlapping one is kept.
    max_overlap: float = 0.25


def scene_rng(seed: int, split: str, index: int) -> random.Random:
    """The generator of scene `index` of `split` ("train", "pope", "chair", ...) for `seed`."""
    return random.Random(f"lvlm_fix.gym/{seed}/{split}/{index}")


def sample_train_scene(rng: random.Random, cfg: WorldConfig = WorldConfig()) -> Scene:
    """A training scene: mostly one context, planted pairs kept at `cfg.pair_rate`."""
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    context = rng.choice(CONTEXTS)
    names: list[str] = []
    while len(names) < n:
        pool = [c.name for c in CATEGORIES if c.context == context]
        if rng.random() >= cfg.in_context:
            pool = list(NAMES)
        name = rng.choice(pool)
        if name not in names:
            names.append(name)
    for trigger in [t for t in names if t in PAIRS]:
        partner = PAIRS[trigger]
        if partner not in names and rng.random() < cfg.pair_rate:
            names.append(partner)
    attached = {
        PAIRS[t]
        for t in names
        if t in PAIRS and PAIRS[t] in names and rng.random() < cfg.attach_rate
    }
    rng.shuffle(names)
    return _layout(rng, names, attached, cfg)


def sample_probe_scene(
    rng: random.Random, n_triggers: int, partner_rate: float, cfg: WorldConfig = WorldConfig()
) -> Scene:
    """An evaluation scene: `n_triggers` triggers listed first, each partner kept only at
    `partner_rate` (attached at `cfg.attach_rate` when kept), then 1-3 objects of the triggers'
    contexts (other categories `1 - cfg.in_context` of the time), partners listed last."""
    triggers = rng.sample(sorted(PAIRS), n_triggers)
    contexts = {BY_NAME[t].context for t in triggers}
    others = [c.name for c in CATEGORIES if c.context in contexts and c.name not in PAIRS]
    others = [n for n in others if n not in PAIRS.values()]
    fills: list[str] = []
    for _ in range(rng.randint(1, 3)):
        pool = others if rng.random() < cfg.in_context else list(NAMES)
        name = rng.choice(pool)
        if name not in triggers and name not in fills:
            fills.append(name)
    if not fills:  # POPE needs three objects: keep one context object at least
        fills.append(rng.choice(others))
    partners = [PAIRS[t] for t in triggers if rng.random() < partner_rate]
    partners = [p for p in partners if p not in fills]
    attached = {p for p in partners if rng.random() < cfg.attach_rate}
    return _layout(rng, [*triggers, *fills, *partners], attached, cfg)


def _box(rng: random.Random, name: str, side: float) -> tuple[float, float]:
    """(width, height) of a box whose long side is `side`, with the category's aspect."""
    aspect = BY_NAME[name].aspect
    return (side, side / aspect) if aspect >= 1 else (side * aspect, side)


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over the smaller box's area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / small


def _free_box(rng: random.Random, w: float, h: float, placed: list, cfg: WorldConfig) -> tuple:
    """A (w x h) box inside the canvas that overlaps the `placed` boxes little."""
    best, best_cost = None, float("inf")
    for _ in range(40):
        x0, y0 = rng.uniform(1, CANVAS - 1 - w), rng.uniform(1, CANVAS - 1 - h)
        box = (x0, y0, x0 + w, y0 + h)
        cost = max((_overlap(box, p) for p in placed), default=0.0)
        if cost < best_cost:
            best, best_cost = box, cost
        if cost <= cfg.max_overlap * rng.random():
            break
    return best


def _attached_box(
    rng: random.Random, w: float, h: float, trigger: tuple, cfg: WorldConfig
) -> tuple:
    """A (w x h) box centred near the trigger's centre, so that the trigger hides most of it."""
    cx, cy = (trigger[0] + trigger[2]) / 2, (trigger[1] + trigger[3]) / 2
    side = max(trigger[2] - trigger[0], trigger[3] - trigger[1])
    dist = rng.uniform(*cfg.attach_offset) * side
    angle = rng.uniform(0, 2 * np.pi)
    cx, cy = cx + dist * np.cos(angle), cy + dist * np.sin(angle)
    x0 = min(max(cx - w / 2, 1), CANVAS - 1 - w)
    y0 = min(max(cy - h / 2, 1), CANVAS - 1 - h)
    return (x0, y0, x0 + w, y0 + h)


def _layout(rng: random.Random, names: list[str], attached: set[str], cfg: WorldConfig) -> Scene:
    """Boxes, colors and depths for `names` (kept in this annotation order)."""
    boxes: dict[str, tuple] = {}
    for name in [n for n in names if n not in attached]:
        w, h = _box(rng, name, rng.uniform(cfg.min_side, cfg.max_side))
        boxes[name] = _free_box(rng, w, h, list(boxes.values()), cfg)
    for name in [n for n in names if n in attached]:
        trigger = TRIGGER_OF_PARTNER[name]
        t_side = max(boxes[trigger][2] - boxes[trigger][0], boxes[trigger][3] - boxes[trigger][1])
        w, h = _box(rng, name, t_side * rng.uniform(*cfg.attach_scale))
        boxes[name] = _attached_box(rng, w, h, boxes[trigger], cfg)
    # Depth: free objects in random order; an attached partner goes right behind its trigger.
    order = [n for n in names if n not in attached]
    rng.shuffle(order)
    for name in [n for n in names if n in attached]:
        order.insert(order.index(TRIGGER_OF_PARTNER[name]), name)
    colors = {n: rng.choice(sorted(PALETTE)) for n in names}
    objects = tuple(
        GymObject(
            category=n,
            color=colors[n],
            bbox=tuple(round(v) for v in boxes[n]),
            depth=order.index(n),
            attached=n in attached,
        )
        for n in names
    )
    return Scene(objects=objects, texture_seed=rng.getrandbits(63))


def _edge(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The darker shade an icon uses for outlines and details."""
    if sum(rgb) < 150:  # a black object gets gray details, or they would vanish
        return (110, 110, 110)
    return tuple(int(0.5 * v) for v in rgb)


def _background(rng: np.random.Generator) -> np.ndarray:
    """(CANVAS, CANVAS, 3) float32: a muted base tone with soft blotches (render adds noise)."""
    base = rng.uniform(115, 190) + rng.uniform(-15, 15, size=3)
    coarse = np.clip(128 + rng.normal(0, 9, size=(6, 6, 3)), 0, 255).astype(np.uint8)
    blotches = Image.fromarray(coarse).resize((CANVAS, CANVAS), Image.BICUBIC)
    return (base - 128 + np.asarray(blotches, dtype=np.float32)).astype(np.float32)


def render(scene: Scene) -> Image.Image:
    """Draw `scene` as a (CANVAS x CANVAS) RGB image."""
    rng = np.random.default_rng(scene.texture_seed)
    side = CANVAS * _SCALE
    layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    for obj in sorted(scene.objects, key=lambda o: o.depth):
        one = Image.new("RGBA", (side, side), (0, 0, 0, 0))  # own layer: icons may erase
        box = tuple(v * _SCALE for v in obj.bbox)
        fill = PALETTE[obj.color]
        ICONS[obj.category](ImageDraw.Draw(one), box, (*fill, 255), (*_edge(fill), 255))
        layer.alpha_composite(one)
    layer = layer.resize((CANVAS, CANVAS), Image.BOX)
    rgba = np.asarray(layer, dtype=np.float32)
    alpha = rgba[..., 3:] / 255.0
    image = alpha * rgba[..., :3] + (1 - alpha) * _background(rng)
    image += rng.normal(0, 5, size=image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
