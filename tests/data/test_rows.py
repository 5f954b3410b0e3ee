"""Data sources: HF `Image` columns (embedded bytes, lists), parquet / arrow / JSONL shards by folder and glob,
webdataset tars, column mappings and the_cauldron pairs, per-shard scan caches, mixtures across source kinds."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from llava_train.config import DataConfig, SourceConfig
from llava_train.config_io import ConfigError
from llava_train.data import scan as scan_mod
from llava_train.data.dataset import build_dataset, make_context
from llava_train.data.errors import BadSampleError
from llava_train.data.images import ImageRef, image_ref, load_image, verify_image
from llava_train.data.rows import open_source, shard_paths
from llava_train.data.tar_rows import build_tar_index
from llava_train.model.vision import ImageGeometry
from tiny_models import make_parts

IMG = 512
NUM_TOKENS = 16
SIZES = [(40, 20), (10, 30), (24, 24), (33, 17)]  # (width, height)
COLOURS = [(255, 0, 0), (0, 0, 255), (0, 200, 0), (200, 200, 0)]


def _png(k: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", SIZES[k], COLOURS[k]).save(buf, "PNG")
    return buf.getvalue()


def _conv(q: str, a: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


# Row k uses image k; row 2 is text-only; row 3 has two images.
CONVS = [
    _conv("<image>\nWhat is it?", "A red box."),
    _conv("Describe. <image>", "A blue bar."),
    _conv("Hello there", "Yes."),
    _conv("<image> and <image>", "Two."),
]
IMAGES: list[list[int]] = [[0], [1], [], [2, 3]]


@pytest.fixture()
def disk(tmp_path: Path) -> Path:
    """The same rows as LLaVA JSON with image files, the reference every other source must equal."""
    (tmp_path / "img").mkdir()
    for k in range(4):
        (tmp_path / "img" / f"{k}.png").write_bytes(_png(k))
    rows = []
    for i, (conv, imgs) in enumerate(zip(CONVS, IMAGES)):
        row: dict[str, Any] = {"id": f"r{i}", "conversations": conv}
        if imgs:
            row["image"] = [f"{k}.png" for k in imgs]
        rows.append(row)
    (tmp_path / "train.json").write_text(json.dumps(rows))
    return tmp_path


def _hf_rows(corrupt: bool = False) -> Any:
    """A `datasets.Dataset` with an `Image()` column (one image or None) and a `Sequence(Image())` list column."""
    import datasets

    feats = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "images": datasets.Sequence(datasets.Image()),
            "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
        }
    )
    data: dict[str, list] = {"id": [], "image": [], "images": [], "conversations": []}
    for i, (conv, imgs) in enumerate(zip(CONVS, IMAGES)):
        data["id"].append(f"r{i}")
        data["image"].append({"bytes": _png(imgs[0]), "path": None} if len(imgs) == 1 else None)
        data["images"].append([{"bytes": _png(k), "path": f"{k}.png"} for k in imgs])
        data["conversations"].append(conv)
    if corrupt:
        data["id"] += ["broken", "empty"]
        data["image"] += [{"bytes": b"\x89PNG\r\n\x1a\nnot a png", "path": None}, None]
        data["images"] += [[{"bytes": b"\x89PNG\r\n\x1a\nnot a png", "path": None}], [{"bytes": None, "path": None}]]
        data["conversations"] += [CONVS[0], CONVS[0]]
    return datasets.Dataset.from_dict(data, features=feats)


def _cfg(sources: list[SourceConfig], **kw: Any) -> DataConfig:
    kw.setdefault("model_max_length", 256)
    return DataConfig(train=sources, template="vicuna_v1", **kw)


def _build(sources: list[SourceConfig], tok: Any, proc: Any, cache_dir: str | None = None, **kw: Any) -> Any:
    cfg = _cfg(sources, **kw)
    return build_dataset(cfg, make_parts(tok, NUM_TOKENS, IMG, "vicuna_v1", proc), cache_dir=cache_dir)


def _items(ds: Any) -> list[dict[str, Any]]:
    return [ds[i] for i in range(len(ds))]


def _same_items(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["input_ids"].tolist() == y["input_ids"].tolist() and x["labels"].tolist() == y["labels"].tolist()
        assert ("pixel_values" in x) == ("pixel_values" in y) and x["num_images"] == y["num_images"]
        if "pixel_values" in x:
            assert torch.equal(x["pixel_values"], y["pixel_values"])


def test_image_refs_embedded_equal_files(disk: Path) -> None:
    ref = image_ref({"bytes": _png(0), "path": "a.png"}, None, "image 0")
    assert ref.data == _png(0) and str(ref) == "embedded image 0 (a.png)"
    assert verify_image(ref) == verify_image(str(disk / "img" / "0.png")) == (20, 40)
    assert list(load_image(ref).getdata()) == list(load_image(str(disk / "img" / "0.png")).getdata())
    # A struct without bytes is a file relative to the image folder (what `to_parquet` writes for local files).
    assert image_ref({"bytes": None, "path": "img/1.png"}, str(disk), "x").path == str(disk / "img" / "1.png")
    assert verify_image(image_ref(_png(1), None)) == (30, 10)
    assert verify_image(ImageRef(pil=Image.new("RGB", (7, 5)))) == (5, 7)
    for bad, reason in (
        ({"bytes": None, "path": None}, "missing_image"),
        (b"", "missing_image"),
        (3, "missing_image"),
    ):
        with pytest.raises(Exception) as e:
            image_ref(bad, None)
        assert e.value.reason == reason
    with pytest.raises(Exception) as e:
        verify_image(image_ref(b"garbage", None, "image 1"))
    assert e.value.reason == "corrupt_image" and "embedded image 1" in e.value.detail


def test_hf_disk_embedded_images_train_like_files(disk: Path, llama_tokenizer: Any, clip_image_processor: Any):
    """save_to_disk with an `Image` column and a list-of-images column: the same items as the files on disk."""
    _hf_rows().save_to_disk(str(disk / "hf"))
    ref = _items(
        _build(
            [SourceConfig(str(disk / "train.json"), image_folder=str(disk / "img"))],
            llama_tokenizer,
            clip_image_processor,
        )
    )
    # `images` (the list column) holds every row's images; `image` alone only the single-image rows.
    lists = _build(
        [SourceConfig(str(disk / "hf"), columns={"image": "images"})], llama_tokenizer, clip_image_processor
    )
    _same_items(_items(lists), ref)
    assert [int((it["input_ids"] == IMG).sum()) for it in _items(lists)] == [16, 16, 0, 32]
    single = _build([SourceConfig(str(disk / "hf"))], llama_tokenizer, clip_image_processor, on_bad_sample="skip")
    # Row 3 has two tags but `image` is None there: a bad row with its reason, never a silent drop.
    assert single.skipped == {"image_count_mismatch": 1}
    _same_items(_items(single), ref[:3])


def test_corrupt_and_missing_embedded_images_are_bad_rows(disk: Path, llama_tokenizer: Any, clip_image_processor):
    _hf_rows(corrupt=True).to_parquet(str(disk / "bad.parquet"))
    src = SourceConfig(str(disk / "bad.parquet"), columns={"image": "images"})
    with pytest.raises(BadSampleError, match=r"bad sample in bad.parquet row 4 \(id 'broken'\): corrupt_image: "):
        _build([src], llama_tokenizer, clip_image_processor)
    store = open_source(src)
    ctx = make_context(_cfg([src]), src, make_parts(llama_tokenizer, NUM_TOKENS, IMG))
    scan = scan_mod.scan_source(store, ctx)
    assert [(b["row"], b["id"], b["reason"]) for b in scan.bad] == [
        (4, "broken", "corrupt_image"),
        (5, "empty", "missing_image"),
    ]
    assert "cannot decode embedded image 0" in scan.bad[0]["detail"]
    assert "embedded image 0 has neither bytes nor a path" in scan.bad[1]["detail"]


def test_parquet_shards_by_folder_and_glob(disk: Path, llama_tokenizer: Any, clip_image_processor: Any):
    hf = _hf_rows()
    (disk / "shards").mkdir()
    for k, (a, b) in enumerate(((0, 2), (2, 3), (3, 4))):
        hf.select(range(a, b)).to_parquet(str(disk / "shards" / f"train-{k:05d}.parquet"))
    (disk / "shards" / "README.md").write_text("not a shard")
    ref = _items(
        _build(
            [SourceConfig(str(disk / "train.json"), image_folder=str(disk / "img"))],
            llama_tokenizer,
            clip_image_processor,
        )
    )
    for path in (str(disk / "shards"), str(disk / "shards" / "train-*.parquet")):
        assert [p.name for p in shard_paths(path)] == [f"train-{k:05d}.parquet" for k in range(3)]
        ds = _build([SourceConfig(path, columns={"image": "images"})], llama_tokenizer, clip_image_processor)
        assert [it["id"] for it in _items(ds)] == ["r0", "r1", "r2", "r3"]
        _same_items(_items(ds), ref)
    # Arrow IPC shards, in the file format and in the stream format `datasets` writes its cache files in.
    import pyarrow as pa

    (disk / "arrow").mkdir()
    table = hf.data.table
    for name, writer in (("a-0.arrow", pa.ipc.new_file), ("a-1.arrow", pa.ipc.new_stream)):
        part = table.slice(0, 2) if name == "a-0.arrow" else table.slice(2, 2)
        with pa.OSFile(str(disk / "arrow" / name), "wb") as sink, writer(sink, part.schema) as w:
            w.write_table(part)
    ds = _build(
        [SourceConfig(str(disk / "arrow"), columns={"image": "images"})], llama_tokenizer, clip_image_processor
    )
    _same_items(_items(ds), ref)
    with pytest.raises(FileNotFoundError, match="no .* shards match"):
        shard_paths(str(disk / "shards" / "nope-*.parquet"))
    with pytest.raises(ConfigError, match=r"columns.image='pics' is not a column of .*train-00000.parquet; its "):
        open_source(SourceConfig(str(disk / "shards"), columns={"image": "pics"}))


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_webdataset_tar(disk: Path, llama_tokenizer: Any, clip_image_processor: Any) -> None:
    members: list[tuple[str, bytes]] = []
    for i, (conv, imgs) in enumerate(zip(CONVS, IMAGES)):
        key = f"sample_{i:04d}"
        members.append((f"{key}.json", json.dumps({"id": f"r{i}", "conversations": conv}).encode()))
        if len(imgs) == 1:
            members.append((f"{key}.png", _png(imgs[0])))
        # Several images: ordered by their number, not by their place in the tar.
        for n, k in reversed(list(enumerate(imgs if len(imgs) > 1 else []))):
            members.append((f"{key}.{n}.png", _png(k)))
    members.append(("sample_0004.json", json.dumps({"conversations": CONVS[0]}).encode()))
    members.append(("sample_0004.png", b"\x89PNG\r\n\x1a\nbroken"))
    members.append(("sample_0005.txt", b"  a green square \n"))
    members.append(("sample_0005.png", _png(2)))
    _tar(disk / "train-000.tar", members)
    index = build_tar_index(str(disk / "train-000.tar"))
    assert index["keys"].tolist() == [f"sample_{i:04d}".encode() for i in range(6)]
    assert np.diff(index["image_ptr"]).tolist() == [1, 1, 0, 2, 1, 1]
    long_key = "d" * 150 + "/s_1"  # a name past ustar's 100 bytes: a PAX header precedes the member
    _tar(disk / "long.tar", [(f"{long_key}.json", b"{}"), (f"{long_key}.jpg", b"xy")])
    long = build_tar_index(str(disk / "long.tar"))
    assert long["keys"].tolist() == [long_key.encode()] and long["image_size"].tolist() == [2]
    with tarfile.open(disk / "long.tar") as tf:
        assert long["image_offset"].tolist() == [tf.getmember(f"{long_key}.jpg").offset_data]

    ref = _build(
        [SourceConfig(str(disk / "train.json"), image_folder=str(disk / "img"))], llama_tokenizer, clip_image_processor
    )
    src = SourceConfig(str(disk / "train-000.tar"))
    with pytest.raises(
        BadSampleError, match=r"train-000.tar row 4 \(id 'sample_0004'\): corrupt_image: .*sample_0004"
    ):
        _build([src], llama_tokenizer, clip_image_processor)
    cache = str(disk / "cache")
    ds = _build([src], llama_tokenizer, clip_image_processor, cache_dir=cache, on_bad_sample="skip")
    assert ds.skipped == {"corrupt_image": 1} and len(list(Path(cache).glob("tar-*.npz"))) == 1
    items = _items(ds)
    _same_items(items[:4], _items(ref))
    assert [it["id"] for it in items] == ["r0", "r1", "r2", "r3", "sample_0005"]
    caption = llama_tokenizer.decode([t for t, lab in zip(items[4]["input_ids"], items[4]["labels"]) if lab != -100])
    assert caption.startswith("a green square") and items[4]["num_images"] == 1
    # Workers receive the index file's name, not the arrays; a DataLoader reads the same items.
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1)
    assert [b["input_ids"].tolist() for b in loader] == [it["input_ids"].tolist() for it in items]


def test_cauldron_and_messages_layouts(disk: Path, llama_tokenizer: Any, clip_image_processor: Any) -> None:
    """the_cauldron (`images` + `texts` [{user, assistant}]) and TRL's `messages` with typed content and image
    indices read as the LLaVA rows they stand for, by the usual names or an explicit mapping."""
    import datasets

    pairs = [
        [{"user": "What is it?", "assistant": "A red box."}],
        [{"user": "Describe.", "assistant": "A blue bar."}],
        [{"user": "Hello there", "assistant": "Yes."}],
        [{"user": "<image> and <image>", "assistant": "Two."}],
    ]
    images = [[{"bytes": _png(k), "path": None} for k in imgs] for imgs in IMAGES]
    feats = datasets.Features(
        {
            "images": datasets.Sequence(datasets.Image()),
            "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string")}],
        }
    )
    datasets.Dataset.from_dict({"images": images, "texts": pairs}, features=feats).to_parquet(str(disk / "c.parquet"))
    renamed = datasets.Dataset.from_dict(
        {"pics": images, "chat": pairs}, features=datasets.Features({"pics": feats["images"], "chat": feats["texts"]})
    )
    renamed.to_parquet(str(disk / "renamed.parquet"))
    ref_rows = [
        {"id": 0, "image": ["0.png"], "conversations": _conv("<image>\nWhat is it?", "A red box.")},
        {"id": 1, "image": ["1.png"], "conversations": _conv("<image>\nDescribe.", "A blue bar.")},
        {"id": 2, "conversations": _conv("Hello there", "Yes.")},
        {"id": 3, "image": ["2.png", "3.png"], "conversations": _conv("<image> and <image>", "Two.")},
    ]
    (disk / "ref.json").write_text(json.dumps(ref_rows))
    ref = _items(
        _build(
            [SourceConfig(str(disk / "ref.json"), image_folder=str(disk / "img"))],
            llama_tokenizer,
            clip_image_processor,
        )
    )
    _same_items(_items(_build([SourceConfig(str(disk / "c.parquet"))], llama_tokenizer, clip_image_processor)), ref)
    mapped = SourceConfig(str(disk / "renamed.parquet"), columns={"image": "pics", "conversations": "chat"})
    _same_items(_items(_build([mapped], llama_tokenizer, clip_image_processor)), ref)

    def msg(role: str, *content: dict[str, Any]) -> dict[str, Any]:
        return {"role": role, "content": list(content)}

    def text(t: str) -> dict[str, Any]:
        return {"type": "text", "text": t, "index": None}

    def image(k: int) -> dict[str, Any]:
        return {"type": "image", "text": None, "index": k}

    messages = [
        [msg("user", image(0), text("What is it?")), msg("assistant", text("A red box."))],
        [msg("user", text("Describe. "), image(0)), msg("assistant", text("A blue bar."))],
        [msg("user", text("Hello there")), msg("assistant", text("Yes."))],
        [msg("user", image(0), text(" and "), image(1)), msg("assistant", text("Two."))],
        [msg("user", image(1), text(" and "), image(0)), msg("assistant", text("Two."))],
    ]
    rows = [{"id": f"m{i}", "images": images[min(i, 3)], "messages": m} for i, m in enumerate(messages)]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(disk / "m.parquet"))  # plain pyarrow: no HF metadata
    ds = _build([SourceConfig(str(disk / "m.parquet"))], llama_tokenizer, clip_image_processor, on_bad_sample="skip")
    assert ds.skipped == {"image_count_mismatch": 1}  # row 4's indices say the images are out of order
    for x, y in zip(_items(ds), ref):
        assert x["input_ids"].tolist() == y["input_ids"].tolist() and x["labels"].tolist() == y["labels"].tolist()


def test_adding_a_shard_rescans_only_that_shard(
    disk: Path, llama_tokenizer: Any, clip_image_processor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [{"id": f"s{i}", "conversations": _conv(f"question {i}", "ok")} for i in range(9)]
    (disk / "jsonl").mkdir()
    for k in range(2):
        (disk / "jsonl" / f"part-{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[3 * k : 3 * k + 3]))
    calls = {"rows": 0}
    real = scan_mod.scan_row

    def counting(*args: Any, **kw: Any) -> Any:
        calls["rows"] += 1
        return real(*args, **kw)

    monkeypatch.setattr(scan_mod, "scan_row", counting)
    src = SourceConfig(str(disk / "jsonl"))
    cache = str(disk / "cache")
    first = _build([src], llama_tokenizer, clip_image_processor, cache_dir=cache)
    assert (first.scans[0].shards_scanned, first.scans[0].shards_cached, calls["rows"]) == (2, 0, 6)
    (disk / "jsonl" / "part-2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[6:]) + "{oops\n")
    second = _build([src], llama_tokenizer, clip_image_processor, cache_dir=cache, on_bad_sample="skip")
    assert (second.scans[0].shards_scanned, second.scans[0].shards_cached, calls["rows"]) == (1, 2, 10)
    assert [second[i]["id"] for i in range(len(second))] == [f"s{i}" for i in range(9)]
    assert second.lengths[:6] == first.lengths
    (bad,) = second.scans[0].bad  # numbered in the source, named in its shard
    assert (bad["row"], bad["id"], bad["reason"]) == (9, 9, "malformed_json") and "part-2.jsonl line 4" in bad[
        "detail"
    ]
    third = _build([src], llama_tokenizer, clip_image_processor, cache_dir=cache, on_bad_sample="skip")
    assert third.scans[0].from_cache and calls["rows"] == 10 and third.scans[0].bad == second.scans[0].bad


def test_mixture_of_json_and_parquet_by_weight(disk: Path, llama_tokenizer: Any, clip_image_processor: Any):
    _hf_rows().to_parquet(str(disk / "emb.parquet"))
    js = SourceConfig(str(disk / "train.json"), image_folder=str(disk / "img"), weight=2.0)
    pq_src = SourceConfig(str(disk / "emb.parquet"), columns={"image": "images"}, weight=0.5)
    ds = _build([js, pq_src], llama_tokenizer, clip_image_processor)
    assert len(ds) == 8 + 2 and ds.item_source.tolist() == [0] * 8 + [1] * 2
    assert ds.item_row[:8].tolist() == [0, 1, 2, 3] * 2 and len(set(ds.item_row[8:].tolist())) == 2
    assert [r["used"] for r in ds.reports] == [8, 2]
    for i in range(8, 10):
        row = int(ds.item_row[i])
        _same_items([ds[i]], [ds[row]])  # a parquet row equals its JSON twin


def test_anyres_counts_from_embedded_headers(disk: Path, llama_tokenizer: Any) -> None:
    """Anyres token counts need each image's size: embedded images give it from their header, as files do."""
    _hf_rows().save_to_disk(str(disk / "hf"))
    geometry = ImageGeometry("llava_next", 32, 4, 16, 16, ((32, 64), (64, 32), (64, 64)), None, "anyres")
    parts = make_parts(llama_tokenizer, geometry, IMG)
    scans = []
    for src in (
        SourceConfig(str(disk / "train.json"), image_folder=str(disk / "img")),
        SourceConfig(str(disk / "hf"), columns={"image": "images"}),
    ):
        ctx = make_context(_cfg([src]), src, parts)
        scans.append(scan_mod.scan_source(open_source(src), ctx))
    expected = [geometry.image_tokens(h, w, 1) for w, h in SIZES[:2]]
    expected += [geometry.image_tokens(h, w, 2) for w, h in SIZES[2:]]
    assert scans[0].media_tokens.tolist() == scans[1].media_tokens.tolist() == expected
    assert scans[0].lengths.tolist() == scans[1].lengths.tolist()
    assert len(set(expected)) > 1  # the sizes really matter
