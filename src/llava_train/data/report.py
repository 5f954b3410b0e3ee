"""The one per-source report of a scan (rows, good, bad by reason with first ids, token-length percentiles), the
same in `data_report.json`, the run folder's `data_summary.json` and the logs."""

from __future__ import annotations

from typing import Any

import numpy as np

from llava_train.config import SourceConfig
from llava_train.data.scan import REASON_CODES, SourceScan

FIRST_IDS = 5  # row ids listed per bad-row reason in a report


def percentiles(lengths: np.ndarray) -> dict[str, int]:
    """p50 / p90 / p99 / max of token lengths (nearest-rank: every value is a real sample's length)."""
    if len(lengths) == 0:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99], method="nearest")
    return {"p50": int(p50), "p90": int(p90), "p99": int(p99), "max": int(lengths.max())}


def source_report(
    src: SourceConfig, split: str, scan: SourceScan, used: int | None = None, weight: float | None = None
) -> dict[str, Any]:
    """One source's counts, the same in `data_report.json`, the run folder's `data_summary.json` and the logs.

    rows, good, bad, images (of good rows), text_only, truncated, token-length percentiles of the good
    rows (image tokens included), `image_tokens` percentiles of the LM tokens of each image / video of the
    good rows (anyres: from each image's size), bad rows by reason with their first ids; `used` (rows per epoch
    after the mixture weight) and `weight` when the source is part of a training mixture.
    """
    good = scan.reasons < 0
    by_reason: dict[str, dict[str, Any]] = {}
    for b in scan.bad:
        entry = by_reason.setdefault(b["reason"], {"count": 0, "first_ids": []})
        entry["count"] += 1
        if len(entry["first_ids"]) < FIRST_IDS:
            entry["first_ids"].append(b["id"])
    report: dict[str, Any] = {
        "name": src.name,
        "path": src.path,
        "split": split,
        "rows": int(len(scan.reasons)),
        "good": int(good.sum()),
        "bad": len(scan.bad),
        "images": int(scan.num_images[good].sum()),
        "text_only": int((good & (scan.num_images == 0)).sum()),
        "truncated": int(scan.truncated[good].sum()),
        "tokens": percentiles(scan.lengths[good]),
        "image_tokens": percentiles(scan.media_tokens),
        "bad_by_reason": {r: by_reason[r] for r in REASON_CODES if r in by_reason},
    }
    if used is not None:
        report.update(used=int(used), weight=weight)
    return report


def format_source_line(report: dict[str, Any]) -> str:
    """The one-line log form of a source report."""
    skipped = ", ".join(f"{r}={e['count']}" for r, e in report["bad_by_reason"].items()) or "none"
    used = f", {report['used']} used (weight {report['weight']})" if "used" in report else ""
    t = report["tokens"]
    return (
        f"data {report['split']} source {report['name']}: {report['rows']} rows, {report['good']} good{used}, "
        f"bad: {skipped}, truncated: {report['truncated']}, tokens p50/p90/max {t['p50']}/{t['p90']}/{t['max']}"
    )
