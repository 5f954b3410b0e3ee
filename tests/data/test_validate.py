"""`validate` report, its summary table, and `inspect_samples` rendering and JSONL."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

from llava_train.config import DataConfig, ModelConfig, RunConfig, SourceConfig
from llava_train.data.validate import format_report, inspect_samples, validate
from tiny_models import make_parts

IMG = 512


def _conv(q: str, a: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def _run_config(tmp_path: Path, template: str = "plain") -> RunConfig:
    Image.new("RGB", (20, 20), (0, 255, 0)).save(tmp_path / "ok.png")
    train = [
        {"id": "g0", "image": "ok.png", "conversations": _conv("<image>", "A green square.")},
        {"id": "g1", "image": "ok.png", "conversations": _conv("Look <image>", "Green.")},
        {"id": "m0", "image": "missing.png", "conversations": _conv("<image>", "x")},
        {"id": "t0", "conversations": _conv("Hi", "Hello.")},
        {"id": "m1", "image": "gone.png", "conversations": _conv("<image>", "x")},
    ]
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "eval.jsonl").write_text(json.dumps(train[0]) + "\n{bad json\n")
    data = DataConfig(
        train=[SourceConfig(str(tmp_path / "train.json"), image_folder=str(tmp_path))],
        eval=[SourceConfig(str(tmp_path / "eval.jsonl"), image_folder=str(tmp_path))],
        template=template,
        model_max_length=1024,
        cache_dir=None,
    )
    return RunConfig(stage="pretrain", model=ModelConfig(), data=data)


def _parts(cfg: RunConfig, tokenizer: Any, n_img: int) -> Any:
    return make_parts(tokenizer, n_img, IMG, cfg.data.template)


def test_validate_report_and_summary(tmp_path: Path, llama_tokenizer: Any) -> None:
    cfg = _run_config(tmp_path)
    report = validate(cfg, _parts(cfg, llama_tokenizer, 4), num_workers=1)
    train, ev = report["sources"]
    assert (train["name"], train["split"], train["rows"], train["good"], train["bad"]) == (
        "train.json",
        "train",
        5,
        3,
        2,
    )
    assert (train["images"], train["text_only"], train["truncated"]) == (2, 1, 0)
    # plain: <s> + 4 image tokens + caption tokens + "\n".
    assert train["tokens"]["max"] == max(train["tokens"].values()) and train["tokens"]["p50"] > 5
    assert train["bad_by_reason"] == {"missing_image": {"count": 2, "first_ids": ["m0", "m1"]}}
    assert (ev["rows"], ev["good"], ev["bad_by_reason"]["malformed_json"]["count"]) == (2, 1, 1)
    assert [(b["source"], b["row"], b["id"], b["reason"]) for b in report["bad_rows"]] == [
        ("train.json", 2, "m0", "missing_image"),
        ("train.json", 4, "m1", "missing_image"),
        ("eval.jsonl", 1, 1, "malformed_json"),
    ]
    assert "missing.png" in report["bad_rows"][0]["detail"] and "line 2" in report["bad_rows"][2]["detail"]
    assert report["total_rows"] == 7 and report["total_bad"] == 3
    json.dumps(report)  # the report is JSON-ready
    text = format_report(report)
    assert "train.json  train     5     3    2" in text
    assert "  train.json: missing_image: 2 (ids: m0, m1)" in text
    assert "  eval.jsonl: malformed_json: 1 (ids: 1)" in text and "bad rows: 3 of 7" in text


def test_validate_parallel_equals_serial(tmp_path: Path, llama_tokenizer: Any) -> None:
    cfg = _run_config(tmp_path)
    serial = validate(cfg, _parts(cfg, llama_tokenizer, 4), num_workers=1)
    rows = [{"id": f"r{i}", "conversations": _conv(f"q{i}", "a")} for i in range(1200)]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    parallel = validate(cfg, _parts(cfg, llama_tokenizer, 4), num_workers=2)
    serial_big = validate(cfg, _parts(cfg, llama_tokenizer, 4), num_workers=1)
    assert parallel["sources"] == serial_big["sources"] and parallel["bad_rows"] == serial_big["bad_rows"]
    assert serial["sources"][0]["rows"] == 5 and parallel["sources"][0]["rows"] == 1200


def test_inspect_markers_colour_and_jsonl(tmp_path: Path, llama_tokenizer: Any) -> None:
    cfg = _run_config(tmp_path)
    out = io.StringIO()
    written = inspect_samples(cfg, _parts(cfg, llama_tokenizer, 576), indices=[0, 2], out=out)
    assert written == 0
    text = out.getvalue()
    assert "<s><image x576>[[A green square.\n]]" in text
    assert "# sample 2 (train.json row 2, id 'm0'): BAD missing_image" not in text  # images are not opened
    out = io.StringIO()
    inspect_samples(cfg, _parts(cfg, llama_tokenizer, 576), indices=[1], out=out, color=True)
    assert "<image x576>\033[32;1mGreen.\n\033[0m" in out.getvalue()

    vcfg = _run_config(tmp_path, template="vicuna_v1")
    out = io.StringIO()
    inspect_samples(vcfg, _parts(vcfg, llama_tokenizer, 2), indices=[3], out=out)
    assert out.getvalue().endswith("USER: Hi ASSISTANT:[[ Hello.</s>]]\n")

    path = tmp_path / "samples.jsonl"
    written = inspect_samples(cfg, _parts(cfg, llama_tokenizer, 3), jsonl_path=str(path), out=io.StringIO())
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert written == len(lines) == 6  # 5 train rows + 1 good eval row; the malformed eval line is left out
    first = lines[0]
    assert (first["id"], first["source"], first["num_images"]) == ("g0", "train.json", 1)
    assert first["input_ids"][:4] == [1, IMG, IMG, IMG] and first["labels"][:4] == [-100] * 4
    assert first["labels"][4:] == first["input_ids"][4:]
    only = tmp_path / "one.jsonl"
    assert (
        inspect_samples(cfg, _parts(cfg, llama_tokenizer, 3), indices=[3], jsonl_path=str(only), out=io.StringIO())
        == 1
    )
    assert json.loads(only.read_text())["id"] == "t0"
