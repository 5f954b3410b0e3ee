"""Run-safety drills on one process: torn checkpoints, SIGTERM, non-finite steps, a full disk, the final folder.

Each drill fails without its fix: a torn newest checkpoint used to be picked by `resume=auto` (and die in
safetensors), SIGTERM killed the run with nothing saved, a NaN loss trained on, a failed save could
leave no complete checkpoint, and the final folder held a pickle.
"""

from __future__ import annotations

import errno
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from llava_train.config import from_dict
from llava_train.config_io import ConfigError
from llava_train.errors import EXIT_NONFINITE, EXIT_PREEMPTED, CheckpointWriteError
from llava_train.run_files import COMPLETE_MARKER, PREEMPTED_FILE
from llava_train.train import run
from llava_train.training.resume import check_checkpoint, complete_checkpoints
from llava_train.training.safety import NonFiniteStepError, StepGuard
from llava_train.training.trainer import LLaVATrainer
from tiny_models import losses, tiny_config, write_tiny_data

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("safety")
    paths = write_tiny_data(root / "data", n=16, text_only=4)
    paths.update(lm=str(root / "models" / "lm"), vision=str(root / "models" / "vision"), root=str(root))
    return paths


def _config(ws: dict[str, str], out: Path, **train: object) -> dict:
    train = {"max_steps": 8, "save_steps": 2, "per_device_train_batch_size": 2, **train}
    return tiny_config(ws, "finetune", str(out), **train)


@pytest.fixture(scope="module")
def reference(ws: dict[str, str]) -> dict[int, float]:
    """The uninterrupted run every drill's resumed losses must equal."""
    out = Path(ws["root"]) / "runs" / "reference"
    return losses(run(from_dict(_config(ws, out))).log_history)


def _assert_continues(reference: dict[int, float], resumed: dict[int, float], after: int) -> None:
    steps = sorted(s for s in resumed if s > after)
    assert steps == list(range(after + 1, 9))
    for s in steps:
        assert resumed[s] == pytest.approx(reference[s], rel=1e-5, abs=1e-6), s


