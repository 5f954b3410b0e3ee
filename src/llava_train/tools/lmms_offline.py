"""`llava-train lmms-eval PATH`: lmms-eval on a final folder, one `checkpoint-N` (its `hf/`), or every checkpoint of
a run folder that has no score yet, then one table of the run's scores (task, metric, value per step)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_train.config_io import ConfigError
from llava_train.lmms import LmmsEvalError, LmmsRequest, evaluate_folder, read_record, write_record
from llava_train.run_files import LMMS_OUTPUT_DIR, STEP0_DIR
from llava_train.training.resume import complete_checkpoints
from llava_train.utils.logging import get_logger

log = get_logger(__name__)

HF_EXPORT_DIR = "hf"  # training.checkpoint's name; repeated so that this tool never imports the training stack
FINAL = "final"


@dataclass(frozen=True)
class Target:
    """One evaluable folder: `record_dir` keeps `lmms_eval.json`, `model_dir` is the HF-native model in it."""

    label: str  # "step N" or "final"
    step: int | None
    record_dir: Path
    model_dir: Path


def _step_of(folder: Path) -> int | None:
    head, _, tail = folder.name.rpartition("-")
    return int(tail) if head in ("checkpoint", "step") and tail.isdigit() else None


def _checkpoint_target(folder: Path) -> Target:
    step = _step_of(folder)
    return Target(f"step {step}", step, folder, folder / HF_EXPORT_DIR)


def find_targets(path: str | Path) -> tuple[list[Target], list[Target]]:
    """(folders to evaluate now, every evaluable folder under `path`, for the table).

    A `checkpoint-N` (or `step-0`) folder is evaluated (again) as asked; a run folder's checkpoints with an `hf/`
    export and no `lmms_eval.json` are, and so is its final model when it holds one and has no score; any other
    HF-native folder (a `config.json`) is a final folder.
    """
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder")
    if _step_of(root) is not None:
        if not (root / HF_EXPORT_DIR / "config.json").is_file():
            raise ConfigError(f"{root} has no {HF_EXPORT_DIR}/ export (train with train.export_hf=true)")
        target = _checkpoint_target(root)
        return [target], [target]

    found = [_checkpoint_target(c) for c in [root / STEP0_DIR, *complete_checkpoints(root)]]
    found = [t for t in found if (t.model_dir / "config.json").is_file()]
    if (root / "config.json").is_file():
        found.append(Target(FINAL, None, root, root))
    if not found:
        raise ConfigError(f"{root} holds no HF-native model, checkpoint-N/hf/ export or run folder")
    todo = [t for t in found if read_record(t.record_dir) is None or len(found) == 1]
    return todo, found


def evaluate_path(path: str | Path, request: LmmsRequest) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Evaluate what `find_targets` picks, oldest first; returns ({label: record} of every evaluated folder under
    `path`, [error per failed folder]). Every folder's record is written to its `lmms_eval.json`."""
    todo, found = find_targets(path)
    errors: list[str] = []
    for target in todo:
        log.info("lmms-eval %s (%s) on %s", ",".join(request.tasks), target.label, target.model_dir)
        try:
            scores = evaluate_folder(target.model_dir, request, target.record_dir / LMMS_OUTPUT_DIR)
        except LmmsEvalError as e:
            errors.append(f"{target.label}: {e}")
            write_record(target.record_dir, target.step, None, str(e))
            continue
        write_record(target.record_dir, target.step, scores, None)
    records = {t.label: r for t in found if (r := read_record(t.record_dir)) is not None}
    return records, errors


def format_table(records: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per (task, metric), one column per evaluated step (then `final`); `-` = not scored."""
    labels = list(records)
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for label, record in records.items():
        for task, metrics in (record.get("scores") or {}).items():
            for metric, value in metrics.items():
                rows.setdefault((task, metric), {})[label] = value
    lines = ["| task | metric | " + " | ".join(labels) + " |", "| --- | --- |" + " --- |" * len(labels)]
    for (task, metric), values in rows.items():
        cells = [f"{values[label]:.4g}" if label in values else "-" for label in labels]
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
