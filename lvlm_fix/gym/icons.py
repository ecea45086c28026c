"""Procedural icons: one small PIL drawing function per object category.

Each function draws one object into `box = (x0, y0, x1, y1)` of an RGBA layer that holds only
that object, in unit coordinates: `_at(box, u, v)` maps (0, 0) to the box's top-left corner and
(1, 1) to its bottom-right. `fill` is the object's palette color and `edge` a darker shade of it
(outlines and details), so an icon's SHAPE, not its color, tells the categories apart. Drawing
with `CLEAR` erases pixels of the layer (the moon's bite, the key's ring hole).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from PIL import ImageDraw

Box = tuple[float, float, float, float]
RGB = tuple[int, int, int]
Draw = ImageDraw.ImageDraw
DARK = (45, 40, 35, 255)  # wheels, trunks, clock hands: parts that do not take the object's color
CLEAR = (0, 0, 0, 0)


def _at(box: Box, u: float, v: float) -> tuple[float, float]:
    x0, y0, x1, y1 = box
    return (x0 + u * (x1 - x0), y0 + v * (y1 - y0))


def _r(box: Box, u0: float, v0: float, u1: float, v1: float) -> list[float]:
    return [*_at(box, u0, v0), *_at(box, u1, v1)]


def _p(box: Box, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [_at(box, u, v) for u, v in points]


def _w(box: Box, frac: float) -> int:
    """A line width that is `frac` of the box width (at least 2 px)."""
    return max(2, round(frac * (box[2] - box[0])))


# --- kitchen ---------------------------------------------------------------------------------
def cup(d: Draw, box: Box, fill: RGB, edge: RGB) -> None:
    d.ellipse(_r(box, 0.5, 0.25, 1.0, 0.75), outline=fill, width=_w(box, 0.12))  # handle
    d.polygon(_p(box, [(0.0, 0.08), (0.78, 0.08), (0.68, 1.0), (0.1, 1.0)]), fill=fill)
    d.ellipse(_r(box, 0.0, 0.0, 0.78, 0.16), fill=edge)  # the opening, seen from above


def saucer(d: Draw, box: Box, fill: RGB, edge: RGB) -> None:
    d.ellipse(_r(box, 0.0, 0.2, 1.0, 0.8), fill=fill, outline=edge, width=_w(box, 0.05))
    d.ellipse(_r(box, 0.3, 0.38, 0.7, 0.62), outline=edge, width=_w(box, 0.05))


def bottle(d: Draw, box: Box, fill: RGB, edge: RGB) -> None:
    d.rectangle(_r(box, 0.22, 0.4, 0.78, 1.0), fill=fill)
    d.polygon(_p(box, [(0.22, 0.42), (0.4, 0.18), (0.6, 0.18), (0.78, 0.42)]), fill=fill)
    d.rectangle(_r(box, 0.38, 0.0, 0.62, 0.2), fill=edge)  # cap
    d.rectangle(_r(box, 0.22, 0.6, 0.78, 0.8), fill=edge)  # label band


def fork(d: Draw, box: Box, fill: RGB, edge: RGB) -> None:
    d.rectangle(_r(box, 0.4, 0.42, 0.6, 1.0), fill=fill)
    d.rectangle(_r(box, 0.12, 0.3, 0.88, 0.45), fill=fill)
    for u in (0.12, 0.42, 0.72):
        d.rectangle(_r(box, u, 0.0, u + 0.16, 0.35), fill=fill)
    d.line(_p(box, [(0.5, 0.5), (0.5, 0.95)]), fill=edge, width=1)


def bowl(d: Draw, box: Box, fill: RGB, edge: RGB) -> None:
    d.chord(_r(box, 0.0, -0.45, 1.0, 1.0), 0, 180, fill=fill)
    d.rectangle(_r(box, 0.0, 0.22, 1.0, 0.34), fill=edge)  # rim
    d.rectangle(_r(box, 0.35, 0.9, 0.65, 1.0), fill=edge)  # foot


# --- sky -------------------------------------------------------------------------------------
def moon(d: Draw, box: Box, fill: RGB, edge: RGB) -> None:
    d.ellipse(_r(box, 0.0, 0.0, 1.0, 1.0), fill=fill)
    d.ellipse(_r(box, 0.35, -0.1, 1.25, 0.85), fill=CLEAR)  # the bite makes a crescent


def star(d: Draw, box: Box, fill: RGB, edge: RGB) -> None:
    points = []
    for k in range(10):
        r = 0.5 if k % 2 == 0 else 0.21
        a = -math.pi / 2 + k * math.pi / 5
        points.append((0.5 + r * math.cos(a), 0.55 + r * math.sin(a)))
    d.polygon(_p(box, points), fill=fill, outline=edge)


def sun(d: Draw, box: Box, fill: RGB, edge: RGB) -> None:
    for k in range(8):
        a = k * math.pi / 4
        tip = (0.5 + 0.5 * math.cos(a), 0.5 + 0.5 * math.sin(a))
        d.line(_p(box, [(0.5, 0.5), tip]), fill=fill, width=_w(box, 0.09))
    d.ellipse(_r(box, 0.22, 0.22, 0.78, 0.78), fill=fill, outline=edge, width=_w(box, 0.05))


def cloud(d: Draw, box: Box, fill: RGB, edge: RGB) -> None:
    for u0, v0, u1, v1 in ((0.0, 0.4, 0.45, 0.95), (0.18, 0.05, 0.72, 0.8), (0.52, 0.3, 1.0, 0.95)):
        d.ellipse(_r(box, u0, v0, u1, v1), fill=fill)
    d.rectangle(_r(box, 0.2, 0.6, 0.8, 0.95), fill=fill)
    d.line(_p(box, [(0.12, 0.96), (0.88, 0.96)]), fill=edge, width=_w(box, 0.06))


def kite(d: Draw, box: Box, fill: RGB, edge: RGB) -> None:
    d.polygon(_p(box, [(0.5, 0.0), (0.85, 0.3), (0.5, 0.7), (0.15, 0.3)]), fill=fill)
    d.line(_p(box, [(0.5, 0.0), (0.5, 0.7)]), fill=edge, width=1)
    d.line(_p(box, [(0.15, 0.3), (0.85, 0.3)]), fill=edge, width=1)
    d.line(_p(box, [(0.5, 0.7), (0.35, 0.85), (0.6, 0.92), (0.45, 1.0)]), fill=edge, width=2)


# --- sea -------------------------------------------------------------------------------------
def boat(d: Draw, box: Box, fill: RGB, edge: RGB) -> None:
    d.polygon(_p(box, [(0.0, 0.65), (1.0, 0.65), (0.8, 1.0), (0.2, 1.0)]), fill=fill)
    d.line(_p(box, [(0.5, 0.0), (0.5, 0.65)]), fill=DARK, width=_w(box, 0.05))
    d.polygon(_p(box, [(0.54, 0.05), (0.54, 0.58), (0.95, 0.58)]), fill=edge)


def anchor(d: Draw, box: Box, fill: RGB, edge: RGB) -> None:
    w = _w(box, 0.12)
    d.line(_p(box, [(0.5, 0.2), (0.5, 0.95)]), fill=fill, width=w)
    d.line(_p(box, [(0.25, 0.32), (0.75, 0.32)]), fill=fill, width=w)
    d.ellipse(_r(box, 0.36, 0.0, 0.64, 0.22), outline=fill, width=w // 2 + 1)
    d.arc(_r(box, 0.05, 0.35, 0.95, 0.98), 20, 160, fill=fill, width=w)


def fish(d: Draw, box: Box, fill: RGB, edge: RGB) -> None:
    d.polygon(_p(box, [(0.72, 0.5), (1.0, 0.15), (1.0, 0.85)]), fill=edge)  # tail
    d.ellipse(_r(box, 0.0, 0.15, 0.8, 0.85), fill=fill)
    d.ellipse(_r(box, 0.15, 0.35, 0.27, 0.47), fill=DARK)  # eye


def shell(d: Draw, box: Box, fill: RGB, edge: RGB) -> None:
    d.pieslice(_r(box, 0.0, 0.0, 1.0, 1.8), 180, 360, fill=fill)
    for k in range(1, 6):
        a = math.pi + k * math.pi / 6
        end = (0.5 + 0.5 * math.cos(a), 0.9 + 0.9 * math.sin(a))
        d.line(_p(box, [(0.5, 0.9), end]), fill=edge, width=1)
    d.rectangle(_r(box, 0.35, 0.85, 0.65, 1.0), fill=edge)


def crab(d: Draw, box: Box, fill: RGB, edge: RGB) -> None:
    for u in (0.2, 0.35, 0.65, 0.8):  # legs
        d.line(_p(box, [(u, 0.65), (u + (0.1 if u > 0.5 else -0.1), 0.95)]), fill=edge, width=2)
    d.ellipse(_r(box, 0.15, 0.35, 0.85, 0.8), fill=fill)
    d.ellipse(_r(box, 0.0, 0.0, 0.3, 0.3), fill=fill)  # claws
    d.ellipse(_r(box, 0.7, 0.0, 1.0, 0.3), fill=fill)
    d.line(_p(box, [(0.15, 0.25), (0.3, 0.45)]), fill=fill, width=2)
    d.line(_p(box, [(0.85, 0.25), (0.7, 0.45)]), fill=fill, width=2)


# --- street ----------------------------------------------------------------------------------
def car(d: Draw, box: Box, fill: RGB, edge: RGB) -> None:
    d.polygon(_p(box, [(0.22, 0.45), (0.32, 0.15), (0.68, 0.15), (0.8, 0.45)]), fill=fill)
    d.rectangle(_r(box, 0.0, 0.42, 1.0, 0.78), fill=fill)
    d.rectangle(_r(box, 0.36, 0.22, 0.64, 0.42), fill=edge)  # window
    for u in (0.12, 0.62):
        d.ellipse(_r(box, u, 0.62, u + 0.26, 1.0), fill=DARK)


def tree(d: Draw, box: Box, fill: RGB, edge: RGB) -> None:
    d.rectangle(_r(box, 0.4, 0.55, 0.6, 1.0), fill=DARK)
    d.ellipse(_r(box, 0.05, 0.0, 0.95, 0.7), fill=fill, outline=edge, width=_w(box, 0.04))


def house(d: Draw, box: Box, fill: RGB, edge: RGB) -> None:
    d.rectangle(_r(box, 0.1, 0.45, 0.9, 1.0), fill=fill)
    d.polygon(_p(box, [(0.0, 0.48), (0.5, 0.0), (1.0, 0.48)]), fill=edge)  # roof
    d.rectangle(_r(box, 0.42, 0.68, 0.6, 1.0), fill=DARK)  # door


def umbrella(d: Draw, box: Box, fill: RGB, edge: RGB) -> None:
    d.pieslice(_r(box, 0.0, 0.0, 1.0, 0.9), 180, 360, fill=fill)
    d.line(_p(box, [(0.5, 0.42), (0.5, 0.9)]), fill=DARK, width=_w(box, 0.05))
    d.arc(_r(box, 0.3, 0.8, 0.52, 1.0), 0, 180, fill=DARK, width=_w(box, 0.05))


def bicycle(d: Draw, box: Box, fill: RGB, edge: RGB) -> None:
    w = _w(box, 0.06)
    for u in (0.0, 0.58):
        d.ellipse(_r(box, u, 0.45, u + 0.42, 1.0), outline=DARK, width=w)
    frame = [(0.21, 0.72), (0.45, 0.4), (0.79, 0.72), (0.55, 0.72), (0.45, 0.4)]
    d.line(_p(box, frame), fill=fill, width=w + 1)
    d.line(_p(box, [(0.7, 0.3), (0.79, 0.72)]), fill=fill, width=w + 1)  # fork and bars
    d.line(_p(box, [(0.38, 0.3), (0.52, 0.3)]), fill=fill, width=w + 1)  # saddle


# --- desk ------------------------------------------------------------------------------------
def key(d: Draw, box: Box, fill: RGB, edge: RGB) -> None:
    d.ellipse(_r(box, 0.0, 0.2, 0.42, 0.8), fill=fill)
    d.ellipse(_r(box, 0.12, 0.4, 0.28, 0.6), fill=CLEAR)  # ring hole
    d.rectangle(_r(box, 0.38, 0.42, 1.0, 0.58), fill=fill)
    for u in (0.72, 0.86):
        d.rectangle(_r(box, u, 0.58, u + 0.1, 0.78), fill=fill)


def lock(d: Draw, box: Box, fill: RGB, edge: RGB) -> None:
    d.arc(_r(box, 0.2, 0.0, 0.8, 0.8), 180, 360, fill=DARK, width=_w(box, 0.1))
    d.line(_p(box, [(0.24, 0.4), (0.24, 0.5)]), fill=DARK, width=_w(box, 0.1))
    d.line(_p(box, [(0.76, 0.4), (0.76, 0.5)]), fill=DARK, width=_w(box, 0.1))
    d.rectangle(_r(box, 0.05, 0.45, 0.95, 1.0), fill=fill)
    d.ellipse(_r(box, 0.42, 0.6, 0.58, 0.78), fill=DARK)  # keyhole


def book(d: Draw, box: Box, fill: RGB, edge: RGB) -> None:
    d.rectangle(_r(box, 0.1, 0.0, 0.9, 1.0), fill=fill)
    d.rectangle(_r(box, 0.1, 0.0, 0.24, 1.0), fill=edge)  # spine
    d.rectangle(_r(box, 0.8, 0.05, 0.9, 0.95), fill=(235, 230, 215, 255))  # pages
    d.line(_p(box, [(0.35, 0.3), (0.7, 0.3)]), fill=edge, width=1)


def clock(d: Draw, box: Box, fill: RGB, edge: RGB) -> None:
    d.ellipse(_r(box, 0.0, 0.0, 1.0, 1.0), fill=fill)
    d.ellipse(_r(box, 0.12, 0.12, 0.88, 0.88), fill=(240, 236, 225, 255))  # face
    d.line(_p(box, [(0.5, 0.5), (0.5, 0.2)]), fill=DARK, width=_w(box, 0.06))
    d.line(_p(box, [(0.5, 0.5), (0.72, 0.58)]), fill=DARK, width=_w(box, 0.06))


def lamp(d: Draw, box: Box, fill: RGB, edge: RGB) -> None:
    d.polygon(_p(box, [(0.25, 0.0), (0.75, 0.0), (1.0, 0.45), (0.0, 0.45)]), fill=fill)
    d.line(_p(box, [(0.5, 0.45), (0.5, 0.9)]), fill=DARK, width=_w(box, 0.07))
    d.rectangle(_r(box, 0.2, 0.88, 0.8, 1.0), fill=edge)


ICONS: dict[str, Callable[[Draw, Box, RGB, RGB], None]] = {
    f.__name__: f
    for f in (
        *(cup, saucer, bottle, fork, bowl),
        *(moon, star, sun, cloud, kite),
        *(boat, anchor, fish, shell, crab),
        *(car, tree, house, umbrella, bicycle),
        *(key, lock, book, clock, lamp),
    )
}
