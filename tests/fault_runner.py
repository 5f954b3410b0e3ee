"""Runs `llava_train.train.main` with one injected fault: the run-safety drills (tests/training, tests/distributed).

    python tests/fault_runner.py FAULT STEP RANK CONFIG.yaml [key=value ...]      (or under a launcher)

FAULT is what happens on rank RANK (`all` = every rank) when optimizer step STEP has ended:
- `sigterm` / `sigusr1`: the process sends itself that signal (what SLURM / Kubernetes do before preemption);
- `sigkill`: the process dies on the spot (a node lost, an OOM kill);
- `nan`: the loss of the micro-batches of step STEP + 1 is made NaN (a diverging run, a bad sample).
Nothing of the product is replaced: the fault is a Trainer callback, or a wrapper around compute_loss.
The process exits with `train.main`'s own exit code.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from transformers import TrainerCallback

import llava_train.train as train_module
from llava_train.utils.distributed import rank


class _Fault(TrainerCallback):
    def __init__(self, fault: str, step: int) -> None:
        self.fault, self.step = fault, step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step and self.fault in ("sigterm", "sigusr1", "sigkill"):
            os.kill(os.getpid(), getattr(signal, self.fault.upper()))


def main(fault: str, step: int, on_rank: str, argv: list[str]) -> int:
    hit = on_rank == "all" or int(on_rank) == rank()
    build_trainer = train_module.build_trainer

    def with_fault(*args: Any, **kwargs: Any) -> Any:
        trainer = build_trainer(*args, **kwargs)
        if hit and fault != "nan":
            trainer.add_callback(_Fault(fault, step))
        return trainer

    if hit and fault == "nan":
        # Where LLaVATrainer.compute_loss looks the loss up (it imports it at the top of its module).
        import llava_train.training.trainer as loss_module

        real = loss_module.trained_positions_loss
        calls = {"n": 0}  # the drills run one micro-batch per optimizer step

        def nan_loss(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            out = real(*args, **kwargs)
            return out * float("nan") if calls["n"] == step + 1 else out

        loss_module.trained_positions_loss = nan_loss
    train_module.build_trainer = with_fault
    return train_module.main(argv)


if __name__ == "__main__":
    # The deepspeed launcher adds `--local_rank=N` (the same value is in the LOCAL_RANK env var).
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    raise SystemExit(main(args[0], int(args[1]), args[2], args[3:]))
