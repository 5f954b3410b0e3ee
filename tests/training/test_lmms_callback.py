"""Asynchronous lmms-eval of every checkpoint during a tiny CPU run, against the fake `lmms_eval` (tests/fake_lmms):
scores logged at the checkpoint's step, the step never waits, rotation keeps pending folders, resume re-launches
them, a failure is a warning and a line, stage 1 is skipped."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerCallback

from llava_train.config import from_dict
from llava_train.config_io import ConfigError
from llava_train.run_files import LMMS_PENDING_FILE, LMMS_RESULT_FILE
from llava_train.train import run
from llava_train.training.checkpoint import HF_EXPORT_DIR, STEP0_DIR, rotate_checkpoints, write_complete_marker
from llava_train.training.lmms_callback import eval_wanted
from tiny_models import tiny_config, write_tiny_data

FAKE = str(Path(__file__).parents[1] / "fake_lmms")
TASK = "llava_train_demo"
METRIC = f"lmms_eval/{TASK}/exact_match"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("lmms")
    paths = write_tiny_data(root / "data", n=8, text_only=2)
    paths.update(lm=str(root / "models" / "lm"), vision=str(root / "models" / "vision"), root=str(root))
    return paths


@pytest.fixture
def fake_lmms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", FAKE)
    monkeypatch.setenv("FAKE_LMMS_SLEEP", "0")


def _cfg(workspace: dict[str, str], name: str, **eval_keys: Any) -> dict[str, Any]:
    train = {"max_steps": 4, "save_steps": 2, "logging_steps": 1}
    train.update(eval_keys.pop("train", {}))
    cfg = tiny_config(workspace, "finetune", str(Path(workspace["root"]) / name), **train)
    cfg["eval"] = {"lmms_tasks": [TASK], "lmms_python": sys.executable, **eval_keys}
    return cfg


def _lmms_lines(run_dir: Path) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if any(k.startswith("lmms_eval/") for k in x)]


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (on_step_begin -> on_step_end; saving and logging come after)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.times.append(time.perf_counter() - self._t0)


def test_every_checkpoint_is_evaluated_asynchronously_at_its_step(
    workspace: dict[str, str], fake_lmms: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import llava_train.training.assembly as assembly

    timer = StepTimer()
    build = assembly.build_callbacks
    monkeypatch.setattr(assembly, "build_callbacks", lambda *a, **k: [*build(*a, **k), timer])
    monkeypatch.setenv("FAKE_LMMS_SLEEP", "3")
    cfg = _cfg(workspace, "async", lmms_eval_step0=True, train={"save_total_limit": 1})
    t0 = time.perf_counter()
    run(from_dict(cfg))
    elapsed = time.perf_counter() - t0
    out = Path(cfg["train"]["output_dir"])

    # Three evals of 3 s each (step 0, 2, 4) ran one after the other while training went on: a step that waited
    # for one would take >= 3 s (a tiny step takes ~0.1 s).
    assert len(timer.times) == 4 and max(timer.times) < 3.0, timer.times
    assert elapsed >= 9.0
    assert _lmms_lines(out) == [{"step": 0, METRIC: 0.0}, {"step": 2, METRIC: 0.02}, {"step": 4, METRIC: 0.04}]
    # checkpoint-2 was still pending when checkpoint-4 rotated the run down to save_total_limit=1.
    for step, folder in ((0, out / STEP0_DIR), (2, out / "checkpoint-2"), (4, out / "checkpoint-4")):
        record = json.loads((folder / LMMS_RESULT_FILE).read_text())
        assert record == {"step": step, "scores": {TASK: {"exact_match": step / 100}}, "error": None}
        assert not (folder / LMMS_PENDING_FILE).exists() and (folder / HF_EXPORT_DIR / "config.json").is_file()
    call = json.loads((out / "checkpoint-4" / "lmms_eval_out" / "fake_call.json").read_text())
    assert f"pretrained={out / 'checkpoint-4' / HF_EXPORT_DIR},device=cpu,device_map=cpu" in call["argv"]


def test_a_failed_eval_is_a_warning_and_a_metrics_line(
    workspace: dict[str, str], fake_lmms: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FAKE_LMMS_EXIT", "3")
    cfg = _cfg(workspace, "failing", train={"max_steps": 2})
    run(from_dict(cfg))
    out = Path(cfg["train"]["output_dir"])
    assert (out / "model.safetensors").is_file()  # the run finished and saved
    [line] = _lmms_lines(out)
    assert line["step"] == 2 and line["lmms_eval/error"].startswith("LmmsEvalError: lmms-eval exited 3 on ")
    assert json.loads((out / "checkpoint-2" / LMMS_RESULT_FILE).read_text())["error"] == line["lmms_eval/error"]
    assert "lmms-eval of step 2 failed, the run goes on" in caplog.text


def test_evals_left_pending_at_the_end_are_relaunched_once_by_the_resumed_run(
    workspace: dict[str, str], fake_lmms: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The end of training waits 0 s: the eval of checkpoint-2 is stopped and stays pending (as after a kill).
    monkeypatch.setenv("FAKE_LMMS_SLEEP", "30")
    cfg = _cfg(workspace, "resumed", lmms_wait_timeout=0, train={"max_steps": 2})
    run(from_dict(cfg))
    out = Path(cfg["train"]["output_dir"])
    assert (out / "checkpoint-2" / LMMS_PENDING_FILE).is_file() and not (
        out / "checkpoint-2" / LMMS_RESULT_FILE
    ).exists()
    assert _lmms_lines(out) == []

    monkeypatch.setenv("FAKE_LMMS_SLEEP", "0")
    cfg = _cfg(workspace, "resumed", train={"max_steps": 4, "resume_from_checkpoint": "auto"})
    run(from_dict(cfg))
    assert _lmms_lines(out) == [{"step": 2, METRIC: 0.02}, {"step": 4, METRIC: 0.04}]
    # Resumed again from an evaluated checkpoint-4: checkpoints 2 and 4 are not evaluated twice.
    run(from_dict(_cfg(workspace, "resumed", train={"max_steps": 6, "resume_from_checkpoint": "auto"})))
    assert _lmms_lines(out) == [{"step": 2, METRIC: 0.02}, {"step": 4, METRIC: 0.04}, {"step": 6, METRIC: 0.06}]


def test_rotation_never_deletes_a_checkpoint_whose_eval_is_pending(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        (tmp_path / f"checkpoint-{step}").mkdir()
        write_complete_marker(tmp_path / f"checkpoint-{step}", step)
    (tmp_path / "checkpoint-1" / LMMS_PENDING_FILE).touch()
    assert rotate_checkpoints(tmp_path, 1) == [tmp_path / "checkpoint-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-3"]


def test_stage1_runs_are_not_evaluated_and_backends_not_built_yet_are_config_errors(
    workspace: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    pretrain = tiny_config(workspace, "pretrain", "x")
    pretrain["eval"] = {"lmms_tasks": "mme,pope"}
    assert from_dict(pretrain).eval.lmms_tasks == ["mme", "pope"]
    assert not eval_wanted(from_dict(pretrain))
    assert "eval.lmms_tasks: stage pretrain checkpoints are projector-only, not evaluated" in caplog.text
    assert eval_wanted(from_dict(_cfg(workspace, "x")))
    assert not eval_wanted(from_dict(tiny_config(workspace, "finetune", "x")))
    for backend in ("server", "sbatch"):
        with pytest.raises(
            ConfigError, match=f"^eval.lmms_backend='{backend}' is not valid; choose one of: subprocess$"
        ):
            from_dict({"eval": {"lmms_tasks": ["mme"], "lmms_backend": backend}})
    with pytest.raises(ConfigError, match="eval.lmms_model_args must not set pretrained="):
        from_dict({"eval": {"lmms_model_args": "pretrained=x"}})


WANDB_SCRIPT = """
import sys, wandb
from llava_train.lmms import LmmsRequest
from llava_train.training.lmms_callback import LmmsEvalCallback
run = wandb.init(project="t", mode="offline", dir=sys.argv[1])
run.log({"train/loss": 1.0})
cb = LmmsEvalCallback(LmmsRequest(("t",)), sys.argv[1], 0.0, wandb=True)
cb._report(4, {"lmms_eval/t/exact_match": 0.5}, None)
cb._report(2, {"lmms_eval/t/exact_match": 0.25}, None)
wandb.finish()
"""


@pytest.mark.slow
def test_wandb_gets_the_scores_on_their_own_step_axis(tmp_path: Path) -> None:
    import os
    import subprocess

    pytest.importorskip("wandb")
    from test_wandb_offline import history_rows, read_wandb_records

    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    proc = subprocess.run([sys.executable, "-c", WANDB_SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [run_file] = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = read_wandb_records(run_file)
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in history_rows(records)]
    # A checkpoint's score arrives after later training steps (and out of order after a resume).
    assert rows[1:] == [
        {"lmms_eval/step": 4, "lmms_eval/t/exact_match": 0.5},
        {"lmms_eval/step": 2, "lmms_eval/t/exact_match": 0.25},
    ]
    metrics = [r.metric for r in records if r.WhichOneof("record_type") == "metric"]
    assert any(m.glob_name == "lmms_eval/*" and m.step_metric == "lmms_eval/step" for m in metrics), metrics
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 4, "lmms_eval/t/exact_match": 0.5}, {"step": 2, "lmms_eval/t/exact_match": 0.25}]


@pytest.mark.slow
def test_kill_9_while_an_eval_is_pending_then_resume_evaluates_every_checkpoint_once(
    workspace: dict[str, str], tmp_path: Path
) -> None:
    import os
    import signal
    import subprocess

    import yaml

    tests = Path(__file__).parents[1]
    cfg = _cfg(workspace, "killed", train={"max_steps": 4})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = Path(cfg["train"]["output_dir"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_RANK"))}
    env["PYTHONPATH"] = os.pathsep.join([FAKE, *filter(None, [env.get("PYTHONPATH")])])
    # Killed at step 3, while checkpoint-2's eval (30 s) runs.
    killed = subprocess.run(
        [sys.executable, str(tests / "fault_runner.py"), "sigkill", "3", "0", str(path)],
        env={**env, "FAKE_LMMS_SLEEP": "30"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    orphan = out / "checkpoint-2" / "lmms_eval_out" / "fake_pid"
    for _ in range(100):  # the eval process was starting when the run died
        if orphan.is_file():
            break
        time.sleep(0.1)
    assert orphan.is_file(), "checkpoint-2's eval never started"
    # The eval process died with its run (PR_SET_PDEATHSIG): no lmms-eval outlives a kill -9.
    pid = int(orphan.read_text())
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("lmms-eval outlived the killed run")
    assert (out / "checkpoint-2" / LMMS_PENDING_FILE).is_file() and not (
        out / "checkpoint-2" / LMMS_RESULT_FILE
    ).exists()

    resumed = subprocess.run(
        [sys.executable, "-m", "llava_train.train", str(path), "train.resume_from_checkpoint=auto"],
        env={**env, "FAKE_LMMS_SLEEP": "0"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _lmms_lines(out) == [{"step": 2, METRIC: 0.02}, {"step": 4, METRIC: 0.04}]


def test_a_preempted_run_waits_for_no_eval(tmp_path: Path, fake_lmms: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from llava_train.lmms import LmmsRequest
    from llava_train.training.lmms_callback import LmmsEvalCallback
    from llava_train.training.safety import PREEMPTED_FILE

    monkeypatch.setenv("FAKE_LMMS_SLEEP", "30")
    (tmp_path / "checkpoint-2" / HF_EXPORT_DIR).mkdir(parents=True)
    cb = LmmsEvalCallback(LmmsRequest((TASK,), python=sys.executable), tmp_path, wait_timeout=3600)
    state = SimpleNamespace(is_world_process_zero=True, global_step=2)
    cb.on_train_begin(None, state, None)
    cb.on_save(None, state, None)
    (tmp_path / PREEMPTED_FILE).write_text("{}")  # what SafetyCallback.on_train_end wrote just before
    t0 = time.perf_counter()
    cb.on_train_end(None, state, None)
    assert time.perf_counter() - t0 < 5.0
    assert (tmp_path / "checkpoint-2" / LMMS_PENDING_FILE).is_file() and not (
        tmp_path / "checkpoint-2" / LMMS_RESULT_FILE
    ).exists()
    assert not (tmp_path / "metrics.jsonl").exists()
