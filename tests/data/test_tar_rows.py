"""Webdataset tar anomalies are bad rows or one-line errors: nothing of a tar vanishes silently."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from llava_train.config import SourceConfig
from llava_train.data.errors import BadSample, DataFileError
from llava_train.data.rows import open_source

CONV = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "green"}]


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 200, 0)).save(buf, "PNG")
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _record(key: str) -> tuple[str, bytes]:
    return f"{key}.json", json.dumps({"conversations": CONV}).encode()


def test_repeated_and_case_duplicate_members_are_bad_rows(tmp_path: Path) -> None:
    png = _png()
    members = [_record("a"), ("a.png", png)]
    members += [_record("b"), ("b.png", png), ("b.png", png)]  # the same member twice
    members += [_record("c"), ("c.png", png), ("c.PNG", png)]  # names differing only by case
    members += [_record("d"), ("d.png", png), _record("a"), ("a.png", png)]  # key a again, after d
    rows = open_source(SourceConfig(str(_tar(tmp_path / "s.tar", members))))
    assert len(rows) == 5
    assert rows.get(0)["id"] == "a" and rows.get(3)["id"] == "d"
    for i, why in ((1, "holds the same member name twice"), (2, "differ only by case"), (4, "an earlier")):
        with pytest.raises(BadSample) as e:
            rows.get(i)
        assert e.value.reason == "tar_member" and why in e.value.detail


def test_a_tar_cut_inside_a_header_is_an_error_naming_it(tmp_path: Path) -> None:
    path = _tar(tmp_path / "s.tar", [_record("a"), ("a.png", _png()), _record("b")])
    data = path.read_bytes()
    second_header = 512 + -(-len(_record("a")[1]) // 512) * 512 + 512 + -(-len(_png()) // 512) * 512
    path.write_bytes(data[: second_header + 100])
    with pytest.raises(DataFileError, match=r"s\.tar ends inside the tar header at byte \d+: the file is cut"):
        open_source(SourceConfig(str(path)))


def test_compressed_shards_are_never_skipped_silently(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    _tar(folder / "0.tar", [_record("a"), ("a.png", _png())])
    (folder / "1.tar.gz").write_bytes(b"\x1f\x8b" + b"\0" * 30)
    for source in (str(folder), str(folder / "*"), str(folder / "1.tar.gz")):
        with pytest.raises(DataFileError, match=r"1\.tar\.gz"):
            open_source(SourceConfig(source))
