"""Run safety decided the same way on every rank: preemption signals and non-finite steps.

Once per optimizer step, inside the optimizer's own `step` (which DeepSpeed's ZeRO optimizers call as
well), every rank contributes two flags to one all-reduce: "my loss or my gradients are not finite"
and "I received SIGTERM / SIGUSR1". So a signal that reaches any one rank makes every rank save at
the end of the same step and exit, and a non-finite step is skipped (or stops the run) on every rank
alike. The cost is that one collective of two integers per optimizer step (one host sync); nothing
runs per micro-batch but a device-side `isfinite`.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from llava_train.run_files import PREEMPTED_FILE
from llava_train.training.resume import newest_complete_checkpoint
from llava_train.utils.distributed import collective_device, rank, world_size
from llava_train.utils.logging import get_logger, is_main_process

log = get_logger(__name__)

PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")
NAN_POLICIES = ("error", "skip")
# Written into the run folder by rank 0 when a run stopped for a preemption signal after saving its
# checkpoint (removed when a run finishes): the SLURM script requeues the job when it is there.


class NonFiniteStepError(RuntimeError):
    """A step whose loss or gradients are not finite, with `nan_policy: error` (or too many skipped in a row)."""


class StepGuard:
    """The per-step agreement: non-finite loss/gradients (policy `error` or `skip`) and preemption requests.

    nan_policy: `error` stops the run at the first non-finite step, naming its samples and the last
        complete checkpoint; `skip` skips that optimizer step on every rank and stops after
        `max_skipped_steps` skipped steps in a row.
    run_dir: the run folder (to name the last complete checkpoint).
    """

    def __init__(self, nan_policy: str = "error", max_skipped_steps: int = 10, run_dir: str = ".") -> None:
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"unknown nan_policy {nan_policy!r}; valid: {', '.join(NAN_POLICIES)}")
        self.nan_policy = nan_policy
        self.max_skipped_steps = max_skipped_steps
        self.run_dir = run_dir
        self.signal_received: str | None = None
        self.preempt = False
        self.step = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._bad_loss: torch.Tensor | None = None
        self._losses: list[torch.Tensor] = []
        self._samples: list[str] = []
        self._verdict: str | None = None
        self._handlers: dict[int, Any] = {}

    # -- signals -------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGUSR1 request a checkpoint at the next optimizer-step boundary (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemption signals are not handled: training does not run in the main thread")
            return
        for name in PREEMPTION_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._handlers[sig] = signal.signal(sig, self._on_signal)

    def restore_signal_handlers(self) -> None:
        """Put back the handlers there were before `install_signal_handlers`."""
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)
        self._handlers.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signal_received = signal.Signals(signum).name
        log.warning("%s received: a checkpoint at the end of this optimizer step, then stop", self.signal_received)

    # -- per micro-batch (no host sync) -----------------------------------------------------------

    def observe_batch(self, batch: dict[str, Any]) -> None:
        """Record a micro-batch's samples (named if its step turns out non-finite)."""
        ids, sources = batch.get("ids") or [], batch.get("sources") or []
        self._samples += [f"{src} (id {sid!r})" for sid, src in zip(ids, sources)] or [repr(i) for i in ids]

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Record whether a micro-batch's loss is finite (device-side, no sync); called before its backward."""
        bad = ~torch.isfinite(loss.detach()).all()
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad
        self._losses.append(loss.detach())

    # -- per optimizer step ---------------------------------------------------------------------------

    def wrap(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Route `optimizer.step` through the guard: a skipped step does not touch the weights or Adam's state."""
        inner_step = optimizer.step

        def guarded_step(*args: Any, **kwargs: Any) -> Any:
            if self.decide(optimizer) == "skip":
                return None
            return inner_step(*args, **kwargs)

        optimizer.step = guarded_step  # type: ignore[method-assign]
        return optimizer

    def decide(self, optimizer: torch.optim.Optimizer) -> str:
        """`step` or `skip`; raises NonFiniteStepError under `error`.

        The first call of an optimizer step makes the one collective; further calls in the same step reuse
        its verdict (DeepSpeed's ZeRO optimizers step their parameter groups, or ZeRO-3 sub-groups, one call
        at a time). The gradients checked are those the optimizer holds at that first call: all of them for
        torch/DDP runs, the first group's partition under DeepSpeed (a non-finite loss is always caught).
        """
        if self._verdict is not None:
            return self._verdict
        # FSDP2 gradients are DTensors: each rank checks its own shard (the flags are all-reduced below).
        grads = [_local(p.grad) for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        device = collective_device() if world_size() > 1 else (grads[0].device if grads else torch.device("cpu"))
        local_bad = torch.zeros((), dtype=torch.bool, device=device)
        if self._bad_loss is not None:
            local_bad = local_bad | self._bad_loss.to(device)
        if grads:
            norms = torch._foreach_norm(grads)
            local_bad = local_bad | ~torch.isfinite(torch.stack(norms)).all().to(device)
        asked = torch.tensor(int(self.signal_received is not None), device=device)
        flags = torch.stack([local_bad.to(torch.int64), asked])
        if world_size() > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        bad, preempt = (bool(v) for v in flags.tolist())
        self.preempt = self.preempt or preempt
        self._verdict = self._non_finite() if bad else "step"
        if not bad:
            self.consecutive_skips = 0
        return self._verdict

    def end_step(self) -> None:
        """Close the optimizer step (every rank, at the same point): forget its samples and losses.

        When the optimizer was never asked this step, DeepSpeed found the gradients non-finite itself (its
        overflow check is global) and skipped the update: the same policy applies, with the same count.
        """
        if self._verdict is None and self._losses:
            self._non_finite()
        self._bad_loss, self._losses, self._samples, self._verdict = None, [], [], None

    def _non_finite(self) -> str:

        step = self.step + 1  # the step being taken
        local = {
            "rank": rank(),
            "losses": [_number(x) for x in self._losses],
            "samples": self._samples,
        }
        everyone = [local]
        if world_size() > 1:
            everyone = [None] * world_size()
            torch.distributed.all_gather_object(everyone, local)
        what = "; ".join(
            f"rank {e['rank']}: loss {', '.join(_fmt(x) for x in e['losses'])} on {', '.join(e['samples']) or '?'}"
            for e in everyone
        )
        last, _ = newest_complete_checkpoint(self.run_dir)
        resume = f"the last complete checkpoint is {last}" if last else "no complete checkpoint yet"
        if self.nan_policy == "error":
            raise NonFiniteStepError(
                f"non-finite loss or gradients at step {step} ({what}); {resume}; set train.nan_policy=skip "
                "to skip such steps"
            )
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.consecutive_skips > self.max_skipped_steps:
            raise NonFiniteStepError(
                f"{self.consecutive_skips} non-finite steps in a row (train.max_skipped_steps="
                f"{self.max_skipped_steps}), the last at step {step} ({what}); {resume}"
            )
        log.warning("skipped step %d on every rank: non-finite loss or gradients (%s)", step, what)
        return "skip"


def _number(x: torch.Tensor) -> float:
    return float(x.float().mean().item())


def _fmt(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else str(x)


class SafetyCallback(TrainerCallback):
    """Connects the StepGuard to HF Trainer: signal handlers for the run, the agreed stop + checkpoint, the log.

    After an agreed preemption request the step ends with `should_save` and `should_training_stop`: HF
    writes the checkpoint of that step and training stops; `train.run` then skips the final save and
    the process exits with the documented preemption code. `skipped_steps` joins every training log.
    """

    def __init__(self, guard: StepGuard) -> None:
        self.guard = guard
        self.preempted_at: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.guard.install_signal_handlers()
        self.guard.step = state.global_step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.guard.step = state.global_step - 1  # names of the step that just ended (if it was not finite)
        self.guard.end_step()
        self.guard.step = state.global_step
        if self.guard.preempt and self.preempted_at is None:
            self.preempted_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
            log.warning("preemption: saving checkpoint-%d on every rank, then stopping", state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is not None and "loss" in logs:
            logs["skipped_steps"] = self.guard.skipped_steps
            # Trainer.log appended a copy (with "step") to log_history before calling on_log.
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["skipped_steps"] = self.guard.skipped_steps

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.guard.restore_signal_handlers()
        if self.preempted_at is not None and is_main_process():
            marker = {"step": self.preempted_at, "signal": self.guard.signal_received, "time": time.time()}
            (Path(args.output_dir) / PREEMPTED_FILE).write_text(json.dumps(marker))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor, else the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
