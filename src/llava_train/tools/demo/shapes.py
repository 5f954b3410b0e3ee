"""Synthetic shapes data in LLaVA format: PNG images, stage-1 captions, stage-2 Q&A, and a held-out eval split.

Every image holds 1-3 coloured shapes on a 3x3 grid. The eval split's subject is always a
(colour, shape, position) triple that never appears in training (`HELD_OUT`), while every pair of
those attributes (colour x shape, colour x position, shape x position) does appear in training:
no pair the model has seen predicts a wrong answer, yet the exact combination is new. (Holding out
colour x shape *pairs* instead taught the tiny model to answer shape from colour: each colour was
seen only with the other shapes, and held-out shape accuracy fell below chance.) Everything is drawn
from seeded RNGs: the same arguments give byte-identical files.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
# The OneVision demo's extra question types: which of two images holds a shape (a multi-image row) and
# where a shape moves over three frames (a video row).
MULTI_TYPES = ("which image", "motion")
WHICH = ("first", "second")
# Direction -> the three cells a shape crosses, per row (or column) of the grid.
MOTIONS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "left to right": tuple(tuple(POSITIONS[r * 3 + c] for c in range(3)) for r in range(3)),
    "right to left": tuple(tuple(POSITIONS[r * 3 + c] for c in (2, 1, 0)) for r in range(3)),
    "top to bottom": tuple(tuple(POSITIONS[r * 3 + c] for r in range(3)) for c in range(3)),
    "bottom to top": tuple(tuple(POSITIONS[r * 3 + c] for r in (2, 1, 0)) for c in range(3)),
}
VIDEO_FRAMES = 3
# Stage-2 rows of each OneVision type, as a share of n_finetune (on top of it). Measured (800 stage-2 steps):
# with 1/6 two-image rows the tiny LM stayed at chance on `which image` (42% held-out, 58% on its training
# rows) while the video rows reached 94%.
MULTI_SHARE = {"which image": 1 / 3, "motion": 1 / 6}
# Uniform-guess rate per eval question type (one answer drawn from the answer set).
CHANCE: dict[str, float] = {
    "colour": 1 / len(COLORS),
    "shape": 1 / len(SHAPES),
    "position": 1 / len(POSITIONS),
    "count": 1 / len(COUNTS),
    "which image": 1 / len(WHICH),
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
    "which image": ("Which of the two images has the {}?", "Which image shows the {}?"),
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


def _pretrain_rows(n: int, rng: random.Random, image_folder: Path, canvas: _Canvas) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        items = _items(rng, rng.choice(COUNTS), held_out=False)
        rel = f"pretrain/{i:06d}.png"
        _save(canvas.draw(items, rng), image_folder, rel)
        human = _with_image(rng.choice(CAPTION_INSTRUCTIONS), rng, after_share=0.5)
        rows.append(
            {
                "id": f"pretrain-{i:06d}",
                "image": rel,
                "objects": _objects(items),
                "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": caption(items)}],
            }
        )
    return rows


def _finetune_rows(n: int, rng: random.Random, image_folder: Path, canvas: _Canvas) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    n_text = max(1, n // 40) if n >= 10 else 0
    for i in range(n - n_text):
        # Half the images hold one shape: colour/shape/position/size questions need a single subject.
        count = 1 if rng.random() < 0.5 else rng.choice(COUNTS[1:])
        items = _items(rng, count, held_out=False)
        rel = f"finetune/{i:06d}.png"
        _save(canvas.draw(items, rng), image_folder, rel)
        if count == 1:
            # Shape is the hardest attribute for the tiny random vision tower: every single-shape
            # image asks it (measured, 800 steps: shape 46% held-out when asked in ~1/4 of rows).
            others = ["colour", "position", "size", "count", "describe"]
            rng.shuffle(others)
            kinds = ["shape"] + others[: rng.randint(1, 3)]
            rng.shuffle(kinds)
        else:
            kinds = ["count", "describe"]
            rng.shuffle(kinds)
            kinds = kinds[: rng.randint(1, 2)]
        conv = []
        for t, kind in enumerate(kinds):
            q = _question(kind, rng)
            conv.append({"from": "human", "value": _with_image(q, rng) if t == 0 else q})
            conv.append({"from": "gpt", "value": _answer(kind, items)})
        # `type` scores the last turn (the reference eval uses); `types` lists every turn's type.
        rows.append(
            {
                "id": f"finetune-{i:06d}",
                "image": rel,
                "type": kinds[-1],
                "types": kinds,
                "objects": _objects(items),
                "conversations": conv,
            }
        )
    for j in range(n_text):
        q, a = TEXT_ONLY[j % len(TEXT_ONLY)]
        conv = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        rows.append({"id": f"text-{j:06d}", "type": "text", "types": ["text"], "conversations": conv})
    rng.shuffle(rows)
    return rows


def _eval_rows(n: int, rng: random.Random, image_folder: Path, canvas: _Canvas) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        kind = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        # Counts are balanced in eval so the majority answer is not a shortcut.
        count = COUNTS[(i // len(QUESTION_TYPES)) % len(COUNTS)] if kind == "count" else 1
        items = _items(rng, count, held_out=True)
        rel = f"eval/{i:06d}.png"
        _save(canvas.draw(items, rng), image_folder, rel)
        conv = [
            {"from": "human", "value": _with_image(_question(kind, rng), rng, after_share=0.0)},
            {"from": "gpt", "value": _answer(kind, items)},
        ]
        rows.append(
            {"id": f"eval-{i:06d}", "image": rel, "type": kind, "objects": _objects(items), "conversations": conv}
        )
    return rows


def _which_rows(n: int, rng: random.Random, image_folder: Path, split: str, held_out: bool) -> list[dict[str, Any]]:
    """Two-image rows: one shape per square image, and a question naming the colour (or the shape) of one of
    them, which the other lacks; the answer is `first` or `second`. With `held_out` the named image's shape
    is a held-out triple (the other a training triple)."""
    rows = []
    for i in range(n):
        subject = _items(rng, 1, held_out)[0]
        by_colour = rng.random() < 0.5
        while True:
            other = _items(rng, 1, False)[0]
            if (other.color != subject.color) if by_colour else (other.shape != subject.shape):
                break
        answer = rng.randrange(2)
        pair = [other, other]
        pair[answer] = subject
        rels = []
        for k, item in enumerate(pair):
            rel = f"{split}_which/{i:06d}_{k}.png"
            _save(draw([item], 64, rng), image_folder, rel)
            rels.append(rel)
        named = f"{subject.color} shape" if by_colour else subject.shape
        q = f"{rng.choice(QUESTIONS['which image']).format(named)}\n{SHORT_ANSWER}"
        conv = [{"from": "human", "value": f"<image>\n<image>\n{q}"}, {"from": "gpt", "value": WHICH[answer]}]
        rows.append(
            {
                "id": f"{split}-which-{i:06d}",
                "image": rels,
                "type": "which image",
                "types": ["which image"],
                "objects": _objects(pair),
                "conversations": conv,
            }
        )
    return rows


def _motion_rows(n: int, rng: random.Random, image_folder: Path, split: str, held_out: bool) -> list[dict[str, Any]]:
    """Video rows: VIDEO_FRAMES square frames of one shape crossing a row or column of the grid, asked where it
    moves (`left to right`, ...). With `held_out` one frame shows a held-out triple; training paths never do."""
    rows = []
    for i in range(n):
        while True:
            direction = rng.choice(list(MOTIONS))
            path = rng.choice(MOTIONS[direction])
            if held_out:
                color, shape, where = rng.choice(HELD_OUT)
                if where in path:
                    break
            else:
                color, shape = rng.choice([(c, s) for c in COLORS for s in SHAPES])
                if all((color, shape, p) not in HELD_OUT for p in path):
                    break
        size = rng.choice(SIZES)
        frames = [Item(color, shape, where, size) for where in path]
        rels = []
        for k, item in enumerate(frames):
            rel = f"{split}_video/{i:06d}/{k}.png"
            _save(draw([item], 64, rng), image_folder, rel)
            rels.append(rel)
        q = f"{rng.choice(QUESTIONS['motion'])}\n{SHORT_ANSWER}"
        conv = [{"from": "human", "value": f"<video>\n{q}"}, {"from": "gpt", "value": direction}]
        rows.append(
            {
                "id": f"{split}-motion-{i:06d}",
                "video": rels,
                "type": "motion",
                "types": ["motion"],
                "objects": _objects(frames[:1]),
                "conversations": conv,
            }
        )
    return rows


def generate(
    out_dir: str | Path,
    n_pretrain: int = 2000,
    n_finetune: int = 3000,
    n_eval: int = 200,
    image_size: int = 64,
    seed: int = 0,
    mixed_sizes: bool = False,
    multi: bool = False,
) -> DemoData:
    """Write the demo data set under `out_dir` and return its paths.

    Layout: `images/{pretrain,finetune,eval}/NNNNNN.png`, `pretrain.json` (stage-1 captions),
    `finetune.json` (stage-2 multi-turn Q&A, ~2.5% text-only rows), `eval.json` (single-question,
    subject a held-out colour x shape x position triple, question types cycling
    colour/shape/position/count) and `meta.json` (vocabulary, held-out triples, chance rate per
    type, sizes). Every image row carries
    its ground truth in `objects` (colour, shape, position, size of each shape). Each split draws from its
    own RNG stream, so changing one split's size leaves the others unchanged. `mixed_sizes` draws each
    image at one of MIXED_SIZES (square, wide, tall; the anyres demo) instead of image_size squared. `multi`
    (the OneVision demo) adds two-image rows and three-frame video rows (`MULTI_TYPES`) to the stage-2 split
    (one sixth of n_finetune each, on top) and to the eval split (`eval.json` then cycles six types; the
    video rows go to `eval_video.json`, which `llava-train eval` does not read).
    """
    if min(n_pretrain, n_finetune, n_eval) < 0:
        raise ValueError(f"sample counts must be >= 0, got {n_pretrain}, {n_finetune}, {n_eval}")
    if image_size < 24:
        raise ValueError(f"image_size must be >= 24 pixels to draw a 3x3 grid, got {image_size}")
    root = Path(out_dir)
    image_folder = root / "images"
    image_folder.mkdir(parents=True, exist_ok=True)
    splits = {
        split: rows(
            n, random.Random(f"{seed}-{split}"), image_folder, _Canvas(image_size, mixed_sizes, f"{seed}-{split}-size")
        )
        for split, rows, n in (
            ("pretrain", _pretrain_rows, n_pretrain),
            ("finetune", _finetune_rows, n_finetune),
            ("eval", _eval_rows, n_eval),
        )
    }
    types = QUESTION_TYPES
    if multi:
        types = QUESTION_TYPES + MULTI_TYPES
        rng = random.Random(f"{seed}-multi")
        train = _which_rows(round(n_finetune * MULTI_SHARE["which image"]), rng, image_folder, "finetune", False)
        train += _motion_rows(round(n_finetune * MULTI_SHARE["motion"]), rng, image_folder, "finetune", False)
        splits["finetune"] = splits["finetune"] + train
        rng.shuffle(splits["finetune"])
        # Eval: each of the six types gets n_eval / 6 rows (the four single-image types keep their order).
        per = n_eval // len(types)
        singles = [r for r in splits["eval"] if r["type"] in QUESTION_TYPES][: per * len(QUESTION_TYPES)]
        splits["eval"] = singles + _which_rows(per, rng, image_folder, "eval", True)
        splits["eval_video"] = _motion_rows(per, rng, image_folder, "eval", True)
    for name, rows in splits.items():
        (root / f"{name}.json").write_text(json.dumps(rows, indent=1))
    meta = {
        "seed": seed,
        "image_size": image_size,
        "mixed_sizes": mixed_sizes,
        "counts": {k: len(v) for k, v in splits.items()},
        "colors": list(COLORS),
        "shapes": list(SHAPES),
        "positions": list(POSITIONS),
        "sizes": list(SIZES),
        "held_out_triples": [list(t) for t in HELD_OUT],
        "question_types": list(types),
        "chance": {t: CHANCE[t] for t in types},
    }
    (root / "meta.json").write_text(json.dumps(meta, indent=1))
    return DemoData(
        root, image_folder, root / "pretrain.json", root / "finetune.json", root / "eval.json", root / "meta.json"
    )


def corpus(paths: list[str | Path]) -> list[str]:
    """Every human/gpt text of the given LLaVA JSON files, `<image>` removed: the tiny tokenizer's training text."""
    lines: list[str] = []
    for p in paths:
        for row in json.loads(Path(p).read_text()):
            for turn in row["conversations"]:
                text = turn["value"].replace("<image>", "").replace("<video>", "").strip()
                lines.extend(line for line in text.split("\n") if line.strip())
    return lines
