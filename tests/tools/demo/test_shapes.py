"""Tests of the synthetic shapes data generator: format, ground truth, held-out split, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from llava_train.tools.demo import shapes
from llava_train.tools.demo.shapes import (
    COLORS,
    HELD_OUT,
    POSITIONS,
    SHAPES,
    Item,
    caption,
    describe,
)
from llava_train.tools.demo.splits import corpus, generate


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> shapes.DemoData:
    return generate(tmp_path_factory.mktemp("shapes"), n_pretrain=40, n_finetune=80, n_eval=24, seed=3)


def _rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def test_layout_and_counts(data: shapes.DemoData) -> None:
    assert len(_rows(data.pretrain)) == 40
    assert len(_rows(data.finetune)) == 80
    assert len(_rows(data.eval)) == 24
    meta = json.loads(data.meta.read_text())
    assert meta["counts"] == {"pretrain": 40, "finetune": 80, "eval": 24}
    assert meta["held_out_triples"] == [list(t) for t in HELD_OUT]
    assert meta["held_out_triples"][:3] == [
        ["red", "circle", "top left"],
        ["red", "square", "bottom left"],
        ["red", "triangle", "middle left"],
    ]
    assert meta["chance"] == {"colour": 1 / 6, "shape": 1 / 3, "position": 1 / 9, "count": 1 / 3}
    for split in ("pretrain", "finetune", "eval"):
        for row in _rows(data.root / f"{split}.json"):
            if "image" not in row:
                continue
            assert row["image"].startswith(f"{split}/")
            with Image.open(data.image_folder / row["image"]) as img:
                assert (img.format, img.mode, img.size) == ("PNG", "RGB", (64, 64))


def test_phrases() -> None:
    a = Item("red", "circle", "top left", "large")
    b = Item("blue", "square", "center", "small")
    assert a.phrase() == "a large red circle at the top left"
    assert caption([b, a]) == "a large red circle at the top left and a small blue square at the center"
    assert describe([a]) == "There is a large red circle at the top left."
    assert describe([b, a]) == (
        "There are 2 shapes: a large red circle at the top left and a small blue square at the center."
    )


def test_pretrain_rows_are_captions(data: shapes.DemoData) -> None:
    afters = 0
    for row in _rows(data.pretrain):
        human, gpt = row["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert human["value"].count("<image>") == 1
        assert human["value"].startswith("<image>\n") or human["value"].endswith("\n<image>")
        afters += human["value"].endswith("\n<image>")
        assert human["value"].replace("<image>", "").strip() in shapes.CAPTION_INSTRUCTIONS
        items = [Item(**o) for o in row["objects"]]
        assert gpt["value"] == caption(items)
        assert 1 <= len(items) <= 3
        assert len({i.position for i in items}) == len(items)
    # Both placements of the image tag occur, as in the 558K captions.
    assert 0 < afters < 40


def test_finetune_rows(data: shapes.DemoData) -> None:
    rows = _rows(data.finetune)
    text_only = [r for r in rows if "image" not in r]
    assert len(text_only) == 2  # 80 // 40
    for row in text_only:
        assert row["type"] == "text"
        assert all("<image>" not in t["value"] for t in row["conversations"])
    for row in rows:
        conv = row["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert len(conv) // 2 == len(row["types"])
        assert row["type"] == row["types"][-1]
        if "image" not in row:
            continue
        items = [Item(**o) for o in row["objects"]]
        # Every single-shape image asks its shape (the hardest attribute for the tiny vision tower).
        assert ("shape" in row["types"]) == (len(items) == 1)
        assert sum(t["value"].count("<image>") for t in conv) == 1
        assert "<image>" in conv[0]["value"]
        for kind, answer in zip(row["types"], conv[1::2]):
            expected = {
                "colour": items[0].color,
                "shape": items[0].shape,
                "position": items[0].position,
                "size": items[0].size,
                "count": str(len(items)),
                "describe": describe(items),
            }[kind]
            assert answer["value"] == expected
            if kind in ("colour", "shape", "position", "size"):
                assert len(items) == 1


def test_held_out_triples_design() -> None:
    """18 of 162 triples held out; every attribute pair keeps training triples; every answer is asked."""
    assert len(HELD_OUT) == len(set(HELD_OUT)) == 18
    train = {(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS} - set(HELD_OUT)
    for c, s, p in HELD_OUT:
        # Each pair of the held-out triple's attributes is seen in training with another third attribute.
        assert any((c, s) == (tc, ts) for tc, ts, _ in train)
        assert any((c, p) == (tc, tp) for tc, _, tp in train)
        assert any((s, p) == (ts, tp) for _, ts, tp in train)
    # Every pair of attributes (not only the held-out ones) has >= 2 training triples.
    for c in COLORS:
        for s in SHAPES:
            assert sum((c, s) == (tc, ts) for tc, ts, _ in train) == len(POSITIONS) - 1
        for p in POSITIONS:
            assert sum((c, p) == (tc, tp) for tc, _, tp in train) >= len(SHAPES) - 1
    for s in SHAPES:
        for p in POSITIONS:
            assert sum((s, p) == (ts, tp) for _, ts, tp in train) >= len(COLORS) - 1
    # Every colour, shape and position is an answer somewhere in the held-out split.
    assert {t[0] for t in HELD_OUT} == set(COLORS)
    assert {t[1] for t in HELD_OUT} == set(SHAPES)
    assert {t[2] for t in HELD_OUT} == set(POSITIONS)


def _triples(rows: list[dict]) -> list[tuple[str, str, str]]:
    return [(o["color"], o["shape"], o["position"]) for r in rows for o in r.get("objects", [])]


def test_held_out_triples_split(tmp_path: Path) -> None:
    data = generate(tmp_path, n_pretrain=300, n_finetune=400, n_eval=120, seed=5)
    train = _triples(_rows(data.pretrain)) + _triples(_rows(data.finetune))
    # No held-out triple appears anywhere in training (pretrain captions or finetune Q&A).
    assert not set(train) & set(HELD_OUT)
    rows = _rows(data.eval)
    assert [r["type"] for r in rows[:8]] == ["colour", "shape", "position", "count"] * 2
    seen_pairs = {
        "colour x shape": {(c, s) for c, s, _ in train},
        "colour x position": {(c, p) for c, _, p in train},
        "shape x position": {(s, p) for _, s, p in train},
    }
    for row in rows:
        c, s, p = (row["objects"][0][k] for k in ("color", "shape", "position"))
        assert (c, s, p) in HELD_OUT
        # Every pair of the subject's attributes was seen in training: only the combination is new.
        assert (c, s) in seen_pairs["colour x shape"]
        assert (c, p) in seen_pairs["colour x position"]
        assert (s, p) in seen_pairs["shape x position"]
        # Extra shapes of count questions are ordinary training triples in other cells.
        assert not set(_triples([{"objects": row["objects"][1:]}])) & set(HELD_OUT)
        assert len({o["position"] for o in row["objects"]}) == len(row["objects"])
        human, gpt = row["conversations"]
        assert human["value"].startswith("<image>\n")
        if row["type"] != "count":
            assert len(row["objects"]) == 1
    # Eval counts are balanced 1/2/3.
    counts = [r["conversations"][1]["value"] for r in rows if r["type"] == "count"]
    assert counts == ["1", "2", "3"] * 10
    # Shape questions in eval are not dominated by one answer (no majority shortcut).
    shape_answers = [r["conversations"][1]["value"] for r in rows if r["type"] == "shape"]
    assert set(shape_answers) == set(SHAPES)


def test_drawn_colour_at_shape_centre(data: shapes.DemoData) -> None:
    checked = 0
    for row in _rows(data.eval):
        (o,) = row["objects"][:1]
        if len(row["objects"]) != 1 or o["size"] != "large":
            continue
        r, c = divmod(POSITIONS.index(o["position"]), 3)
        with Image.open(data.image_folder / row["image"]) as img:
            # The centre jitters by <= 8% of a cell; a large shape covers the cell centre +-4 px.
            px = img.getpixel((int((c + 0.5) * 64 / 3), int((r + 0.5) * 64 / 3 + 2)))
        assert all(abs(a - b) <= 15 for a, b in zip(px, COLORS[o["color"]])), (row["id"], px, o)
        checked += 1
    assert checked >= 3


def test_deterministic(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", 5, 10, 4, seed=7)
    b = generate(tmp_path / "b", 5, 10, 4, seed=7)
    c = generate(tmp_path / "c", 5, 10, 4, seed=8)
    for name in ("pretrain.json", "finetune.json", "eval.json", "meta.json"):
        assert (a.root / name).read_bytes() == (b.root / name).read_bytes()
    assert (a.image_folder / "eval/000003.png").read_bytes() == (b.image_folder / "eval/000003.png").read_bytes()
    assert a.pretrain.read_text() != c.pretrain.read_text()
    # Splits draw from independent streams: a bigger eval split leaves the training data unchanged.
    d = generate(tmp_path / "d", 5, 10, 8, seed=7)
    assert d.pretrain.read_bytes() == a.pretrain.read_bytes()
    assert d.finetune.read_bytes() == a.finetune.read_bytes()


def test_corpus(data: shapes.DemoData) -> None:
    lines = corpus([data.pretrain, data.finetune])
    assert all("<image>" not in line and line.strip() for line in lines)
    assert shapes.SHORT_ANSWER in lines
    assert caption([Item(**o) for o in _rows(data.pretrain)[0]["objects"]]) in lines


def test_generate_rejects_bad_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"sample counts must be >= 0, got 1, -1, 1"):
        generate(tmp_path, 1, -1, 1)
    with pytest.raises(ValueError, match="image_size must be >= 24 pixels to draw a 3x3 grid, got 16"):
        generate(tmp_path, 1, 1, 1, image_size=16)
    assert SHAPES == ("circle", "square", "triangle")


def test_onevision_rows_two_images_and_frames(tmp_path: Path) -> None:
    d = generate(tmp_path / "ov", n_pretrain=4, n_finetune=60, n_eval=24, seed=1, multi=True)
    meta = _rows(d.meta)
    assert meta["question_types"] == [*shapes.QUESTION_TYPES, *shapes.MULTI_TYPES]
    assert meta["chance"]["two images"] == 0.25 and meta["chance"]["motion"] == 0.25
    train = _rows(d.finetune)
    evals = _rows(d.eval) + _rows(d.root / "eval_video.json")
    assert sorted(r["type"] for r in evals) == sorted(meta["question_types"] * 4)
    asked = set()
    for row in train + evals:
        items = [Item(**o) for o in row.get("objects", [])]
        answer = row["conversations"][-1]["value"]
        if row.get("type") == "two images":
            conv = row["conversations"]
            assert conv[0]["value"].startswith("<image>\n<image>\n") and len(row["image"]) == 2
            assert len(conv) == (2 if row in evals else 4)
            first, second = items
            assert first.color != second.color and first.shape != second.shape
            for q, a in zip(conv[::2], conv[1::2]):
                k = 0 if " first image?" in q["value"] else 1
                assert f" {shapes.ORDINALS[k]} image?" in q["value"]
                kind = "color" if "color" in q["value"] else "shape"
                assert a["value"] == getattr(items[k], kind)
                asked.add((row in evals, k, kind))
            if row in train:  # a training row asks about both images
                assert {(" first image?" in q["value"]) for q in conv[::2]} == {True, False}
            for rel in row["image"]:
                assert Image.open(d.image_folder / rel).size == (64, 64)
        elif row.get("type") == "motion":
            assert row["conversations"][0]["value"].startswith("<video>\n") and len(row["video"]) == 3
            (item,) = items
            path = next(p for p in shapes.MOTIONS[answer] if p[0] == item.position)
            triples = {(item.color, item.shape, p) for p in path}
            held = triples & set(HELD_OUT)
            assert bool(held) == (row in evals)
    assert {(False, k, kind) for k in (0, 1) for kind in ("color", "shape")} <= asked
    # The held-out two-image question is about a held-out triple; training never draws one.
    for row in _rows(d.eval):
        if row["type"] == "two images":
            k = 0 if " first image?" in row["conversations"][0]["value"] else 1
            named = Item(**row["objects"][k])
            assert (named.color, named.shape, named.position) in HELD_OUT
            other = Item(**row["objects"][1 - k])
            assert (other.color, other.shape, other.position) not in HELD_OUT
    for row in train:
        for o in row.get("objects", []):
            if row.get("type") != "motion":
                assert (o["color"], o["shape"], o["position"]) not in HELD_OUT
