"""The `llava-train` command line: data validate / inspect on local folders, config reference, clean errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llava_train.cli import main
from tiny_models import write_caption_data


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    source = write_caption_data(root / "data", n=6)
    rows = json.loads(Path(source["path"]).read_text())
    rows.append({"id": "lost", "image": "missing.png", "conversations": rows[0]["conversations"]})
    rows.append({"id": "escape", "image": "../x.png", "conversations": rows[0]["conversations"]})
    Path(source["path"]).write_text(json.dumps(rows))
    cfg = {
        "stage": "pretrain",
        "model": {"language_model": str(root / "lm"), "vision_tower": str(root / "vision"), "preset": "tiny"},
        "data": {"train": [source], "template": "plain", "model_max_length": 64},
        "train": {"output_dir": str(root / "run")},
    }
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_validate_reports_every_bad_row_and_exits_1(config_file: Path, capsys: pytest.CaptureFixture) -> None:
    report_path = config_file.parent / "report.json"
    assert main(["data", "validate", str(config_file), "--report", str(report_path), "--workers", "1"]) == 1
    report = json.loads(report_path.read_text())
    bad = {(b["row"], b["id"], b["reason"]) for b in report["bad_rows"]}
    assert bad == {(6, "lost", "missing_image"), (7, "escape", "image_path_escapes")}
    (source,) = report["sources"]
    assert (source["rows"], source["good"], source["images"], source["text_only"]) == (8, 6, 6, 0)
    out = capsys.readouterr().out
    assert "missing_image" in out and f"full report: {report_path}" in out


def test_validate_override_and_default_report_path(config_file: Path) -> None:
    # With the bad rows skipped by an override the data is still reported (and still exits 1):
    # validation never hides a bad row.
    assert main(["data", "validate", str(config_file), "data.on_bad_sample=skip", "--workers", "1"]) == 1
    assert (config_file.parent / "run" / "data_report.json").is_file()


def test_inspect_marks_trained_spans_and_writes_exact_jsonl(config_file: Path, capsys: pytest.CaptureFixture) -> None:
    jsonl = config_file.parent / "samples.jsonl"
    assert main(["data", "inspect", str(config_file), "--index", "1", "--jsonl", str(jsonl), "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "<image x16>" in out and "[[a green image\n]]" in out
    (line,) = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert line["id"] == "1" and line["num_images"] == 1
    assert len(line["input_ids"]) == len(line["labels"]) and line["input_ids"].count(512) == 16
    trained = [t for t, lab in zip(line["input_ids"], line["labels"]) if lab != -100]
    assert trained == line["input_ids"][-len(trained) :], "only the caption + newline at the end train"


def test_errors_are_one_line_not_tracebacks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "validate", str(tmp_path / "nope.yaml")]) == 2
    assert "llava-train: error: config file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {max_len: 3}\n")
    assert main(["config", str(bad)]) == 2
    assert "valid keys in data" in capsys.readouterr().err


def test_config_reference_lists_documented_keys(capsys: pytest.CaptureFixture) -> None:
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "data.on_bad_sample" in out and "perf.loss_on_trained_only" in out and "TrainingArguments" in out


def test_second_validate_reads_the_scan_cache_and_training_reuses_it(
    config_file: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """The cache is on by default (`<output_dir>/../.cache`): a second validate of unchanged data does not scan,
    says so, and reports the same rows; changing the data file rescans it."""
    import logging
    import shutil

    cache = config_file.parent / ".cache"
    shutil.rmtree(cache, ignore_errors=True)  # earlier tests of this module validated the same data
    report_path = config_file.parent / "r.json"
    args = ["data", "validate", str(config_file), "--report", str(report_path), "--workers", "1"]
    main(args)
    first = json.loads(report_path.read_text())
    assert list(cache.glob("scan-*.npz")) and first["cache_dir"] == str(cache.resolve())
    capsys.readouterr()
    logger = logging.getLogger("llava_train")
    logger.addHandler(caplog.handler)
    try:
        main(args)
    finally:
        logger.removeHandler(caplog.handler)
    second = json.loads(report_path.read_text())
    assert [s.pop("from_cache") for s in second["sources"]] == [True]
    assert [s.pop("from_cache") for s in first["sources"]] == [False]
    assert [(s.pop("shards_scanned"), s["shards"]) for s in first["sources"]] == [(1, 1)]
    assert [(s.pop("shards_scanned"), s["shards"]) for s in second["sources"]] == [(0, 1)]
    assert second["sources"] == first["sources"] and second["bad_rows"] == first["bad_rows"]
    assert "read from the scan cache" in capsys.readouterr().out
    assert any("read the cached scan of pretrain.json" in r.getMessage() for r in caplog.records)


def test_inspect_writes_the_images_of_embedded_rows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`data inspect --images DIR` on a parquet source with embedded images writes each image as stored."""
    import datasets
    from PIL import Image

    source = write_caption_data(tmp_path / "data", n=3)
    rows = json.loads(Path(source["path"]).read_text())
    blobs = [(Path(source["image_folder"]) / r["image"]).read_bytes() for r in rows]
    ds = datasets.Dataset.from_dict(
        {
            "id": [r["id"] for r in rows],
            "image": [{"bytes": b, "path": None} for b in blobs],
            "conversations": [r["conversations"] for r in rows],
        },
        features=datasets.Features(
            {
                "id": datasets.Value("string"),
                "image": datasets.Image(),
                "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
            }
        ),
    )
    ds.to_parquet(str(tmp_path / "emb.parquet"))
    cfg = {
        "stage": "pretrain",
        "model": {"language_model": str(tmp_path / "lm"), "vision_tower": str(tmp_path / "vision"), "preset": "tiny"},
        "data": {"train": [{"path": str(tmp_path / "emb.parquet")}], "template": "plain", "model_max_length": 64},
        "train": {"output_dir": str(tmp_path / "run")},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out_dir = tmp_path / "shown"
    assert main(["data", "inspect", str(path), "--index", "2", "--images", str(out_dir), "--color", "never"]) == 0
    assert f"# images of sample 2: {out_dir / 'sample2_image0.png'}" in capsys.readouterr().out
    assert (out_dir / "sample2_image0.png").read_bytes() == blobs[2]
    assert Image.open(out_dir / "sample2_image0.png").size == (40, 32)
    assert main(["data", "validate", str(path), "--workers", "1"]) == 0


def test_missing_paths_are_one_line_errors_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = write_caption_data(tmp_path / "data", n=2)
    base = {
        "stage": "pretrain",
        "model": {"language_model": str(tmp_path / "lm"), "vision_tower": str(tmp_path / "vision"), "preset": "tiny"},
        "data": {"train": [source], "template": "plain"},
        "train": {"output_dir": str(tmp_path / "run")},
    }
    cases = [
        ({"data": {**base["data"], "train": [{"path": str(tmp_path / "nope.json")}]}}, "data.train[0].path: "),
        (
            {"data": {**base["data"], "train": [{**source, "image_folder": str(tmp_path / "nope")}]}},
            "data.train[0].image_folder: folder not found",
        ),
        ({"model": {"language_model": "/nope/lm"}}, "model.language_model: local folder not found: /nope/lm"),
        ({"model": {"language_model": "not a//valid id"}}, "model.language_model: local folder not found"),
        # Neither a path nor a valid hub id (huggingface_hub's HFValidationError otherwise).
        ({"model": {"language_model": "bad id!"}}, "model.language_model: 'bad id!' is neither a local folder nor"),
    ]
    for change, message in cases:
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump({**base, **change}))
        for command in (["data", "validate"], ["data", "inspect"], ["train"]):
            assert main([*command, str(path)]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"llava-train: error: {message}") and err.count("\n") == 1, err
