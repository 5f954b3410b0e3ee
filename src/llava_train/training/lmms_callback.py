"""Asynchronous lmms-eval of every checkpoint (`eval.lmms_tasks`): rank 0 queues each complete checkpoint's
`hf/` export, a background thread runs lmms-eval on it in a separate process, and the scores are logged as
`lmms_eval/<task>/<metric>` against the checkpoint's step at the next step (or the end of training).

The training step never waits for an eval and an eval never fails the run (design principle 11); the callback
makes no collective call, so the other ranks never wait either.
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from llava_train.lmms import (
    LmmsRequest,
    evaluate_folder,
    flat_metrics,
    read_record,
    write_record,
)
from llava_train.run_files import (
    HF_EXPORT_DIR,
    LMMS_OUTPUT_DIR,
    LMMS_PENDING_FILE,
    METRICS_FILENAME,
    PREEMPTED_FILE,
    STEP0_DIR,
)
from llava_train.stages import get_stage
from llava_train.training.callbacks import optional_artifact
from llava_train.training.resume import complete_checkpoints
from llava_train.utils.distributed import has_accelerator
from llava_train.utils.logging import get_logger

log = get_logger(__name__)

# wandb's own step axis for the scores: a checkpoint's eval arrives steps after it was saved (and a resumed run
# re-launches older ones), while wandb's run step only grows.
WANDB_STEP = "lmms_eval/step"


def eval_wanted(cfg: Any) -> bool:
    """Whether this run evaluates its checkpoints: tasks named and a stage whose checkpoints are full models.

    Stage 1 is skipped (one log line): its checkpoints are projector-only, its model answers in the `plain`
    template (a caption, not an answer), and exporting a full model per stage-1 checkpoint costs what the
    projector-only checkpoints were made to save.
    """
    if not cfg.eval.enabled:
        return False
    if get_stage(cfg.stage).partial_checkpoints:
        log.info("eval.lmms_tasks: stage %s checkpoints are projector-only, not evaluated", cfg.stage)
        return False
    return True


class LmmsEvalCallback(TrainerCallback):
    """Evaluates every complete checkpoint (and, with `eval.lmms_eval_step0`, the starting model) with lmms-eval.

    Runs on rank 0 only. Each queued folder gets a `lmms_eval.pending` mark (rotation keeps it) until its
    `lmms_eval.json` record is written; at train begin, complete checkpoints with an `hf/` export and no record
    (a killed run's pending ones) are queued again, so a resumed run evaluates every checkpoint exactly once.
    One eval runs at a time, oldest first.

    request: what to run (tasks, interpreter, model args). run_dir: the run folder (metrics.jsonl is there).
    wait_timeout: seconds `on_train_end` waits for the queue; evals still running then are stopped and stay
        pending. wandb: also log to the active wandb run (its own `lmms_eval/step` axis).
    """

    def __init__(
        self,
        request: LmmsRequest,
        run_dir: str | Path,
        wait_timeout: float,
        eval_step0: bool = False,
        wandb: bool = False,
    ) -> None:
        self.request = request
        self.run_dir = Path(run_dir)
        self.wait_timeout = wait_timeout
        self.eval_step0 = eval_step0
        self.wandb = wandb
        self._queue: queue.Queue[tuple[int, Path] | None] = queue.Queue()
        self._done: queue.Queue[tuple[int, dict[str, Any], str | None]] = queue.Queue()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._wandb_ready = False

    # -- the background thread -------------------------------------------------------------------------

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            step, folder = item
            try:
                scores = evaluate_folder(
                    folder / HF_EXPORT_DIR, self.request, folder / LMMS_OUTPUT_DIR, should_stop=self._stop.is_set
                )
            except Exception as e:  # noqa: BLE001 - an eval never fails the run
                if self._stop.is_set():
                    log.warning("lmms-eval of %s stopped at the end of training; it stays pending", folder)
                    continue
                error = f"{type(e).__name__}: {e}"
                with optional_artifact(f"writing {folder}/lmms_eval.json"):
                    write_record(folder, step, None, error)
                self._done.put((step, {}, error))
                continue
            with optional_artifact(f"writing {folder}/lmms_eval.json"):
                write_record(folder, step, scores, None)
            self._done.put((step, flat_metrics(scores), None))

    def _enqueue(self, step: int, folder: Path) -> None:
        (folder / LMMS_PENDING_FILE).touch()
        self._queue.put((step, folder))
        log.info("lmms-eval of %s queued (tasks %s)", folder, ",".join(self.request.tasks))

    # -- the main thread: queue, then log what finished -----------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Start the worker; queue the starting model (step 0) and every checkpoint a killed run left unevaluated."""
        if not state.is_world_process_zero or self._worker is not None:
            return
        self._worker = threading.Thread(target=self._work, name="lmms-eval", daemon=True)
        self._worker.start()
        step0 = self.run_dir / STEP0_DIR
        candidates = ([(0, step0)] if self.eval_step0 else []) + [
            (int(c.name.rsplit("-", 1)[1]), c) for c in complete_checkpoints(self.run_dir)
        ]
        for step, folder in candidates:
            if (folder / HF_EXPORT_DIR).is_dir() and read_record(folder) is None:
                self._enqueue(step, folder)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Queue the checkpoint just completed (its `hf/` export was written before its completion marker)."""
        if not state.is_world_process_zero or self._worker is None:
            return
        ckpt = self.run_dir / f"checkpoint-{state.global_step}"
        if (ckpt / HF_EXPORT_DIR).is_dir():
            self._enqueue(state.global_step, ckpt)
        else:
            self._report(state.global_step, {}, f"no {HF_EXPORT_DIR}/ export in {ckpt} (see the export warning)")

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Log the evals that finished since the last step (never waits)."""
        if state.is_world_process_zero:
            self._drain()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Wait up to `wait_timeout` seconds for the queued evals, then log them; stop what still runs.

        A preempted run waits for nothing (its grace period is for the checkpoint): its evals stay pending and
        the resumed run re-launches them.
        """
        if not state.is_world_process_zero or self._worker is None:
            return

        timeout = 0.0 if (self.run_dir / PREEMPTED_FILE).is_file() else self.wait_timeout
        waiting = self._queue.qsize()
        if waiting:
            log.info("waiting up to %.0f s for %d queued lmms-eval run(s)", timeout, waiting)
        self._queue.put(None)
        self._worker.join(timeout)
        if self._worker.is_alive():
            self._stop.set()
            self._worker.join()
        self._worker = None
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                step, metrics, error = self._done.get_nowait()
            except queue.Empty:
                return
            self._report(step, metrics, error)

    def _report(self, step: int, metrics: dict[str, Any], error: str | None) -> None:
        """One metrics.jsonl line (and a wandb log) per evaluated step; a failure is a warning and a line."""
        if error is not None:
            log.warning("lmms-eval of step %d failed, the run goes on: %s", step, error)
            record: dict[str, Any] = {"step": step, "lmms_eval/error": error}
        else:
            log.info("lmms-eval step %d: %s", step, ", ".join(f"{k} {v}" for k, v in metrics.items()))
            record = {"step": step, **metrics}
        with optional_artifact("lmms-eval metrics.jsonl line"), (self.run_dir / METRICS_FILENAME).open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb and metrics:
            with optional_artifact("lmms-eval wandb log"):
                self._log_wandb(step, metrics)

    def _log_wandb(self, step: int, metrics: dict[str, Any]) -> None:
        import wandb

        if wandb.run is None:
            return
        if not self._wandb_ready:
            wandb.run.define_metric(WANDB_STEP)
            wandb.run.define_metric("lmms_eval/*", step_metric=WANDB_STEP)
            self._wandb_ready = True
        wandb.run.log({WANDB_STEP: step, **metrics})


def build_lmms_callback(cfg: Any, report_wandb: bool) -> LmmsEvalCallback | None:
    """The run's LmmsEvalCallback, or None when `eval.lmms_tasks` is empty or the stage is not evaluated."""
    if not eval_wanted(cfg):
        return None
    devices = cfg.eval.lmms_devices
    request = LmmsRequest.from_config(cfg, cuda=has_accelerator() and devices != "")
    return LmmsEvalCallback(
        request, cfg.output_dir, cfg.eval.lmms_wait_timeout, eval_step0=cfg.eval.lmms_eval_step0, wandb=report_wandb
    )
