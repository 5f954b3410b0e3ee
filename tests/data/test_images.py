"""Image references: the image-folder boundary on real paths (symlinked files, sub-folders, HF struct paths,
frame folders), decoding, the format allow-list and the size bound."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from llava_train.config import DataConfig, ModelConfig, RunConfig, SourceConfig
from llava_train.data.errors import BadSample
from llava_train.data.images import image_ref, resolve_image_path, video_frame_paths
from llava_train.data.validate import inspect_samples, validate
from tiny_models import make_parts


def _png(size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (0, 200, 0)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture()
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """An image folder holding links out to a private folder: a file link, a folder link and a frame link."""
    images, private = tmp_path / "images", tmp_path / "private"
    images.mkdir()
    private.mkdir()
    (private / "secret.png").write_bytes(_png())
    (images / "ok.png").write_bytes(_png())
    (images / "link.png").symlink_to(private / "secret.png")
    (images / "sub").symlink_to(private, target_is_directory=True)
    (images / "frames").mkdir()
    (images / "frames" / "0.png").write_bytes(_png())
    (images / "frames" / "1.png").symlink_to(private / "secret.png")
    (images / "inner.png").symlink_to(images / "ok.png")  # a link that stays inside is fine
    return images, private


def test_symlinks_leaving_the_image_folder_are_bad_rows(folders: tuple[Path, Path]) -> None:
    images, private = folders
    assert resolve_image_path(str(images), "ok.png") == str(images / "ok.png")
    assert resolve_image_path(str(images), "inner.png") == str(images / "ok.png")
    for rel in ("link.png", "sub/secret.png"):
        with pytest.raises(BadSample) as e:
            resolve_image_path(str(images), rel)
        assert e.value.reason == "image_symlink_escapes" and str(private / "secret.png") in e.value.detail
    with pytest.raises(BadSample) as e:
        image_ref({"bytes": None, "path": "link.png"}, str(images))
    assert e.value.reason == "image_symlink_escapes"
    with pytest.raises(BadSample) as e:
        video_frame_paths(str(images), "frames", 2)
    assert e.value.reason == "image_symlink_escapes" and "frames/1.png" in e.value.detail
    with pytest.raises(BadSample) as e:
        video_frame_paths(str(images), ["frames/0.png", "link.png"], 2)
    assert e.value.reason == "image_symlink_escapes"


def test_image_folder_that_is_itself_a_link_is_followed(folders: tuple[Path, Path], tmp_path: Path) -> None:
    images, _ = folders
    (tmp_path / "alias").symlink_to(images, target_is_directory=True)
    assert resolve_image_path(str(tmp_path / "alias"), "ok.png") == str(images / "ok.png")
    with pytest.raises(BadSample) as e:
        resolve_image_path(str(tmp_path / "alias"), "link.png")
    assert e.value.reason == "image_symlink_escapes"


def _cfg(root: Path, rows: list[dict[str, Any]], images: Path) -> RunConfig:
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataConfig(
        train=[SourceConfig(str(root / "train.jsonl"), image_folder=str(images))], template="plain", cache_dir=None
    )
    return RunConfig(stage="pretrain", model=ModelConfig(), data=data)


def _conv() -> list[dict[str, str]]:
    return [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "green"}]


def test_validate_and_inspect_refuse_linked_images(
    folders: tuple[Path, Path], tmp_path: Path, llama_tokenizer: Any
) -> None:
    images, _ = folders
    rows = [
        {"id": "ok", "image": "ok.png", "conversations": _conv()},
        {"id": "file", "image": "link.png", "conversations": _conv()},
        {"id": "dir", "image": "sub/secret.png", "conversations": _conv()},
        {"id": "struct", "image": {"bytes": None, "path": "link.png"}, "conversations": _conv()},
    ]
    cfg = _cfg(tmp_path, rows, images)
    parts = make_parts(llama_tokenizer, 4, 512, "plain")
    report = validate(cfg, parts, num_workers=1)
    assert [(b["row"], b["id"], b["reason"]) for b in report["bad_rows"]] == [
        (1, "file", "image_symlink_escapes"),
        (2, "dir", "image_symlink_escapes"),
        (3, "struct", "image_symlink_escapes"),
    ]
    out, dump = io.StringIO(), tmp_path / "dump"
    inspect_samples(cfg, parts, indices=[0, 1], out=out, images_dir=str(dump))
    assert "# sample 1 (train.jsonl row 1, id 'file'): BAD image_symlink_escapes" in out.getvalue()
    assert sorted(os.listdir(dump)) == ["sample0_image0.png"]  # nothing of the private folder is copied out


def _broken_files(root: Path) -> dict[str, bytes]:
    """A truncated JPEG, a PNG whose deflate stream is garbage under valid CRCs, a 20000x1 PNG and an EPS."""
    import struct
    import zlib

    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, "JPEG")
    jpeg = buf.getvalue()
    png = _png((16, 16))
    # Rewrite the IDAT chunk with junk data and a correct CRC: the header and every CRC are valid.
    at = png.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", png[at : at + 4])
    junk = b"\x78\x9c" + bytes(range(7, 7 + length - 2))
    idat = struct.pack(">I", len(junk)) + b"IDAT" + junk + struct.pack(">I", zlib.crc32(b"IDAT" + junk))
    garbled = png[:at] + idat + png[at + 12 + length :]
    wide = io.BytesIO()
    Image.new("L", (20000, 1)).save(wide, "PNG")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n"
    files = {"cut.jpg": jpeg[: len(jpeg) // 2], "garbled.png": garbled, "wide.png": wide.getvalue(), "x.eps": eps}
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


def test_validate_decodes_images_and_bounds_their_size_and_format(tmp_path: Path, llama_tokenizer: Any) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.png").write_bytes(_png())
    files = _broken_files(images)
    rows = [{"id": "ok", "image": "ok.png", "conversations": _conv()}]
    rows += [{"id": name, "image": name, "conversations": _conv()} for name in files]
    rows.append({"id": "embedded", "image": {"bytes": None, "path": "cut.jpg"}, "conversations": _conv()})
    cfg = _cfg(tmp_path, rows, images)
    report = validate(cfg, make_parts(llama_tokenizer, 4, 512, "plain"), num_workers=1)
    assert [(b["id"], b["reason"]) for b in report["bad_rows"]] == [
        ("cut.jpg", "corrupt_image"),
        ("garbled.png", "corrupt_image"),
        ("wide.png", "image_too_large"),
        ("x.eps", "image_format"),
        ("embedded", "corrupt_image"),
    ]
    details = {b["id"]: b["detail"] for b in report["bad_rows"]}
    assert "image file is truncated" in details["cut.jpg"]
    assert details["wide.png"] == f"{images / 'wide.png'} is 20000x1: a side over 10000"
    assert details["x.eps"] == f"{images / 'x.eps'} is EPS; allowed: JPEG, MPO, PNG, WEBP, BMP, GIF, TIFF"
    out = io.StringIO()
    inspect_samples(cfg, make_parts(llama_tokenizer, 4, 512, "plain"), [4], out=out, images_dir=str(tmp_path / "d"))
    assert f"# images of sample 4: BAD image_format: {images / 'x.eps'} is EPS" in out.getvalue()
    assert not (tmp_path / "d").exists() or os.listdir(tmp_path / "d") == []
    # The bounds are configurable (and part of the scan's cache key).
    cfg.data.max_image_side, cfg.data.max_image_aspect_ratio = 30000, 1.0
    report = validate(cfg, make_parts(llama_tokenizer, 4, 512, "plain"), num_workers=1)
    wide = next(b for b in report["bad_rows"] if b["id"] == "wide.png")
    assert wide["detail"] == f"{images / 'wide.png'} is 20000x1: aspect ratio over 1"
