"""Which checkpoint a run resumes from: only complete ones (the completion marker's manifest matches the files).

A crash during a save leaves a torn folder (truncated weights, no marker); `resume_from_checkpoint: auto`
skips it, logs why, and takes the newest complete checkpoint. An explicit path to a torn checkpoint is
refused with the folder and the bad file named.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from llava_train.config import RunConfig
from llava_train.config_io import ConfigError
from llava_train.run_files import COMPLETE_MARKER
from llava_train.utils.logging import get_logger

log = get_logger(__name__)

_STEP = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def check_checkpoint(folder: str | os.PathLike) -> str | None:
    """Why `folder` is not a complete checkpoint (None when it is): no marker, a missing or resized file, or a
    safetensors file whose header does not parse."""
    folder = Path(folder)
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return f"no {COMPLETE_MARKER} (the save did not finish)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"{COMPLETE_MARKER} is unreadable: {e}"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the checkpoint wrote {size}"
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as handle:
                    handle.keys()
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                return f"{name} is not a readable safetensors file: {e}"
    return None


def checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The run's `checkpoint-<step>` folders, oldest (lowest step) first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return [p for _, p in sorted(found)]


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    return [p for p in checkpoints(run_dir) if check_checkpoint(p) is None]


def newest_complete_checkpoint(run_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest complete checkpoint or None, [(newer torn folder, why skipped), ...])."""
    skipped: list[tuple[Path, str]] = []
    for folder in reversed(checkpoints(run_dir)):
        reason = check_checkpoint(folder)
        if reason is None:
            return folder, skipped
        skipped.append((folder, reason))
    return None, skipped


def resolve_resume(cfg: RunConfig, out: Path) -> str | None:
    """`train.resume_from_checkpoint`: a path (refused when torn), or `auto`/true for the newest complete one."""
    value = cfg.train.get("resume_from_checkpoint")
    if value in (None, False, "", "false"):
        return None
    if value in (True, "auto", "true", "last"):
        found, skipped = newest_complete_checkpoint(out)
        for folder, reason in skipped:
            log.warning("resume: skipped %s: %s", folder, reason)
        if found is None:
            log.info("resume requested but no complete checkpoint in %s: starting from scratch", out)
            return None
        return str(found)
    path = Path(str(value))
    if not path.is_dir():
        raise ConfigError(f"train.resume_from_checkpoint: no checkpoint folder at {path}")
    reason = check_checkpoint(path)
    if reason is not None:
        raise ConfigError(f"train.resume_from_checkpoint: {path} is not a complete checkpoint: {reason}")
    return str(path)
