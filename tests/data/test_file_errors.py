"""Files that cannot be read at all are one-line errors naming the shard (exit 2), never tracebacks; `data validate`
tells "could not run" (2) from "bad rows found" (1)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from llava_train.cli import main
from llava_train.config import SourceConfig
from llava_train.data import validate as validate_mod
from llava_train.data.errors import DataFileError
from llava_train.data.rows import open_source

ROW = {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}


def _parquet(path: Path) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a"], "conversations": [ROW["conversations"]]}), path)
    return path.read_bytes()


def _tar_of(member: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("a.json")
        info.size = len(member)
        tar.addfile(info, io.BytesIO(member))
    return buf.getvalue()


def _cases(root: Path) -> dict[str, tuple[str, bytes | None]]:
    """name -> (file name, bytes): every file that cannot be read at all."""
    good_parquet = _parquet(root / "good.parquet")
    return {
        "not parquet": ("a.parquet", b"just some text, not parquet\n"),
        "cut footer": ("b.parquet", good_parquet[:-12]),
        "garbage arrow": ("c.arrow", b"\x00\x01garbage" * 20),
        "malformed JSON list": ("d.json", b'[{"id": "a"}, {"id": '),
        "invalid UTF-8 list": ("e.json", b'[{"id": "\xff\xfe"}]'),
        "gzip tar": ("f.tar", gzip.compress(_tar_of(json.dumps(ROW).encode()))),
        "HTML tar": ("g.tar", b"<!DOCTYPE html><html><body>Not Found</body></html>\n" * 12),
        "empty JSON": ("h.json", b""),
        "empty list": ("i.json", b"[]"),
    }


def test_every_unreadable_file_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    for name, (file_name, data) in _cases(tmp_path).items():
        path = tmp_path / file_name
        path.write_bytes(data or b"")
        with pytest.raises(DataFileError) as e:
            open_source(SourceConfig(str(path)), cache_dir=str(tmp_path / "cache"))
        message = str(e.value)
        assert file_name in message and "\n" not in message, name
        assert message.startswith(f"data source {file_name}: "), name


def test_a_broken_save_to_disk_folder_names_the_folder(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list([ROW]).save_to_disk(str(folder))
    (folder / "state.json").write_text("{ broken")
    with pytest.raises(DataFileError, match=r"^data source saved: cannot read save_to_disk folder .*saved: "):
        open_source(SourceConfig(str(folder)))


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    """A tiny-model config over one JSONL source, `train.jsonl` (written by each test)."""
    cfg = {
        "stage": "pretrain",
        "model": {"language_model": str(tmp_path / "lm"), "vision_tower": str(tmp_path / "vision"), "preset": "tiny"},
        "data": {"train": [{"path": str(tmp_path / "train.json")}], "template": "plain", "model_max_length": 64},
        "train": {"output_dir": str(tmp_path / "run")},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "cfg.yaml"


def test_validate_exit_codes_bad_rows_1_could_not_run_2(
    config: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = config.parent / "train.json"
    data.write_text(json.dumps([ROW, {"id": "b", "conversations": []}]))
    assert main(["data", "validate", str(config), "--workers", "1"]) == 1
    data.write_text('[{"id": "a"}, ')
    capsys.readouterr()
    assert main(["data", "validate", str(config), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("llava-train: error:")]
    assert "Traceback" not in err and line.startswith(
        "llava-train: error: data source train.json: cannot read .json shard "
    )

    def crash(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug")

    data.write_text(json.dumps([ROW]))
    monkeypatch.setattr(validate_mod, "cached_scan", crash)
    assert main(["data", "validate", str(config), "--workers", "1"]) == 2
    assert "RuntimeError: a bug" in capsys.readouterr().err


def test_bom_prefixed_and_single_object_json_read_right(tmp_path: Path) -> None:
    rows = [ROW, {**ROW, "id": "b"}]
    cases = {
        "bom.json": b"\xef\xbb\xbf" + json.dumps(rows, indent=2).encode(),
        "bom.jsonl": b"\xef\xbb\xbf" + b"\n".join(json.dumps(r).encode() for r in rows),
        "one.json": json.dumps(ROW, indent=2).encode(),
        "lines.json": b"\n".join(json.dumps(r).encode() for r in rows),  # JSONL named .json
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        source = open_source(SourceConfig(str(tmp_path / name)))
        ids = [source.get(i)["id"] for i in range(len(source))]
        assert ids == (["a"] if name == "one.json" else ["a", "b"]), name


def test_a_corrupt_parquet_row_group_reports_its_rows(tmp_path: Path, llama_tokenizer: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llava_train.config import DataConfig, ModelConfig, RunConfig
    from llava_train.data.validate import validate
    from tiny_models import make_parts

    ids = [f"r{i}" for i in range(6)]
    table = pa.table({"id": ids, "conversations": [ROW["conversations"]] * 6})
    path = tmp_path / "groups.parquet"
    pq.write_table(table, path, row_group_size=3, compression="none", use_dictionary=False)
    meta = pq.ParquetFile(path).metadata.row_group(1).column(0)
    data = bytearray(path.read_bytes())
    start = meta.data_page_offset
    data[start : start + meta.total_compressed_size] = b"\xff" * meta.total_compressed_size
    path.write_bytes(bytes(data))
    cfg = RunConfig(
        stage="pretrain",
        model=ModelConfig(),
        data=DataConfig(train=[SourceConfig(str(path))], template="plain", model_max_length=64, cache_dir=None),
    )
    report = validate(cfg, make_parts(llama_tokenizer, 4, 512, "plain"), num_workers=1)
    assert [(b["row"], b["reason"]) for b in report["bad_rows"]] == [
        (3, "row_error"),
        (4, "row_error"),
        (5, "row_error"),
    ]
    assert report["sources"][0]["good"] == 3
