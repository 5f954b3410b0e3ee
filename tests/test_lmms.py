"""lmms-eval as a client: the command, its environment, lmms-eval's results JSON, the per-folder record; run against
the fake `lmms_eval` of tests/fake_lmms (the real one: tests/test_lmms_real.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from llava_train.lmms import (
    LmmsEvalError,
    LmmsRequest,
    build_command,
    eval_env,
    evaluate_folder,
    flat_metrics,
    is_pending,
    read_record,
    read_results,
    write_record,
)
from llava_train.run_files import LMMS_PENDING_FILE

FAKE = str(Path(__file__).parent / "fake_lmms")


@pytest.fixture
def fake_lmms(monkeypatch: pytest.MonkeyPatch) -> str:
    """`python -m lmms_eval` resolves to the fake; returns the interpreter to name."""
    monkeypatch.setenv("PYTHONPATH", FAKE)
    return sys.executable


def test_command_on_cpu_is_llava_hf_with_cpu_placement(tmp_path: Path) -> None:
    request = LmmsRequest(("mme", "pope"), str(tmp_path / "tasks"), 8, "dtype=float32", "/env/bin/python")
    folder = tmp_path / "checkpoint-4" / "hf"
    assert build_command(folder, request, tmp_path / "out") == [
        "/env/bin/python",
        "-m",
        "lmms_eval",
        "--model",
        "llava_hf",
        "--model_args",
        f"pretrained={folder},device=cpu,device_map=cpu,dtype=float32",
        "--tasks",
        "mme,pope",
        "--batch_size",
        "1",
        "--output_path",
        str(tmp_path / "out"),
        "--log_samples",
        "--include_path",
        str(tmp_path / "tasks"),
        "--limit",
        "8",
    ]
    on_gpu = LmmsRequest(("mme",), cuda=True)
    assert build_command(folder, on_gpu, "o")[:7] == [sys.executable, "-m", "lmms_eval", "--model", "llava_hf",
                                                       "--model_args", f"pretrained={folder}"]  # fmt: skip


def test_eval_env_clears_the_launchers_distributed_variables() -> None:
    base = {
        "PATH": "/bin",
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
        "TORCHELASTIC_RUN_ID": "x",
        "ACCELERATE_MIXED_PRECISION": "bf16",
        "OMPI_COMM_WORLD_SIZE": "2",
        "HF_HUB_OFFLINE": "1",
    }
    assert eval_env(base, None) == {"PATH": "/bin", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    assert eval_env(base, "3")["CUDA_VISIBLE_DEVICES"] == "3"


def _results_json(folder: Path, results: dict) -> None:
    """lmms-eval 0.7.3's layout, as it wrote it for the demo task (trimmed to the keys the reader looks at)."""
    folder.mkdir(parents=True)
    layout = {"results": results, "lmms_eval_version": "0.7.3"}
    (folder / "20261205_220857_results.json").write_text(json.dumps(layout))


def test_read_results_takes_every_metric_and_drops_stderr_and_alias(tmp_path: Path) -> None:
    _results_json(
        tmp_path / "checkpoint-2__hf",
        {
            "llava_train_demo": {
                "alias": "llava_train_demo",
                "exact_match,none": 0.75,
                "exact_match_stderr,none": 0.25,
                "exact_match_stderr_clt,none": 0.25,
                "exact_match_stderr_clustered,none": "N/A",
            },
            "gsm": {"alias": "gsm", "exact_match,flexible-extract": 0.5, "exact_match,strict-match": 0.25},
        },
    )
    scores = read_results(tmp_path, ["llava_train_demo", "gsm"])
    assert scores == {
        "llava_train_demo": {"exact_match": 0.75},
        "gsm": {"exact_match/flexible-extract": 0.5, "exact_match/strict-match": 0.25},
    }
    assert flat_metrics(scores) == {
        "lmms_eval/llava_train_demo/exact_match": 0.75,
        "lmms_eval/gsm/exact_match/flexible-extract": 0.5,
        "lmms_eval/gsm/exact_match/strict-match": 0.25,
    }
    # lmms-eval exits 0 when a task fails: the task is simply missing from its results.
    with pytest.raises(LmmsEvalError, match="task mme is not in lmms-eval's results"):
        read_results(tmp_path, ["llava_train_demo", "mme"])
    with pytest.raises(LmmsEvalError, match="lmms-eval wrote no \\*_results.json under"):
        read_results(tmp_path / "empty", ["mme"])


def test_evaluate_folder_runs_lmms_eval_in_a_clean_process(
    tmp_path: Path, fake_lmms: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    folder = tmp_path / "checkpoint-7" / "hf"
    folder.mkdir(parents=True)
    request = LmmsRequest(("a", "b"), python=fake_lmms, limit=3)
    scores = evaluate_folder(folder, request, tmp_path / "out")
    assert scores == {"a": {"exact_match": 0.07}, "b": {"exact_match": 0.07}}
    call = json.loads((tmp_path / "out" / "fake_call.json").read_text())
    assert call["env"] == {"RANK": None, "WORLD_SIZE": None, "LOCAL_RANK": None, "MASTER_ADDR": None,
                           "CUDA_VISIBLE_DEVICES": None}  # fmt: skip
    assert call["argv"][call["argv"].index("--limit") + 1] == "3"

    monkeypatch.setenv("FAKE_LMMS_DROP", "b")
    with pytest.raises(LmmsEvalError, match="task b is not in lmms-eval's results"):
        evaluate_folder(folder, request, tmp_path / "out2")
    monkeypatch.setenv("FAKE_LMMS_EXIT", "3")
    with pytest.raises(LmmsEvalError, match="lmms-eval exited 3 on .*fake lmms-eval: failing as asked"):
        evaluate_folder(folder, request, tmp_path / "out3")


def test_evaluate_folder_stops_a_run_past_its_timeout(
    tmp_path: Path, fake_lmms: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_LMMS_SLEEP", "30")
    with pytest.raises(LmmsEvalError, match="was stopped after"):
        evaluate_folder(tmp_path, LmmsRequest(("a",), python=fake_lmms), tmp_path / "out", timeout=0.5)


def test_record_replaces_the_pending_mark(tmp_path: Path) -> None:
    (tmp_path / LMMS_PENDING_FILE).touch()
    assert is_pending(tmp_path) and read_record(tmp_path) is None
    write_record(tmp_path, 4, {"mme": {"acc": 0.5}}, None)
    assert not is_pending(tmp_path) and not (tmp_path / LMMS_PENDING_FILE).exists()
    assert read_record(tmp_path) == {"step": 4, "scores": {"mme": {"acc": 0.5}}, "error": None}
