"""Synthetic shapes data in LLaVA format from the demo's world (`tools.demo.shapes`): PNG images, stage-1 captions,
stage-2 Q&A (OneVision: two-image and frame-sequence rows too), and a held-out eval split. Everything is drawn from
seeded RNGs: the same arguments give byte-identical files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from llava_train.tools.demo.shapes import (
    CAPTION_INSTRUCTIONS,
    CHANCE,
    COLORS,
    COUNTS,
    HELD_OUT,
    MOTIONS,
    MULTI_SHARE,
    MULTI_TYPES,
    ORDINALS,
    POSITIONS,
    QUESTION_TYPES,
    QUESTIONS,
    SHAPES,
    SHORT_ANSWER,
    SIZES,
    TEXT_ONLY,
    DemoData,
    Item,
    _answer,
    _Canvas,
    _items,
    _objects,
    _question,
    _save,
    _with_image,
    caption,
    draw,
)


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


def _pair_rows(n: int, rng: random.Random, image_folder: Path, split: str, held_out: bool) -> list[dict[str, Any]]:
    """Two-image rows: one shape per square image, the two shapes differing in colour and in shape, and questions
    naming an image by its place ("What color is the shape in the second image?"). A training row asks about both
    images (two turns, random order, colour or shape each); with `held_out` (eval) the row asks one question,
    about the image whose shape is a held-out triple (the other is a training triple). The other image never
    has the asked colour or shape, so a model that reads the images in the wrong order answers wrongly."""
    rows = []
    for i in range(n):
        subject = _items(rng, 1, held_out)[0]
        while True:
            other = _items(rng, 1, False)[0]
            if other.color != subject.color and other.shape != subject.shape:
                break
        at = rng.randrange(2)
        pair = [other, other]
        pair[at] = subject
        rels = []
        for k, item in enumerate(pair):
            rel = f"{split}_pair/{i:06d}_{k}.png"
            _save(draw([item], 64, rng), image_folder, rel)
            rels.append(rel)
        conv = []
        for turn, k in enumerate([at] if held_out else rng.sample(range(2), 2)):
            attr = rng.choice(("colour", "shape"))
            q = rng.choice(QUESTIONS[f"{attr} in image"]).format(ORDINALS[k])
            first = "<image>\n<image>\n" if turn == 0 else ""
            answer = pair[k].color if attr == "colour" else pair[k].shape
            conv += [{"from": "human", "value": f"{first}{q}\n{SHORT_ANSWER}"}, {"from": "gpt", "value": answer}]
        rows.append(
            {
                "id": f"{split}-pair-{i:06d}",
                "image": rels,
                "type": "two images",
                "types": ["two images"],
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
    (`MULTI_SHARE` of n_finetune each, on top) and to the eval split (`eval.json` then cycles six types; the
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
        train = _pair_rows(round(n_finetune * MULTI_SHARE["two images"]), rng, image_folder, "finetune", False)
        train += _motion_rows(round(n_finetune * MULTI_SHARE["motion"]), rng, image_folder, "finetune", False)
        splits["finetune"] = splits["finetune"] + train
        rng.shuffle(splits["finetune"])
        # Eval: each of the six types gets n_eval / 6 rows (the four single-image types keep their order).
        per = n_eval // len(types)
        singles = [r for r in splits["eval"] if r["type"] in QUESTION_TYPES][: per * len(QUESTION_TYPES)]
        splits["eval"] = singles + _pair_rows(per, rng, image_folder, "eval", True)
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
