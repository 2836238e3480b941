"""Synthetic visual reasoning tasks: coloured shapes in images and short videos, exact answers.

Generated offline from a seed (no download), small enough for a CPU model to learn, and
registered as synthetic families (``rewards/synthetic.py``) with exact-answer verifiers
``synthetic_<family>``. A canvas is 32×32 pixels: a 4×4 grid of 8×8 cells (one ViT patch each
at the tiny preset), at most one shape per cell, so every shape is seen whole by one patch.

    family          media        question                                    answer
    shape_count     1 image      how many red shapes?                        "3"
    shape_position  1 image      is the blue shape left or right? (d>=3: top or bottom)   "left"
    shape_compare   1 image      more red or green?                          "green"
    shape_sum       2 images     how many shapes in all?  (counts of both)   "5"
    video_motion    3-6 frames   which way does the shape move?              "up"
    video_order     3-6 frames   which colour appears first? (shapes appear one per frame)  "yellow"
    video_change    3-6 frames   what colour does the square become?        "red"

Difficulty (1..5) adds shapes, colours and distractors. Videos are given at 1 fps, so
``model.vision.video_fps: 1`` keeps every frame. Images are ``[32, 32, 3]`` uint8 arrays in
``sample.extra`` (``images`` / ``video``); ``tools/make_visual_data.py`` writes them as PNG
files next to a JSONL that ``data/media.py`` reads back. Generation is deterministic in
(family, difficulty, seed).
"""

from __future__ import annotations

import random

import numpy as np

CANVAS, CELL, GRID = 32, 8, 4
BACKGROUND = (16, 16, 16)
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40)}
SHAPES = ("square", "circle", "triangle")
VIDEO_FPS = 1.0


def _mask(shape: str) -> np.ndarray:
    """Pixels of a shape inside one 8×8 cell (1 pixel margin)."""
    y, x = np.mgrid[0:CELL, 0:CELL]
    if shape == "square":
        return (y >= 1) & (y <= 6) & (x >= 1) & (x <= 6)
    if shape == "circle":
        return (y - 3.5) ** 2 + (x - 3.5) ** 2 <= 3.2**2
    return (y >= 1) & (y <= 6) & (np.abs(x - 3.5) <= (y - 0.5) / 2 + 0.01)  # triangle, apex up


MASKS = {s: _mask(s) for s in SHAPES}


