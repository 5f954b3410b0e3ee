"""The demo's lmms-eval task, and the whole loop through the real lmms-eval 0.7.3 (`make lmms-eval-env`): tiny run ->
checkpoints -> asynchronous lmms-eval -> metrics logged; its answers equal `llava-train predict`'s, its scores an
offline `llava-train lmms-eval`'s.

The real-lmms-eval test needs the environment: LLAVA_TRAIN_LMMS_PYTHON (what `make test` sets; then a broken
environment fails the test) or `.venv-lmms/` in the repository; without either it is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llava_train import infer
from llava_train.cli import main
from llava_train.config import from_dict
from llava_train.run_files import LMMS_OUTPUT_DIR, LMMS_RESULT_FILE
from llava_train.tools.demo.lmms_task import TASK_NAME, task_documents, write_lmms_task
from llava_train.tools.demo.shapes import SHORT_ANSWER
from llava_train.tools.demo.splits import generate
from llava_train.train import run
from tiny_models import tiny_config, write_tiny_data

REPO = Path(__file__).resolve().parents[3]
METRIC = f"lmms_eval/{TASK_NAME}/exact_match"


def test_the_demo_writes_its_held_out_split_as_an_lmms_eval_task(tmp_path: Path) -> None:
    data = generate(tmp_path / "data", n_pretrain=0, n_finetune=0, n_eval=4, seed=3)
    include = write_lmms_task(data.eval, data.image_folder, tmp_path / "lmms_tasks")
    folder = include / TASK_NAME
    assert sorted(p.name for p in folder.iterdir()) == [f"{TASK_NAME}.jsonl", f"{TASK_NAME}.yaml", "utils.py"]
    rows = json.loads(data.eval.read_text())
    docs = [json.loads(line) for line in (folder / f"{TASK_NAME}.jsonl").read_text().splitlines()]
    assert docs == task_documents(data.eval, data.image_folder)
    for row, doc in zip(rows, docs):
        human, gpt = row["conversations"]
        assert human["value"] == f"<image>\n{doc['question']}" and doc["question"].endswith(f"\n{SHORT_ANSWER}")
        assert doc["answer"] == gpt["value"] and doc["type"] == row["type"]
        assert doc["image"] == str((data.image_folder / row["image"]).resolve())
    text = (folder / f"{TASK_NAME}.yaml").read_text()
    assert f"task: {TASK_NAME}\n" in text and f'test: "{(folder / f"{TASK_NAME}.jsonl").resolve()}"' in text
    # utils.py runs in lmms-eval's environment: its exact match is infer's.
    namespace: dict = {}
    exec((folder / "utils.py").read_text(), namespace)
    assert namespace["process_results"]({"answer": "Top left"}, [" top-left."]) == {"exact_match": 1.0}
    assert namespace["process_results"]({"answer": "red"}, ["red square"]) == {"exact_match": 0.0}


@pytest.fixture(scope="module")
def lmms_python() -> str:
    named = os.environ.get("LLAVA_TRAIN_LMMS_PYTHON")
    python = named or str(REPO / ".venv-lmms" / "bin" / "python")
    if not named and not Path(python).is_file():
        pytest.skip(
            "no lmms-eval environment: `make lmms-eval-env` (make test builds it and sets LLAVA_TRAIN_LMMS_PYTHON)"
        )
    check = subprocess.run([python, "-c", "import lmms_eval, decord"], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, f"LLAVA_TRAIN_LMMS_PYTHON={python} cannot import lmms_eval: {check.stderr[-2000:]}"
    return python


def _eval_rows(root: Path) -> Path:
    """Four single-question colour rows in LLaVA format over write_tiny_data's images."""
    rows = [
        {
            "id": f"e{i}",
            "image": f"{i}.png",
            "type": "colour",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is it?"},
                {"from": "gpt", "value": ["red", "green", "blue", "yellow"][i]},
            ],
        }
        for i in range(4)
    ]
    (root / "eval.json").write_text(json.dumps(rows))
    return root / "eval.json"


@pytest.mark.slow
def test_stage2_checkpoints_are_scored_by_lmms_eval_during_training_as_predict_answers(
    tmp_path: Path, lmms_python: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ws = write_tiny_data(tmp_path / "data", n=8, text_only=2)
    ws.update(lm=str(tmp_path / "models" / "lm"), vision=str(tmp_path / "models" / "vision"))
    include = write_lmms_task(_eval_rows(tmp_path / "data"), ws["images"], tmp_path / "lmms_tasks")
    evals = {"lmms_tasks": [TASK_NAME], "lmms_include_path": str(include), "lmms_python": lmms_python}
    # Stage 1 with the same eval section: projector-only checkpoints, not evaluated, no hf/ export.
    stage1 = tiny_config(ws, "pretrain", str(tmp_path / "stage1"), max_steps=2, save_steps=2)
    run(from_dict({**stage1, "eval": evals}))
    assert not (tmp_path / "stage1" / "checkpoint-2" / "hf").exists()
    assert "lmms_eval" not in (tmp_path / "stage1" / "metrics.jsonl").read_text()
    cfg = tiny_config(ws, "finetune", str(tmp_path / "run"), max_steps=4, save_steps=2)
    cfg["model"]["init_from"] = str(tmp_path / "stage1")
    run(from_dict({**cfg, "eval": evals}))
    out = tmp_path / "run"

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    scored = {x["step"]: x for x in lines if any(k.startswith("lmms_eval/") for k in x)}
    assert sorted(scored) == [2, 4] and all(set(x) == {"step", METRIC} for x in scored.values()), scored
    for step in (2, 4):
        ckpt = out / f"checkpoint-{step}"
        record = json.loads((ckpt / LMMS_RESULT_FILE).read_text())
        assert record["error"] is None and record["scores"][TASK_NAME]["exact_match"] == scored[step][METRIC]
        # lmms-eval's answers are `llava-train predict`'s on the same image and question.
        [samples] = list((ckpt / LMMS_OUTPUT_DIR).rglob(f"*_samples_{TASK_NAME}.jsonl"))
        answers = {s["doc_id"]: s["filtered_resps"] for s in map(json.loads, samples.read_text().splitlines())}
        docs = task_documents(tmp_path / "data" / "eval.json", ws["images"])
        predictor = infer.make_predictor(*infer.load(ckpt / "hf"), infer.GenerationOptions(max_new_tokens=8))
        predicted = [infer.predict(None, [d["image"]], d["question"], predictor=predictor) for d in docs]
        got = [a[0] if isinstance(a, list) else a for _, a in sorted(answers.items())]
        assert [a.strip() for a in got] == predicted
        # ... and its score is the demo table's exact match (`llava-train eval`, batched) on the same rows.
        options = infer.GenerationOptions(max_new_tokens=8, batch_size=4)
        report = infer.evaluate(ckpt / "hf", tmp_path / "data" / "eval.json", ws["images"], tmp_path / "ev", options)
        assert report["overall"]["exact_match"] == record["scores"][TASK_NAME]["exact_match"]

    # The offline command on the same checkpoints gives the same scores.
    for step in (2, 4):
        before = json.loads((out / f"checkpoint-{step}" / LMMS_RESULT_FILE).read_text())["scores"]
        args = ["lmms-eval", str(out / f"checkpoint-{step}"), "--tasks", TASK_NAME, "--include-path", str(include)]
        assert main([*args, "--python", lmms_python]) == 0
        assert json.loads((out / f"checkpoint-{step}" / LMMS_RESULT_FILE).read_text())["scores"] == before
    assert "lmms_eval" not in sys.modules  # the training process never imported lmms-eval: it is a client
