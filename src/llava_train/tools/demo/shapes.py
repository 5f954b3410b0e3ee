"""The demo's synthetic world: colours, shapes, positions, the held-out triples, drawing, captions and answers
(the rows and splits built from it: `tools.demo.splits`).

Every image holds 1-3 coloured shapes on a 3x3 grid. The eval split's subject is always a
(colour, shape, position) triple that never appears in training (`HELD_OUT`), while every pair of
those attributes (colour x shape, colour x position, shape x position) does appear in training:
no pair the model has seen predicts a wrong answer, yet the exact combination is new. (Holding out
colour x shape *pairs* instead taught the tiny model to answer shape from colour: each colour was
seen only with the other shapes, and held-out shape accuracy fell below chance.) Everything is drawn
from seeded RNGs: the same arguments give byte-identical files.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Saturated, well-separated RGB centres; each drawn shape jitters around its centre so colour is a
# region of colour space, not one exact value.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle")
# Row-major 3x3 grid cells.
POSITIONS = (
    "top left",
    "top center",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom center",
    "bottom right",
)
SIZES = ("small", "large")
COUNTS = (1, 2, 3)
# Held-out (colour, shape, position) triples: those with colour + 3 * shape + position indices = 0
# mod 9. That is one position per colour x shape pair (18 of 162 triples), two per position, at most
# one shape per colour x position and at most one colour per shape x position, so every pair of
# attributes keeps >= 2 training triples and every answer occurs in the held-out split.
HELD_OUT: tuple[tuple[str, str, str], ...] = tuple(
    (c, s, p)
    for ci, c in enumerate(COLORS)
    for si, s in enumerate(SHAPES)
    for pi, p in enumerate(POSITIONS)
    if (ci + 3 * si + pi) % len(POSITIONS) == 0
)
QUESTION_TYPES = ("colour", "shape", "position", "count")
# The OneVision demo's extra question types: the colour or shape in the first or second of two images (a
# multi-image row) and where a shape moves over three frames (a video row).
MULTI_TYPES = ("two images", "motion")
ORDINALS = ("first", "second")
# Direction -> the three cells a shape crosses, per row (or column) of the grid.
MOTIONS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "left to right": tuple(tuple(POSITIONS[r * 3 + c] for c in range(3)) for r in range(3)),
    "right to left": tuple(tuple(POSITIONS[r * 3 + c] for c in (2, 1, 0)) for r in range(3)),
    "top to bottom": tuple(tuple(POSITIONS[r * 3 + c] for r in range(3)) for c in range(3)),
    "bottom to top": tuple(tuple(POSITIONS[r * 3 + c] for r in (2, 1, 0)) for c in range(3)),
}
VIDEO_FRAMES = 3
# Stage-2 rows of each OneVision type, as a share of n_finetune (on top of it). Measured (800 stage-2 steps,
# docs/demo.md): two-turn two-image rows at 1/3 reached 98% held-out; "which of the two images has the red
# shape?" (first / second) stayed at always-`second` at 1/6 and 1/3, with a 4-layer LM and with ordinal turns.
MULTI_SHARE = {"two images": 1 / 3, "motion": 1 / 6}
# Uniform-guess rate per eval question type (one answer drawn from the answer set).
CHANCE: dict[str, float] = {
    "colour": 1 / len(COLORS),
    "shape": 1 / len(SHAPES),
    "position": 1 / len(POSITIONS),
    "count": 1 / len(COUNTS),
    # Half the questions ask a colour, half a shape: the mean of the two uniform-guess rates.
    "two images": (1 / len(COLORS) + 1 / len(SHAPES)) / 2,
    "motion": 1 / len(MOTIONS),
}

SHORT_ANSWER = "Answer the question using a single word or phrase."
CAPTION_INSTRUCTIONS = (
    "Describe the image briefly.",
    "Give a short caption of the image.",
    "Write a terse but informative summary of the picture.",
    "Share a concise interpretation of the image provided.",
    "Provide a brief description of the given image.",
    "Summarize the visual content of the image.",
    "Render a clear and concise summary of the photo.",
)
QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": ("What color is the shape?", "What is the color of the object?", "Which color is the shape?"),
    "shape": ("What shape is shown?", "What is the shape of the object?", "Which shape is in the image?"),
    "position": (
        "Where is the shape?",
        "Where is the object in the image?",
        "In which part of the image is the shape?",
    ),
    "size": ("Is the shape small or large?", "What size is the object?"),
    "count": ("How many shapes are there?", "How many objects are in the image?", "Count the shapes in the image."),
    "describe": ("Describe the image.", "What do you see in the image?", "Describe the shapes in the image."),
    "colour in image": (
        "What color is the shape in the {} image?",
        "What is the color of the object in the {} image?",
    ),
    "shape in image": ("What shape is in the {} image?", "What is the shape of the object in the {} image?"),
    "motion": ("Where does the shape move?", "In which direction does the shape move?"),
}
# Text-only rows (as ShareGPT rows in LLaVA's 665K mix): no image key, answers from general knowledge.
TEXT_ONLY: tuple[tuple[str, str], ...] = (
    ("How many sides does a triangle have?", "3"),
    ("How many corners does a square have?", "4"),
    ("What color do you get when you mix red and yellow?", "orange"),
    ("What color do you get when you mix blue and yellow?", "green"),
    ("What color do you get when you mix red and blue?", "purple"),
    ("Which shape has no corners?", "circle"),
    ("Which shape has three corners?", "triangle"),
    ("Which shape has four equal sides?", "square"),
)


@dataclass(frozen=True)
class Item:
    """One drawn shape."""

    color: str
    shape: str
    position: str
    size: str

    def phrase(self) -> str:
        """`a large red circle at the top left`."""
        where = "the center" if self.position == "center" else f"the {self.position}"
        return f"a {self.size} {self.color} {self.shape} at {where}"


@dataclass(frozen=True)
class DemoData:
    """Paths of a generated demo data set (all JSON files are LLaVA-format lists)."""

    root: Path
    image_folder: Path
    pretrain: Path
    finetune: Path
    eval: Path
    meta: Path


def caption(items: list[Item]) -> str:
    """The stage-1 caption: shapes in reading order joined by `and`."""
    return " and ".join(i.phrase() for i in sorted(items, key=lambda i: POSITIONS.index(i.position)))


def describe(items: list[Item]) -> str:
    """The free-form stage-2 description: `There is a ... .` / `There are 2 shapes: ... .`"""
    if len(items) == 1:
        return f"There is {caption(items)}."
    return f"There are {len(items)} shapes: {caption(items)}."


# (width, height) in units of image_size / 64 for `mixed_sizes` (the anyres demo): square, wide, tall.
MIXED_SIZES = ((64, 64), (96, 64), (128, 64), (64, 96), (64, 128))


def draw(items: list[Item], image_size: int, rng: random.Random, width: int | None = None) -> Image.Image:
    """Render shapes on a light, slightly noisy background (noise keeps the task from being trivially linear).

    The image is `width` x `image_size` (width None = square); the 3 x 3 position grid spans the whole
    image and shapes keep their proportions (radius from the smaller cell side)."""
    height = image_size
    width = width or image_size
    base = 235 + rng.randrange(16)
    # Speckle about 1 pixel in 8 a little darker (numpy: a per-pixel Python loop dominated generation time).
    noise = np.random.default_rng(rng.randrange(2**32))
    dark = base - noise.integers(0, 20, (height, width))
    gray = np.where(noise.random((height, width)) < 1 / 8, dark, base).astype(np.uint8)
    img = Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")
    canvas = ImageDraw.Draw(img)
    cell_x, cell_y = width / 3, height / 3
    cell = min(cell_x, cell_y)
    for it in items:
        row, col = divmod(POSITIONS.index(it.position), 3)
        cx = (col + 0.5) * cell_x + rng.uniform(-0.08, 0.08) * cell
        cy = (row + 0.5) * cell_y + rng.uniform(-0.08, 0.08) * cell
        r = cell * (0.42 if it.size == "large" else 0.32)
        fill = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in COLORS[it.color])
        if it.shape == "circle":
            canvas.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif it.shape == "square":
            s = r * 0.9
            canvas.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        else:
            canvas.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    return img


def _train_pairs(position: str) -> list[tuple[str, str]]:
    """Colour x shape pairs that training may draw at `position` (the triple is not held out)."""
    return [(c, s) for c in COLORS for s in SHAPES if (c, s, position) not in HELD_OUT]


def _items(rng: random.Random, count: int, held_out: bool) -> list[Item]:
    """`count` shapes in distinct cells; with `held_out` the first is a held-out triple, the rest training triples."""
    items = []
    if held_out:
        color, shape, first = rng.choice(HELD_OUT)
        items.append(Item(color, shape, first, rng.choice(SIZES)))
        cells = rng.sample([p for p in POSITIONS if p != first], count - 1)
    else:
        cells = rng.sample(POSITIONS, count)
    for pos in cells:
        color, shape = rng.choice(_train_pairs(pos))
        items.append(Item(color, shape, pos, rng.choice(SIZES)))
    return items


def _with_image(question: str, rng: random.Random, after_share: float = 0.1) -> str:
    # As in LLaVA's data, the image tag usually leads the first turn, sometimes trails it.
    return f"{question}\n<image>" if rng.random() < after_share else f"<image>\n{question}"


def _answer(kind: str, items: list[Item]) -> str:
    first = items[0]
    return {
        "colour": first.color,
        "shape": first.shape,
        "position": first.position,
        "size": first.size,
        "count": str(len(items)),
        "describe": describe(items),
    }[kind]


def _question(kind: str, rng: random.Random) -> str:
    q = rng.choice(QUESTIONS[kind])
    return q if kind == "describe" else f"{q}\n{SHORT_ANSWER}"


def _objects(items: list[Item]) -> list[dict[str, str]]:
    # Ground truth per record (ignored by training, which reads only id/image/conversations).
    return [asdict(i) for i in items]


class _Canvas:
    """Image sizes of one split: square, or with `mixed` one of MIXED_SIZES per image from its own RNG stream
    (so the square demo's data are unchanged)."""

    def __init__(self, image_size: int, mixed: bool, stream: str) -> None:
        self.image_size, self.mixed, self.rng = image_size, mixed, random.Random(stream)

    def draw(self, items: list[Item], rng: random.Random) -> Image.Image:
        if not self.mixed:
            return draw(items, self.image_size, rng)
        w, h = self.rng.choice(MIXED_SIZES)
        scale = self.image_size / 64
        return draw(items, round(h * scale), rng, width=round(w * scale))


def _save(img: Image.Image, image_folder: Path, rel: str) -> None:
    path = image_folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", compress_level=1)  # fast zlib: writing dominated generation
