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
