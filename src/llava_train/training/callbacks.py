"""Run-reporting Trainer callbacks: throughput/MFU + group lr logs, console line, metrics JSONL, loss PNG, wandb."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from llava_train.training.metrics import ThroughputTracker
from llava_train.utils.logging import get_logger

log = get_logger(__name__)

PredictionsFn = Callable[[Any], list[dict[str, Any]]]


def wandb_enabled(report_to: Any) -> bool:
    """Whether `train.report_to` includes wandb."""
    if report_to is None:
        return False
    targets = [report_to] if isinstance(report_to, str) else list(report_to)
    return "wandb" in targets or "all" in targets


@contextlib.contextmanager
def optional_artifact(what: str) -> Iterator[None]:
    """Nothing optional stops a run: a failure in the block (a plot, a wandb table, sample predictions, an
    optional extra that is not installed) is logged as a warning, and training and the final save go on."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - any failure of an optional artifact
        log.warning("%s failed, the run goes on without it: %s: %s", what, type(e).__name__, e)


def _is_training_log(logs: Mapping[str, Any] | None) -> bool:
    # Trainer.log also carries eval metrics (eval_*) and the end-of-training summary (train_*).
    return bool(logs) and "loss" in logs


def group_learning_rates(optimizer: Any) -> dict[str, float]:
    """`lr/<name>` for each distinct optimizer group name ("projector/decay" -> "lr/projector").

    Groups without a `name` key are logged as `lr/group_<index>`.
    """
    out: dict[str, float] = {}
    for i, group in enumerate(getattr(optimizer, "param_groups", None) or []):
        name = group.get("name")
        key = f"lr/{name.split('/')[0]}" if name else f"lr/group_{i}"
        out.setdefault(key, float(group["lr"]))
    return out


def _si(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.1f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.1f}"


def format_console_line(step: int, logs: Mapping[str, Any]) -> str:
    """The compact per-N-steps summary; parts whose key is missing (e.g. MFU on CPU) are left out.

    Example: `step 120 | loss 1.234 | 5.1k tok/s | 3.2k trained tok/s | 12.0 img/s | real 87% | MFU 41.2% | mem 61.3G`
    """
    parts = [f"step {step}"]
    fields = (
        ("loss", lambda v: f"loss {v:.3f}"),
        ("grad_norm", lambda v: f"gnorm {v:.3g}"),
        ("tokens_per_s", lambda v: f"{_si(v)} tok/s"),
        ("trained_tokens_per_s", lambda v: f"{_si(v)} trained tok/s"),
        ("images_per_s", lambda v: f"{_si(v)} img/s"),
        ("padding_efficiency", lambda v: f"real {100 * v:.0f}%"),
        ("mfu", lambda v: f"MFU {100 * v:.1f}%"),
        ("gpu_mem_peak_gb", lambda v: f"mem {v:.1f}G"),
    )
    for key, fmt in fields:
        value = logs.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(fmt(float(value)))
    return " | ".join(parts)


class ThroughputCallback(TrainerCallback):
    """Merges the tracker's interval rates and `lr/<group>` into every training log; prints the console line.

    Must run BEFORE the reporting callbacks (wandb, tensorboard) so they record the merged keys:
    `training.assembly` puts it first. Runs on every rank because `tracker.flush()` all-reduces.
    Evaluation and checkpoint saving time is left out of the rates.

    tracker: the ThroughputTracker the trainer feeds in `training_step`.
    every: print the console line at most every N optimizer steps (0 = with every training log).
    """

    def __init__(self, tracker: ThroughputTracker, every: int = 0) -> None:
        self.tracker = tracker
        self.every = every
        self._last_step_end: float | None = None
        self._last_printed: int | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Start the first interval (model building and data loading before this are not counted)."""
        self.tracker.start()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Remember when the optimizer step ended: eval/save after it is excluded from the rates."""
        self._last_step_end = self.tracker.clock()

    def _exclude_since_step_end(self) -> None:
        now = self.tracker.clock()
        marks = [m for m in (self._last_step_end, self.tracker.interval_start()) if m is not None]
        if marks:
            self.tracker.exclude(now - max(marks))
        self._last_step_end = now

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Leave the evaluation pass out of the throughput interval."""
        self._exclude_since_step_end()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Leave checkpoint saving out of the throughput interval."""
        self._exclude_since_step_end()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        """Add throughput, MFU, memory and per-group lr to the logs (and to state.log_history)."""
        if logs is None or not _is_training_log(logs):
            return
        extra = {**self.tracker.flush(), **group_learning_rates(optimizer)}
        logs.update(extra)
        # Trainer.log appended a copy (with "step") to log_history before calling on_log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
        due = self.every <= 0 or self._last_printed is None or state.global_step - self._last_printed >= self.every
        if state.is_world_process_zero and due:
            log.info(format_console_line(state.global_step, logs))
            self._last_printed = state.global_step


def scalar(value: Any) -> float | int | bool | None:
    if isinstance(value, (bool, int, float)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return None


class MetricsJsonlCallback(TrainerCallback):
    """Appends every logged scalar as one JSON line `{"step": N, key: value, ...}` (rank 0 only).

    Works without wandb; the sweep runner reads the final metric from it. Non-finite values are
    written as JSON null so the file stays strict JSON.

    path: the JSONL file (the run folder's `metrics.jsonl`).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write the scalars of this log call."""
        if not state.is_world_process_zero or not logs:
            return
        record: dict[str, Any] = {"step": state.global_step}
        for key, value in logs.items():
            number = scalar(value)
            if number is None:
                continue
            record[key] = None if isinstance(number, float) and not math.isfinite(number) else number
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def write_loss_plot(
    history: list[dict[str, Any]] | dict[str, list[dict[str, Any]]], path: str | os.PathLike
) -> Path | None:
    """Plot train `loss` (and `eval_loss`) against step from Trainer log histories; None when no loss was logged.

    `history` is one run's log history, or {panel title: log history} for one panel per run (the demo's
    stages side by side; always drawn).
    """
    panels = history if isinstance(history, dict) else {"": history}
    curves = {
        title: (
            [(h["step"], h["loss"]) for h in hist if "loss" in h and "step" in h],
            [(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h and "step" in h],
        )
        for title, hist in panels.items()
    }
    if not isinstance(history, dict) and not any(train or evals for train, evals in curves.values()):
        return None  # one run that logged no loss: no figure (panels are drawn even when empty)
    # The Figure + Agg canvas API leaves pyplot's global backend and figure registry untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7 if len(panels) == 1 else 5 * len(panels), 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, (train, evals)) in zip(axes, curves.items()):
        if train:
            ax.plot(*zip(*train), label="train loss", linewidth=1.2)
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.2)
        if title:
            ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


class LossPlotCallback(TrainerCallback):
    """Writes the loss-curve PNG (train loss, eval loss if any) at the end of training (rank 0 only).

    path: the PNG file (the run folder's `loss.png`).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Plot from the trainer's log history (which also holds the history of a resumed run)."""
        if not state.is_world_process_zero:
            return
        with optional_artifact(f"loss plot {self.path} (needs the `plot` extra: matplotlib)"):
            if write_loss_plot(state.log_history, self.path) is not None:
                log.info("loss curve written to %s", self.path)
