"""The data commands behind the CLI: resolve a config's tokenizer/processor (no weights), then validate or inspect."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from llava_train.config import RunConfig
from llava_train.run_files import DATA_REPORT
from llava_train.utils.logging import get_logger

log = get_logger(__name__)


def default_report_path(cfg: RunConfig) -> Path:
    """`<output_dir>/data_report.json`, or ./data_report.json when the config names no run folder."""
    out = cfg.train.get("output_dir")
    return Path(out) / DATA_REPORT if out else Path(DATA_REPORT)


def run_validate(cfg: RunConfig, report_path: str | None = None, num_workers: int | None = None) -> dict[str, Any]:
    """Scan every row of every source, print the summary table, write the full JSON report."""
    from llava_train.components import load_components
    from llava_train.data.validate import format_report, validate
    from llava_train.preflight import check_paths

    check_paths(cfg)
    report = validate(cfg, load_components(cfg, weights=False), num_workers=num_workers)
    path = Path(report_path) if report_path else default_report_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    print(format_report(report))
    print(f"full report: {path}")
    return report


def run_inspect(
    cfg: RunConfig,
    indices: list[int] | None = None,
    jsonl: str | None = None,
    color: str = "auto",
    images_dir: str | None = None,
) -> int:
    """Print samples with trained spans highlighted; optionally write their exact ids/labels as JSONL."""
    from llava_train.components import load_components
    from llava_train.data.validate import inspect_samples
    from llava_train.preflight import check_paths

    check_paths(cfg)
    use_color = {"auto": None, "always": True, "never": False}[color]
    written = inspect_samples(
        cfg,
        load_components(cfg, weights=False),
        indices=indices,
        jsonl_path=jsonl,
        out=sys.stdout,
        color=use_color,
        images_dir=images_dir,
    )
    if jsonl:
        print(f"wrote {written} samples to {jsonl}")
    return written
