"""`llava-train lmms-eval PATH` on a run folder, one checkpoint and a final folder, against the fake `lmms_eval`
(tests/fake_lmms: exact_match = the checkpoint's step / 100, 1.0 for a final folder)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from llava_train.cli import main
from llava_train.lmms import write_record
from llava_train.run_files import LMMS_RESULT_FILE
from llava_train.training.checkpoint import write_complete_marker

FAKE = str(Path(__file__).parents[1] / "fake_lmms")


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run: checkpoint-2 unscored, checkpoint-4 scored during training, checkpoint-6 without hf/, a final model."""
    monkeypatch.setenv("PYTHONPATH", FAKE)
    for step in (2, 4, 6):
        ckpt = tmp_path / f"checkpoint-{step}"
        if step != 6:
            (ckpt / "hf").mkdir(parents=True)
            (ckpt / "hf" / "config.json").write_text("{}")
        ckpt.mkdir(exist_ok=True)
        write_complete_marker(ckpt, step)
    write_record(tmp_path / "checkpoint-4", 4, {"t": {"exact_match": 0.5}}, None)
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def test_a_run_folder_scores_its_unscored_checkpoints_and_prints_the_table(
    run_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["lmms-eval", str(run_dir), "--tasks", "t", "--python", sys.executable]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "| task | metric | step 2 | step 4 | final |",
        "| --- | --- | --- | --- | --- |",
        "| t | exact_match | 0.02 | 0.5 | 1 |",
    ]
    assert json.loads((run_dir / "checkpoint-2" / LMMS_RESULT_FILE).read_text())["scores"] == {
        "t": {"exact_match": 0.02}
    }
    # Nothing is left to score: a second call evaluates nothing and prints the same table.
    (run_dir / "checkpoint-2" / "lmms_eval_out").rename(run_dir / "first_out")
    assert main(["lmms-eval", str(run_dir), "--tasks", "t", "--python", sys.executable]) == 0
    assert not (run_dir / "checkpoint-2" / "lmms_eval_out").exists()


def test_one_checkpoint_is_evaluated_again_as_asked_and_a_failure_exits_1(
    run_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = run_dir / "checkpoint-4"
    assert main(["lmms-eval", str(ckpt), "--tasks", "t,u", "--python", sys.executable, "--limit", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[2:] == ["| t | exact_match | 0.04 |", "| u | exact_match | 0.04 |"]
    monkeypatch.setenv("FAKE_LMMS_EXIT", "5")
    assert main(["lmms-eval", str(ckpt), "--tasks", "t", "--python", sys.executable]) == 1
    assert "llava-train: lmms-eval failed: step 4: lmms-eval exited 5 on" in capsys.readouterr().err
    assert main(["lmms-eval", str(run_dir / "checkpoint-6"), "--tasks", "t"]) == 2  # no hf/: a one-line error
    assert "checkpoint-6 has no hf/ export (train with train.export_hf=true)" in capsys.readouterr().err
