"""Progress bars for long data work: shown on a terminal only, on the node's first process; silent in log files."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any


class _Progress:
    """A scan's counters, drawn as a tqdm bar (rows, rows/s, bad rows) when `bar` is set."""

    def __init__(self, bar: Any) -> None:
        self.bar, self.rows, self.bad = bar, 0, 0

    def update(self, rows: int, bad: int = 0) -> None:
        """Count `rows` more rows, `bad` of them bad."""
        self.rows += rows
        self.bad += bad
        if self.bar is not None:
            self.bar.update(rows)
            self.bar.set_postfix(bad=self.bad, refresh=False)


def show_progress(stream: Any = None) -> bool:
    """Whether to draw bars: `stream` (stderr) is a terminal and this is the node's first process (LOCAL_RANK 0
    or unset), so logs redirected to a file, and the other ranks, stay quiet."""
    stream = stream if stream is not None else sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)()) and os.environ.get("LOCAL_RANK", "0") == "0"


@contextlib.contextmanager
def scan_progress(desc: str, total: int, enabled: bool | None = None) -> Iterator[_Progress]:
    """A progress context for `total` rows; `enabled` None = `show_progress()`."""
    bar = None
    if enabled if enabled is not None else show_progress():
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit="rows", dynamic_ncols=True, file=sys.stderr)
    progress = _Progress(bar)
    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()