def render(shapes: list[tuple[int, int, str, str]]) -> np.ndarray:
    """``[32, 32, 3]`` uint8 canvas with (row, col, shape, colour) shapes drawn in their cells."""
    img = np.empty((CANVAS, CANVAS, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for row, col, shape, colour in shapes:
        cell = img[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL]
        cell[MASKS[shape]] = COLOURS[colour]
    return img


def _cells(rng: random.Random, n: int) -> list[tuple[int, int]]:
    return [divmod(i, GRID) for i in rng.sample(range(GRID * GRID), n)]


def _palette(d: int) -> list[str]:
    return list(COLOURS)[: min(2 + (d + 1) // 2, len(COLOURS))]  # 3 colours at d=1..2, 4 from d=3


def _scatter(rng: random.Random, n: int, colours: list[str]) -> list[tuple[int, int, str, str]]:
    return [(r, c, rng.choice(SHAPES), rng.choice(colours)) for r, c in _cells(rng, n)]


def shape_count(rng: random.Random, d: int):
    shapes = _scatter(rng, rng.randint(1, 2 + d), _palette(d))
    colour = rng.choice(_palette(d))  # may be absent: the answer 0 is allowed
    n = sum(s[3] == colour for s in shapes)
    return f"Q: <image> how many {colour} shapes?\nA:", str(n), {"images": [render(shapes)]}


def shape_position(rng: random.Random, d: int):
    colours = _palette(d)
    target = rng.choice(colours)
    vertical = d >= 3 and rng.random() < 0.5
    side = rng.choice(("top", "bottom") if vertical else ("left", "right"))
    half = range(0, 2) if side in ("left", "top") else range(2, 4)
    free = rng.choice(range(GRID))
    cell = (rng.choice(half), free) if vertical else (free, rng.choice(half))
    others = [c for c in colours if c != target]
    cells = [x for x in _cells(rng, min(d, 6) + 1) if x != cell][: max(d - 1, 0)]
    shapes = [(*cell, rng.choice(SHAPES), target)] + [(r, c, rng.choice(SHAPES), rng.choice(others)) for r, c in cells]
    ask = "top or bottom" if vertical else "left or right"
    return f"Q: <image> is the {target} shape {ask}?\nA:", side, {"images": [render(shapes)]}


def shape_compare(rng: random.Random, d: int):
    a, b = rng.sample(_palette(d), 2)
    na, nb = rng.sample(range(0, 2 + d), 2)  # different counts: the answer is never a tie
    extra = [c for c in _palette(d) if c not in (a, b)]
    n_other = rng.randint(0, max(0, min(d - 1, GRID * GRID - na - nb))) if extra else 0
    colours = [a] * na + [b] * nb + [rng.choice(extra) for _ in range(n_other)]
    shapes = [(r, c, rng.choice(SHAPES), col) for (r, c), col in zip(_cells(rng, len(colours)), colours)]
    return f"Q: <image> more {a} or {b}?\nA:", a if na > nb else b, {"images": [render(shapes)]}


def shape_sum(rng: random.Random, d: int):
    counts = [rng.randint(0, 1 + d), rng.randint(1, 1 + d)]
    images = [render(_scatter(rng, n, _palette(d))) for n in counts]
    return "Q: <image> <image> how many shapes in all?\nA:", str(sum(counts)), {"images": images}


def _frames(d: int, rng: random.Random) -> int:
    return min(3 + rng.randint(0, (d + 1) // 2), 6)


def video_motion(rng: random.Random, d: int):
    n = _frames(d, rng)
    steps = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}
    direction = rng.choice(list(steps))
    dr, dc = steps[direction]
    hops = min(n - 1, GRID - 1)  # the shape moves one cell per frame, then stays at the edge

    def start(step: int) -> int:  # anywhere the whole path fits on the grid
        return rng.randrange(GRID) if step == 0 else rng.randrange(0, GRID - hops) if step > 0 else rng.randrange(hops, GRID)

    start_r, start_c = start(dr), start(dc)
    shape, colour = rng.choice(SHAPES), rng.choice(_palette(d))
    path = [(start_r + dr * min(k, hops), start_c + dc * min(k, hops)) for k in range(n)]
    still = [x for x in _cells(rng, 6) if x not in path][: (d >= 3) * (d - 2)]  # static distractors
    others = [(r, c, rng.choice(SHAPES), rng.choice(_palette(d))) for r, c in still]
    frames = [render([(r, c, shape, colour)] + others) for r, c in path]
    return "Q: <video> which way does the shape move?\nA:", direction, {"video": {"frames": frames, "fps": VIDEO_FPS}}


def video_order(rng: random.Random, d: int):
    colours = rng.sample(list(COLOURS), min(3 + (d >= 3), len(COLOURS)))
    cells = _cells(rng, len(colours))
    shapes = [(r, c, rng.choice(SHAPES), col) for (r, c), col in zip(cells, colours)]
    frames = [render(shapes[:k]) for k in range(1, len(shapes) + 1)]  # one new shape per frame
    return "Q: <video> which colour appears first?\nA:", colours[0], {"video": {"frames": frames, "fps": VIDEO_FPS}}


def video_change(rng: random.Random, d: int):
    n = _frames(d, rng)
    before, after = rng.sample(list(COLOURS), 2)
    (r, c), *rest = _cells(rng, 1 + min(d - 1, 4))
    others = [(rr, cc, rng.choice(("circle", "triangle")), rng.choice(list(COLOURS))) for rr, cc in rest]
    switch = rng.randint(1, n - 1)  # the frame where the square has its new colour
    frames = [render([(r, c, "square", before if k < switch else after)] + others) for k in range(n)]
    return "Q: <video> what colour does the square become?\nA:", after, {"video": {"frames": frames, "fps": VIDEO_FPS}}


# name -> make(rng, difficulty) -> (prompt, answer, media fields for PromptSample.extra)
VISUAL_MAKERS = {
    "shape_count": shape_count,
    "shape_position": shape_position,
    "shape_compare": shape_compare,
    "shape_sum": shape_sum,
    "video_motion": video_motion,
    "video_order": video_order,
    "video_change": video_change,
}
