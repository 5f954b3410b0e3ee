"""The scan never aborts on one row: hostile rows become bad rows naming their reason (or the exception type),
oversized text is refused before tokenizing."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path
from typing import Any

from PIL import Image

from llava_train.config import DataConfig, ModelConfig, RunConfig, SourceConfig
from llava_train.data.validate import format_report, validate
from tiny_models import make_parts


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 200, 0)).save(buf, "PNG")
    return buf.getvalue()


def _conv(q: str = "<image>", a: str = "green") -> list[dict[str, str]]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def _run(tmp_path: Path, lines: list[str], cache: bool = False, as_list: bool = False) -> RunConfig:
    path = tmp_path / ("train.json" if as_list else "train.jsonl")
    path.write_text("[" + ",\n".join(lines) + "]" if as_list else "\n".join(lines) + "\n")
    data = DataConfig(
        train=[SourceConfig(str(path), image_folder=str(tmp_path))],
        template="plain",
        model_max_length=64,
        cache_dir=str(tmp_path / "cache") if cache else None,
    )
    return RunConfig(stage="pretrain", model=ModelConfig(), data=data)


def test_hostile_rows_become_bad_rows_and_the_scan_finishes(tmp_path: Path, llama_tokenizer: Any) -> None:
    png64 = base64.b64encode(_png()).decode()
    lines = [
        json.dumps({"id": "ok", "conversations": _conv("hi", "hello")}),
        '{"id": "deep", "conversations": ' + "[" * 10000 + "]" * 10000 + "}",
        # A lone surrogate is readable text (kept escaped); its row is reported for its missing image.
        '{"id": "sur\\ud800", "image": "gone.png", "conversations": [{"from": "human", "value": "<image> \\ud800"}, '
        '{"from": "gpt", "value": "x"}]}',
        json.dumps({"id": "b64", "image": {"bytes": png64, "path": None}, "conversations": _conv()}),
        json.dumps({"id": "list", "image": {"bytes": [300], "path": None}, "conversations": _conv()}),
        json.dumps({"id": "huge", "image": {"bytes": 100000000000, "path": None}, "conversations": _conv()}),
        json.dumps({"id": "text", "image": {"bytes": "not base64!", "path": None}, "conversations": _conv()}),
    ]
    for cache, as_list in ((False, False), (True, False), (False, True)):
        cfg = _run(tmp_path, lines, cache, as_list)
        report = validate(cfg, make_parts(llama_tokenizer, 4, 512, "plain"), num_workers=1)
        bad = [(b["row"], b["id"], b["reason"]) for b in report["bad_rows"]]
        assert bad == [
            (1, 1, "row_error"),
            (2, "sur\ud800", "missing_image"),
            (4, "list", "corrupt_image"),
            (5, "huge", "corrupt_image"),
            (6, "text", "corrupt_image"),
        ]
        details = [b["detail"] for b in report["bad_rows"]]
        assert details[0].startswith("RecursionError: maximum recursion depth exceeded")
        assert details[2] == "embedded image 0: `bytes` must be bytes or base64 text, got list"
        assert details[3] == "embedded image 0: `bytes` must be bytes or base64 text, got int"
        assert details[4].startswith("embedded image 0: `bytes` is text but not base64")
        assert (report["sources"][0]["good"], report["sources"][0]["images"]) == (2, 1)  # base64 text is read
        text = format_report(report)
        assert "row_error: 1 (ids: 1)" in text and "missing_image: 1 (ids: sur\\ud800)" in text
        text.encode("utf-8")  # printable


def test_a_20_mb_row_is_too_long_without_tokenizing(tmp_path: Path, llama_tokenizer: Any) -> None:
    lines = [
        json.dumps({"id": "big", "conversations": _conv("hi", "x" * 20_000_000)}),
        json.dumps({"id": "ok", "conversations": _conv("hi " * 2000, "yes")}),  # 6000 characters: tokenized
    ]
    cfg = _run(tmp_path, lines)
    parts = make_parts(llama_tokenizer, 4, 512, "plain")
    start = time.perf_counter()
    report = validate(cfg, parts, num_workers=1)
    assert time.perf_counter() - start < 1.0
    (bad,) = report["bad_rows"]
    assert (bad["row"], bad["id"], bad["reason"]) == (0, "big", "too_long")
    assert bad["detail"] == (
        "20000002 characters: more than 100 per token of model_max_length 64 (rejected before tokenizing)"
    )
    assert report["sources"][0]["truncated"] == 0 and report["sources"][0]["good"] == 1
