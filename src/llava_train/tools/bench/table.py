"""The bench's summary table: every mode of every preset from the JSON lines `llava-train bench` wrote.

`python -m llava_train.tools.bench.table OUT/bench_*.jsonl` prints it (scripts/bench_gpu.sh does, last).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

COLUMNS = ("preset", "mode", "tokens/s", "MFU", "HFU", "peak GB", "x hf-padded", "data wait", "padding eff.")


def _pct(v: Any) -> str:
    return "-" if v is None else f"{v:.1%}"


def format_table(records: list[dict[str, Any]]) -> str:
    """Markdown, one row per (preset, mode) record; the ratio is tokens/s over the same preset's hf-padded."""
    modes = [r for r in records if "mode" in r]
    base = {r["preset"]: r["tokens_per_s"] for r in modes if r["mode"] == "hf-padded"}
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for r in modes:
        ratio = r["tokens_per_s"] / base[r["preset"]] if base.get(r["preset"]) else None
        cells = (
            r["preset"],
            r["mode"],
            f"{r['tokens_per_s']:,.0f}",
            _pct(r.get("mfu")),
            _pct(r.get("hfu")),
            "-" if r.get("peak_mem_gb") is None else f"{r['peak_mem_gb']:.1f}",
            "-" if ratio is None else f"{ratio:.2f}",
            _pct(r.get("data_wait_fraction")),
            _pct(r.get("padding_efficiency")),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_records(paths: list[str]) -> list[dict[str, Any]]:
    """Every JSON object line of the files (other lines, e.g. a failed run's partial output, are skipped)."""
    records = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return records


if __name__ == "__main__":
    print(format_table(read_records(sys.argv[1:])))