def test_every_checkpoint_is_complete_and_the_final_folder_holds_no_pickle(ws: dict, reference: dict) -> None:
    out = Path(ws["root"]) / "runs" / "reference"
    assert [p.name for p in complete_checkpoints(out)] == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
        "checkpoint-8",
    ]
    manifest = json.loads((out / "checkpoint-8" / COMPLETE_MARKER).read_text())
    assert (
        manifest["step"] == 8
        and "model.safetensors" in manifest["files"]
        and "projector.safetensors" in manifest["files"]
    )
    finals = [p for p in out.iterdir() if p.is_file()]
    assert not [p.name for p in finals if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")]
    assert json.loads((out / "training_args.json").read_text())["max_steps"] == 8


def test_torn_newest_checkpoint_is_skipped_and_the_run_continues_exactly(ws: dict, reference: dict) -> None:
    src = Path(ws["root"]) / "runs" / "reference"
    out = Path(ws["root"]) / "runs" / "torn"
    for step in (2, 4, 6):
        shutil.copytree(src / f"checkpoint-{step}", out / f"checkpoint-{step}")
    weights = out / "checkpoint-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # what a crash during the save leaves
    size = (src / "checkpoint-6" / "model.safetensors").stat().st_size
    assert check_checkpoint(out / "checkpoint-6") == f"model.safetensors has 100 bytes, the checkpoint wrote {size}"
    (out / "checkpoint-5").mkdir()  # a save that never got its marker
    with pytest.raises(
        ConfigError, match=r"checkpoint-6 is not a complete checkpoint: model.safetensors has 100 bytes"
    ):
        run(from_dict(_config(ws, out, resume_from_checkpoint=str(out / "checkpoint-6"))))
    resumed = run(from_dict(_config(ws, out, resume_from_checkpoint="auto")))
    _assert_continues(reference, losses(resumed.log_history), after=4)


def test_sigterm_saves_at_the_next_step_exits_3_and_resumes_exactly(ws: dict, reference: dict, tmp_path: Path) -> None:
    out = Path(ws["root"]) / "runs" / "sigterm"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_config(ws, out, save_steps=100)))
    env = {
        "PYTHONPATH": str(TESTS),
        "PATH": "/usr/bin:/bin",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
    }
    # The signal arrives after step 3 has ended; the checkpoint follows the next optimizer step.
    done = subprocess.run(
        [sys.executable, str(TESTS / "fault_runner.py"), "sigterm", "3", "0", str(cfg)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == EXIT_PREEMPTED, done.stderr[-3000:]
    assert "llava-train: preempted: checkpoint-4 saved" in done.stderr
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-4"]
    assert json.loads((out / PREEMPTED_FILE).read_text())["signal"] == "SIGTERM"
    assert not (out / "model.safetensors").exists()  # a preempted run writes no final model
    resumed = run(from_dict(_config(ws, out, save_steps=100, resume_from_checkpoint="auto")))
    _assert_continues(reference, losses(resumed.log_history), after=4)
    assert not (out / PREEMPTED_FILE).exists() and (out / "model.safetensors").is_file()


def _nan_at(monkeypatch: pytest.MonkeyPatch, steps: set[int]) -> None:
    """The loss of optimizer step s + 1 (s in `steps`) comes out NaN, as from a diverging model or a bad sample."""
    import llava_train.training.trainer as loss_module  # where LLaVATrainer.compute_loss looks the loss up

    real = loss_module.trained_positions_loss
    calls = {"n": 0}  # one micro-batch per optimizer step in these runs

    def nan_loss(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls["n"] - 1 in steps else out

    monkeypatch.setattr(loss_module, "trained_positions_loss", nan_loss)


def test_nan_error_names_the_step_its_samples_and_the_last_checkpoint(
    ws: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = Path(ws["root"]) / "runs" / "nan-error"
    _nan_at(monkeypatch, {4})
    with pytest.raises(NonFiniteStepError) as err:
        run(from_dict(_config(ws, out)))
    message = str(err.value)
    assert "non-finite loss or gradients at step 5" in message
    assert "loss nan on finetune.json row " in message and "(id '" in message
    assert f"the last complete checkpoint is {out / 'checkpoint-4'}" in message
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]


def test_nan_skip_leaves_the_weights_untouched_and_counts(ws: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    out = Path(ws["root"]) / "runs" / "nan-skip"
    _nan_at(monkeypatch, {3})
    seen: dict[int, torch.Tensor] = {}
    from transformers import TrainerCallback

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):  # noqa: ANN001
            seen[state.global_step] = model.model.multi_modal_projector.linear_2.weight.detach().clone()

    import llava_train.train as train_module

    build = train_module.build_trainer
    monkeypatch.setattr(train_module, "build_trainer", lambda *a, **k: _with(build(*a, **k), Watch()))
    result = run(from_dict(_config(ws, out, nan_policy="skip", save_steps=100)))
    assert torch.equal(seen[4], seen[3]) and not torch.equal(seen[3], seen[2])  # step 4 was skipped
    logged = [h for h in result.log_history if "loss" in h]
    assert [h["skipped_steps"] for h in logged] == [0, 0, 0, 1, 1, 1, 1, 1]


def _with(trainer: LLaVATrainer, callback: object) -> LLaVATrainer:
    trainer.add_callback(callback)
    return trainer


def test_too_many_skipped_steps_stop_the_run(ws: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_at(monkeypatch, set(range(2, 9)))
    with pytest.raises(NonFiniteStepError, match=r"3 non-finite steps in a row \(train.max_skipped_steps=2\)"):
        run(from_dict(_config(ws, Path(ws["root"]) / "runs" / "nan-many", nan_policy="skip", max_skipped_steps=2)))


def test_nan_exit_code_through_the_entry_point(ws: dict, tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_config(ws, tmp_path / "out", save_steps=100)))
    env = {
        "PYTHONPATH": str(TESTS),
        "PATH": "/usr/bin:/bin",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
    }
    done = subprocess.run(
        [sys.executable, str(TESTS / "fault_runner.py"), "nan", "1", "0", str(cfg)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == EXIT_NONFINITE, done.stderr[-3000:]
    assert "llava-train: stopped: non-finite loss or gradients at step 2" in done.stderr
    assert "no complete checkpoint yet" in done.stderr and "Traceback" not in done.stderr


def test_a_full_disk_keeps_the_last_complete_checkpoint(
    ws: dict, reference: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import llava_train.training.checkpoint as checkpoint

    out = Path(ws["root"]) / "runs" / "disk-full"
    real = checkpoint.save_file
    calls = {"n": 0}

    def full_disk(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == 3:  # the third checkpoint's weights
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(
        CheckpointWriteError, match=rf"the last complete checkpoint, {out / 'checkpoint-4'}, is intact"
    ):
        run(from_dict(_config(ws, out)))
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    monkeypatch.setattr(checkpoint, "save_file", real)
    resumed = run(from_dict(_config(ws, out, resume_from_checkpoint="auto")))
    _assert_continues(reference, losses(resumed.log_history), after=4)


def test_save_total_limit_keeps_the_newest_complete_checkpoints(ws: dict) -> None:
    out = Path(ws["root"]) / "runs" / "limit"
    run(from_dict(_config(ws, out, save_total_limit=2)))
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-6", "checkpoint-8"]


def test_signals_are_handled_only_during_training() -> None:
    before = signal.getsignal(signal.SIGTERM)
    guard = StepGuard()
    guard.install_signal_handlers()
    assert signal.getsignal(signal.SIGTERM) == guard._on_signal
    guard.restore_signal_handlers()
    assert signal.getsignal(signal.SIGTERM) == before
