"""Datasets, images and the collator: sources, bad rows, exact cached lengths, mixtures, batches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from llava_train.config import DataConfig, SourceConfig
from llava_train.data import dataset as dataset_mod
from llava_train.data import scan as scan_mod
from llava_train.data.collator import PaddingCollator
from llava_train.data.dataset import build_dataset, mixture_rows
from llava_train.data.errors import BadSample, BadSampleError, DataFileError
from llava_train.data.images import expand2square, load_image, mean_color, preprocess_images, resolve_image_path
from llava_train.data.rows import open_source
from llava_train.data.templates import get_template
from llava_train.data.tokenize import tokenize_conversation
from llava_train.llava_format import normalize_conversation
from tiny_models import make_parts

IMG = 512
NUM_TOKENS = 16  # tiny CLIP: (32 // 8) ** 2 patches, CLS dropped


def _conv(q: str, a: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    """A folder with images (one wide, one tall, one corrupt) and good rows."""
    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "img" / "wide.png")
    Image.new("RGB", (10, 30), (0, 0, 255)).save(tmp_path / "img" / "tall.jpg")
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return tmp_path


GOOD_ROWS = [
    {"id": "a", "image": "img/wide.png", "conversations": _conv("<image>\nWhat is it?", "A red box."), "x": 1},
    {"id": "b", "conversations": _conv("Hello there", "Yes.")},
    {"id": "c", "image": ["img/wide.png", "img/tall.jpg"], "conversations": _conv("<image> and <image>", "Two.")},
    {"id": "d", "image": "img/tall.jpg", "conversations": _conv("Describe. <image>", "A blue bar.")},
]

BAD_ROWS = [
    ({"id": "m", "image": "img/none.png", "conversations": _conv("<image>\nx", "y")}, "missing_image"),
    ({"id": "k", "image": "img/broken.png", "conversations": _conv("<image>\nx", "y")}, "corrupt_image"),
    ({"id": "n", "image": "img/wide.png", "conversations": _conv("no tag", "y")}, "image_count_mismatch"),
    ({"id": "i", "conversations": _conv("x", "<image> y")}, "image_in_assistant_turn"),
    ({"id": "r", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}, "bad_roles"),
    ({"id": "e", "conversations": []}, "empty_conversation"),
    ({"id": "p", "conversations": _conv("x", "")}, "empty_reply"),
    ({"id": "l", "image": "img/wide.png", "conversations": _conv("<image>\n" + "x " * 200, "y")}, "too_long"),
    ({"id": "s", "image": "../outside.png", "conversations": _conv("<image>\nx", "y")}, "image_path_escapes"),
    ({"id": "t", "image": "/etc/passwd", "conversations": _conv("<image>\nx", "y")}, "image_path_escapes"),
]


def _write_json(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text(json.dumps(rows))
    return str(path)


def _cfg(sources: list[SourceConfig], **kw: Any) -> DataConfig:
    kw.setdefault("model_max_length", 256)
    return DataConfig(train=sources, template="vicuna_v1", **kw)


def _build(cfg: DataConfig, tok: Any, proc: Any, **kw: Any) -> Any:
    cache = None if cfg.cache_dir == "auto" else cfg.cache_dir
    return build_dataset(cfg, make_parts(tok, NUM_TOKENS, IMG, cfg.template, proc), cache_dir=cache, **kw)


def test_json_source_items_lengths_and_collator(data_dir: Path, llama_tokenizer: Any, clip_image_processor: Any):
    src = SourceConfig(_write_json(data_dir / "train.json", GOOD_ROWS), image_folder=str(data_dir))
    ds = _build(_cfg([src]), llama_tokenizer, clip_image_processor)
    assert len(ds) == 4
    template = get_template("vicuna_v1")
    for i, row in enumerate(GOOD_ROWS):
        item = ds[i]
        n = 0 if "image" not in row else (len(row["image"]) if isinstance(row["image"], list) else 1)
        ref = tokenize_conversation(
            normalize_conversation(row["conversations"]), template, llama_tokenizer, IMG, NUM_TOKENS, n
        )
        # Exact cached lengths == tokenized lengths; signed by modality.
        assert ds.lengths[i] == len(ref.input_ids) == item["input_ids"].shape[0]
        assert ds.modality_lengths[i] == (len(ref.input_ids) if n else -len(ref.input_ids))
        assert item["input_ids"].tolist() == ref.input_ids and item["labels"].tolist() == ref.labels
        assert (item["id"], item["source"], item["row"], item["num_images"]) == (row["id"], "train.json", i, n)
        if n:
            assert item["pixel_values"].shape == (n, 3, 32, 32) and item["pixel_values"].dtype == torch.float32
        else:
            assert "pixel_values" not in item
    assert int((ds[0]["input_ids"] == IMG).sum()) == NUM_TOKENS and int((ds[2]["input_ids"] == IMG).sum()) == 32

    collate = PaddingCollator(llama_tokenizer.pad_token_id, pad_to_multiple_of=8)
    batch = collate([ds[0], ds[1], ds[2]])
    longest = max(ds.lengths[:3])
    width = -(-longest // 8) * 8
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)  # 1 + 0 + 2 images, no zero image for the text-only one
    assert batch["num_images"].tolist() == [1, 0, 2] and batch["ids"] == ["a", "b", "c"]
    assert batch["attention_mask"][1].sum() == ds.lengths[1]
    assert (batch["input_ids"][1, ds.lengths[1] :] == 0).all() and (batch["labels"][1, ds.lengths[1] :] == -100).all()
    text_only = collate([ds[1], ds[1]])
    assert "pixel_values" not in text_only and text_only["input_ids"].shape == (2, -(-ds.lengths[1] // 8) * 8)


def test_collator_rejects_batch_without_trained_tokens() -> None:
    item = {"input_ids": torch.tensor([1, 2, 3]), "labels": torch.full((3,), -100), "id": "z1", "num_images": 0}
    with pytest.raises(ValueError, match=r"batch has no trained token .* sample ids: \['z1', 'z1'\]"):
        PaddingCollator(0)([item, item])


@pytest.mark.parametrize(("row", "reason"), BAD_ROWS, ids=[r for _, r in BAD_ROWS])
def test_every_bad_input_class(row, reason, data_dir: Path, llama_tokenizer: Any, clip_image_processor: Any):
    rows = [GOOD_ROWS[1], row]
    src = SourceConfig(_write_json(data_dir / "bad.json", rows), image_folder=str(data_dir))
    with pytest.raises(BadSampleError) as e:
        _build(_cfg([src]), llama_tokenizer, clip_image_processor)
    assert (e.value.source, e.value.row, e.value.sample_id, e.value.reason) == ("bad.json", 1, row["id"], reason)
    assert str(e.value).startswith(f"bad sample in bad.json row 1 (id {row['id']!r}): {reason}: ")
    ds = _build(_cfg([src], on_bad_sample="skip"), llama_tokenizer, clip_image_processor)
    assert len(ds) == 1 and ds.skipped == {reason: 1} and ds[0]["id"] == "b"


def test_jsonl_malformed_line_is_a_bad_row(data_dir: Path, llama_tokenizer: Any, clip_image_processor: Any):
    lines = [json.dumps(GOOD_ROWS[1]), '{"id": "oops", "conversations": [', "", json.dumps(GOOD_ROWS[0])]
    path = data_dir / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    src = SourceConfig(str(path), image_folder=str(data_dir))
    with pytest.raises(BadSampleError, match=r"bad sample in train.jsonl row 1 \(id 1\): malformed_json: .* line 2"):
        _build(_cfg([src]), llama_tokenizer, clip_image_processor)
    ds = _build(_cfg([src], on_bad_sample="skip"), llama_tokenizer, clip_image_processor)
    assert [ds[i]["id"] for i in range(len(ds))] == ["b", "a"] and ds.skipped == {"malformed_json": 1}
    assert [ds[i]["row"] for i in range(len(ds))] == [0, 2]


def test_malformed_json_list_names_file_and_position(data_dir: Path) -> None:
    path = data_dir / "broken.json"
    path.write_text('[\n  {"id": 1},\n  {"id": 2,,}\n]')
    with pytest.raises(ValueError, match=r"malformed JSON in .*broken.json: .* at line 3 column 12 \(char 26\)"):
        open_source(SourceConfig(str(path)))


def test_hf_sources_save_to_disk_and_parquet(data_dir: Path, llama_tokenizer: Any, clip_image_processor: Any):
    import datasets

    rows = [{"id": r["id"], "image": r.get("image"), "conversations": r["conversations"]} for r in GOOD_ROWS[:2]]
    rows[1]["image"] = None
    hf = datasets.Dataset.from_list(rows)
    hf.save_to_disk(str(data_dir / "hf_disk"))
    hf.to_parquet(str(data_dir / "rows.parquet"))
    (data_dir / "shards").mkdir()
    (data_dir / "shards" / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for path in (data_dir / "hf_disk", data_dir / "rows.parquet", data_dir / "shards"):
        ds = _build(_cfg([SourceConfig(str(path), image_folder=str(data_dir))]), llama_tokenizer, clip_image_processor)
        assert len(ds) == 2 and ds[0]["pixel_values"].shape == (1, 3, 32, 32) and "pixel_values" not in ds[1]
        assert ds.modality_lengths[0] > 0 > ds.modality_lengths[1]


def test_mixture_weights_are_deterministic(data_dir: Path, llama_tokenizer: Any, clip_image_processor: Any):
    rows = [{"id": f"r{i}", "conversations": _conv(f"q {i}", "ok")} for i in range(10)]
    a = SourceConfig(_write_json(data_dir / "a.json", rows), weight=0.5)
    b = SourceConfig(_write_json(data_dir / "b.json", rows[:4]), weight=2.0)
    ds1 = _build(_cfg([a, b]), llama_tokenizer, clip_image_processor, seed=3)
    ds2 = _build(_cfg([a, b]), llama_tokenizer, clip_image_processor, seed=3)
    assert len(ds1) == 5 + 8
    assert ds1.item_source.tolist() == [0] * 5 + [1] * 8
    assert ds1.item_row.tolist() == ds2.item_row.tolist()
    assert ds1.item_row[5:].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert len(set(ds1.item_row[:5].tolist())) == 5
    rng = np.random.default_rng(0)
    assert mixture_rows(np.arange(10), 1.5, rng).tolist()[:10] == list(range(10))
    assert len(mixture_rows(np.arange(10), 1.5, rng)) == 15


def test_cache_reuse_does_not_retokenize(data_dir: Path, llama_tokenizer: Any, clip_image_processor: Any, monkeypatch):
    src = SourceConfig(_write_json(data_dir / "train.json", GOOD_ROWS), image_folder=str(data_dir))
    cfg = _cfg([src], cache_dir=str(data_dir / "cache"))
    first = _build(cfg, llama_tokenizer, clip_image_processor)
    assert not first.scans[0].from_cache
    assert isinstance(first.stores[0].shards[0].buf, np.memmap)  # rows are memory-mapped, not a list of dicts
    calls = {"n": 0}
    real = scan_mod.scan_row

    def counting(*args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        return real(*args, **kw)

    monkeypatch.setattr(scan_mod, "scan_row", counting)
    second = _build(cfg, llama_tokenizer, clip_image_processor)
    assert second.scans[0].from_cache and calls["n"] == 0
    assert second.lengths == first.lengths and second.modality_lengths == first.modality_lengths
    # Another max length is another key: the scan runs again.
    third = _build(
        _cfg([src], cache_dir=str(data_dir / "cache"), model_max_length=300), llama_tokenizer, clip_image_processor
    )
    assert not third.scans[0].from_cache and calls["n"] == 4


def test_scan_in_worker_processes_matches(data_dir: Path, llama_tokenizer: Any) -> None:
    rows = GOOD_ROWS + [r for r, _ in BAD_ROWS]
    src = SourceConfig(_write_json(data_dir / "mix.json", rows), image_folder=str(data_dir))
    store = open_source(src)
    ctx = dataset_mod.make_context(_cfg([src]), src, make_parts(llama_tokenizer, NUM_TOKENS, IMG))
    one = scan_mod.scan_source(store, ctx, num_workers=1, chunk_size=3)
    two = scan_mod.scan_source(store, ctx, num_workers=2, chunk_size=3)
    assert one.lengths.tolist() == two.lengths.tolist() and one.bad == two.bad
    assert [b["reason"] for b in one.bad] == [r for _, r in BAD_ROWS]


def test_getitem_raises_when_image_breaks_after_build(data_dir: Path, llama_tokenizer: Any, clip_image_processor):
    src = SourceConfig(_write_json(data_dir / "train.json", GOOD_ROWS[:1]), image_folder=str(data_dir))
    ds = _build(_cfg([src]), llama_tokenizer, clip_image_processor)
    (data_dir / "img" / "wide.png").unlink()
    with pytest.raises(BadSampleError, match=r"bad sample in train.json row 0 \(id 'a'\): missing_image"):
        ds[0]
    # Raised in a DataLoader worker, it reaches the main process with its type and message.
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1, collate_fn=PaddingCollator(0))
    with pytest.raises(BadSampleError, match=r"bad sample in train.json row 0 \(id 'a'\): missing_image"):
        next(iter(loader))


def test_images_pad_resize_crop(data_dir: Path, clip_image_processor: Any, siglip_image_processor: Any) -> None:
    wide = load_image(str(data_dir / "img" / "wide.png"))
    assert wide.mode == "RGB" and wide.size == (40, 20)
    assert mean_color(clip_image_processor) == (122, 116, 104)
    square = expand2square(wide, (122, 116, 104))
    assert square.size == (40, 40)
    assert square.getpixel((0, 0)) == (122, 116, 104) and square.getpixel((20, 20)) == (255, 0, 0)
    assert square.getpixel((20, 9)) == (122, 116, 104) and square.getpixel((20, 10)) == (255, 0, 0)
    for mode in ("pad", "resize", "crop"):
        for proc in (clip_image_processor, siglip_image_processor):
            pv = preprocess_images([wide, wide], proc, mode)
            assert pv.shape == (2, 3, 32, 32) and pv.dtype == torch.float32
    # pad keeps the red box in the middle band only; crop/resize fill the whole frame with red.
    pad = preprocess_images([wide], clip_image_processor, "pad")[0]
    crop = preprocess_images([wide], clip_image_processor, "crop")[0]
    assert pad[0, 0, 16] < 0 < pad[0, 16, 16] and crop[0, 0, 16] > 0
    with pytest.raises(KeyError, match="valid: pad, resize, crop"):
        preprocess_images([wide], clip_image_processor, "stretch")
    with pytest.raises(BadSample, match="corrupt_image"):
        load_image(str(data_dir / "img" / "broken.png"))


def test_image_path_escapes(tmp_path: Path) -> None:
    assert resolve_image_path(str(tmp_path), "a/b.png") == str(tmp_path / "a" / "b.png")
    assert resolve_image_path(str(tmp_path), "a/../b.png") == str(tmp_path / "b.png")
    for bad in ("../x.png", "a/../../x.png", "/abs/x.png"):
        with pytest.raises(BadSample) as e:
            resolve_image_path(str(tmp_path), bad)
        assert e.value.reason == "image_path_escapes"


def test_custom_image_token_reads_llava_tags(data_dir: Path, llama_tokenizer_dir: str, clip_image_processor: Any):
    """`model.image_token: <img>`: LLaVA data with `<image>` tags builds (no image_count_mismatch), and the ids
    carry `<img>` blocks."""
    from llava_train.data.tokenize import load_tokenizer

    tok = load_tokenizer(llama_tokenizer_dir, image_token="<img>")
    img = tok.convert_tokens_to_ids("<img>")
    src = SourceConfig(_write_json(data_dir / "train.json", GOOD_ROWS), image_folder=str(data_dir))
    ds = build_dataset(_cfg([src]), make_parts(tok, NUM_TOKENS, img, "vicuna_v1", clip_image_processor, "<img>"))
    assert len(ds) == 4 and ds.skipped == {}
    assert [int((ds[i]["input_ids"] == img).sum()) for i in range(4)] == [16, 0, 32, 16]


def test_skip_replaces_a_row_that_fails_at_load_time(
    data_dir: Path,
    llama_tokenizer: Any,
    clip_image_processor: Any,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("w1.png", "w2.png"):
        (data_dir / "img" / name).write_bytes((data_dir / "img" / "wide.png").read_bytes())
    rows = [{"id": f"x{k}", "image": f"img/w{k}.png", "conversations": _conv("<image>\nx", "y")} for k in (1, 2)]
    src = SourceConfig(_write_json(data_dir / "two.json", rows), image_folder=str(data_dir))
    skip = _build(_cfg([src], on_bad_sample="skip"), llama_tokenizer, clip_image_processor)
    error = _build(_cfg([src]), llama_tokenizer, clip_image_processor)
    (data_dir / "img" / "w1.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken since the scan")
    item = skip[0]  # x1 fails: x2 (the same length and modality) stands in
    assert (item["id"], item["row"]) == ("x2", 1) and skip.load_skipped == {0}
    (line,) = [r.getMessage() for r in caplog.records if "skipped at load time" in r.getMessage()]
    assert line.startswith("skipped at load time (1): bad sample in two.json row 0 (id 'x1'): corrupt_image: ")
    monkeypatch.setattr(dataset_mod, "MAX_LOAD_SKIPS", 0)
    skip.load_skipped.clear()
    with pytest.raises(BadSampleError, match="more than 0 rows failed at load time in one data process"):
        skip[0]
    # on_bad_sample: error stops, and a DataLoader worker's error reaches the main process as one line.
    loader = torch.utils.data.DataLoader(error, batch_size=None, num_workers=1)
    with pytest.raises(BadSampleError) as e:
        next(iter(loader))
    assert str(e.value).startswith("bad sample in two.json row 0 (id 'x1'): corrupt_image: ")
    assert "\n" not in str(e.value)


def test_no_usable_row_is_one_line_not_an_empty_run(data_dir: Path, llama_tokenizer: Any, clip_image_processor: Any):
    src = SourceConfig(
        _write_json(data_dir / "all_bad.json", [BAD_ROWS[0][0], BAD_ROWS[1][0]]), image_folder=str(data_dir)
    )
    with pytest.raises(DataFileError, match=r"^data.train: no usable row \(every row of its sources is bad"):
        _build(_cfg([src], on_bad_sample="skip"), llama_tokenizer, clip_image_processor)
