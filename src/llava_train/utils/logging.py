"""Rank-aware logging: one logger for the package, quiet on non-zero ranks."""

from __future__ import annotations

import logging
import sys

from llava_train.utils.distributed import rank


def is_main_process() -> bool:
    """True on global rank 0."""
    return rank() == 0


class _StderrHandler(logging.StreamHandler):
    """Writes to the current `sys.stderr` (not the one at start-up: test runners and notebooks replace it)."""

    @property
    def stream(self) -> object:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def get_logger(name: str = "llava_train") -> logging.Logger:
    """The package logger; INFO on rank 0, WARNING elsewhere, one handler."""
    logger = logging.getLogger(name if name.startswith("llava_train") else f"llava_train.{name}")
    root = logging.getLogger("llava_train")
    if not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[llava-train %(asctime)s] %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO if is_main_process() else logging.WARNING)
        root.propagate = False
    return logger
