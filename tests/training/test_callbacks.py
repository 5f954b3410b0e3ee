"""Reporting callbacks: log merging, console line, metrics JSONL, loss PNG, wandb env/extras, a tiny real Trainer."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

from llava_train.config import from_dict
from llava_train.training.assembly import build_callbacks
from llava_train.training.callbacks import (
    LossPlotCallback,
    MetricsJsonlCallback,
    ThroughputCallback,
    format_console_line,
    group_learning_rates,
    write_loss_plot,
)
from llava_train.training.metrics import ThroughputTracker
from llava_train.training.wandb_logging import WandbExtrasCallback, wandb_env

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
THROUGHPUT_KEYS = {
    "tokens_per_s",
    "trained_tokens_per_s",
    "samples_per_s",
    "images_per_s",
    "padding_efficiency",
    "image_token_fraction",
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CaptureLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def captured() -> Any:
    handler = CaptureLog()
    logger = logging.getLogger("llava_train")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def batch(n_real: int, length: int = 4) -> dict[str, torch.Tensor]:
    mask = torch.tensor([[1] * n_real + [0] * (length - n_real)])
    return {
        "input_ids": torch.ones(1, length, dtype=torch.long),
        "attention_mask": mask,
        "labels": torch.full((1, length), -100),
    }


def test_group_learning_rates_one_key_per_name() -> None:
    params = [nn.Parameter(torch.zeros(1)) for _ in range(4)]
    opt = torch.optim.SGD(
        [
            {"name": "language_model/decay", "params": [params[0]], "lr": 2e-5},
            {"name": "language_model/no_decay", "params": [params[1]], "lr": 2e-5},
            {"name": "projector/no_decay", "params": [params[2]], "lr": 1e-3},
            {"params": [params[3]], "lr": 0.5},
        ],
        lr=0.1,
    )
    assert group_learning_rates(opt) == {"lr/language_model": 2e-5, "lr/projector": 1e-3, "lr/group_3": 0.5}
    assert group_learning_rates(None) == {}


def test_console_line_format() -> None:
    logs = {
        "loss": 1.2341,
        "tokens_per_s": 5100.0,
        "trained_tokens_per_s": 3210.0,
        "images_per_s": 12.0,
        "padding_efficiency": 0.871,
        "mfu": 0.4123,
        "gpu_mem_peak_gb": 61.27,
    }
    assert format_console_line(120, logs) == (
        "step 120 | loss 1.234 | 5.1k tok/s | 3.2k trained tok/s | 12.0 img/s | real 87% | MFU 41.2% | mem 61.3G"
    )
    assert format_console_line(3, {"loss": 0.5, "tokens_per_s": 2.5e6}) == "step 3 | loss 0.500 | 2.5M tok/s"


def test_throughput_callback_merges_training_logs_only_and_excludes_eval_time(captured: CaptureLog) -> None:
    clock = FakeClock()
    tracker = ThroughputTracker(None, None, image_token_id=9, clock=clock)
    cb = ThroughputCallback(tracker, every=2)
    args, state, control = TrainingArguments(output_dir="unused", report_to=[]), TrainerState(), TrainerControl()
    cb.on_train_begin(args, state, control)
    tracker.observe(batch(3))
    clock.now = 2.0
    cb.on_step_end(args, state, control)
    state.global_step = 1
    logs = {"loss": 1.0}
    state.log_history.append({**logs, "step": 1})
    cb.on_log(args, state, control, logs=logs, optimizer=None)
    assert logs["tokens_per_s"] == 1.5 and logs["padding_efficiency"] == 0.75
    assert state.log_history[-1]["tokens_per_s"] == 1.5
    eval_logs = {"eval_loss": 2.0}
    cb.on_log(args, state, control, logs=eval_logs)
    assert eval_logs == {"eval_loss": 2.0}
    clock.now = 12.0  # a 10 s evaluation right after the log
    cb.on_evaluate(args, state, control)
    tracker.observe(batch(4))
    clock.now = 14.0
    state.global_step = 2
    logs = {"loss": 0.9}
    cb.on_log(args, state, control, logs=logs)
    assert logs["tokens_per_s"] == 2.0  # 4 tokens in the 2 s after the evaluation
    state.global_step = 3
    logs = {"loss": 0.8}
    cb.on_log(args, state, control, logs=logs)
    # every=2: printed at step 1 (first) and step 3; step 3 observed no batch, so only the loss is shown.
    assert captured.lines == [
        "step 1 | loss 1.000 | 1.5 tok/s | 0.0 trained tok/s | 0.0 img/s | real 75%",
        "step 3 | loss 0.800",
    ]


def test_metrics_jsonl_writes_every_scalar_rank0_only(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.jsonl"
    cb = MetricsJsonlCallback(path)
    args, state, control = TrainingArguments(output_dir="unused", report_to=[]), TrainerState(), TrainerControl()
    state.global_step = 7
    cb.on_log(
        args,
        state,
        control,
        logs={
            "loss": 0.25,
            "grad_norm": torch.tensor(1.5),
            "lr/projector": 1e-3,
            "epoch": 1,
            "bad": float("nan"),
            "note": "text",
            "vec": [1, 2],
        },
    )
    state.is_world_process_zero = False
    cb.on_log(args, state, control, logs={"loss": 9.0})
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 7, "loss": 0.25, "grad_norm": 1.5, "lr/projector": 1e-3, "epoch": 1, "bad": None}
    ]


def test_loss_plot_png(tmp_path: Path) -> None:
    history = [{"loss": 2.0, "step": 1}, {"loss": 1.5, "step": 2}, {"eval_loss": 1.7, "step": 2}]
    out = write_loss_plot(history, tmp_path / "loss.png")
    assert out == tmp_path / "loss.png" and out.read_bytes()[:8] == PNG_MAGIC
    assert write_loss_plot([{"train_runtime": 1.0, "step": 2}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def run_config(tmp_path: Path, **train: Any) -> Any:
    return from_dict(
        {
            "stage": "pretrain",
            "metrics_every": 3,
            "wandb": {"project": "p", "tags": ["a", "b"]},
            "train": {"output_dir": str(tmp_path / "run-1"), **train},
        }
    )


def test_wandb_env_sets_missing_variables_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME", "WANDB_RUN_GROUP", "WANDB_TAGS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_PROJECT", "from-agent")
    assert wandb_env(run_config(tmp_path, report_to=[])) == {}
    assert wandb_env(run_config(tmp_path, report_to=["wandb"])) == {"WANDB_NAME": "run-1", "WANDB_TAGS": "a,b"}
    assert (os_env := __import__("os").environ)["WANDB_PROJECT"] == "from-agent" and os_env["WANDB_TAGS"] == "a,b"


def test_build_callbacks_paths_and_order(tmp_path: Path) -> None:
    tracker = ThroughputTracker(None, None, image_token_id=1)
    cbs = build_callbacks(run_config(tmp_path, report_to=["wandb"]), tracker)
    assert [type(c).__name__ for c in cbs] == [
        "ThroughputCallback",
        "MetricsJsonlCallback",
        "LossPlotCallback",
        "WandbExtrasCallback",
    ]
    assert cbs[0].every == 3
    assert cbs[1].path == tmp_path / "run-1" / "metrics.jsonl" and cbs[2].path == tmp_path / "run-1" / "loss.png"
    assert [type(c).__name__ for c in build_callbacks(run_config(tmp_path, report_to="none"), None)] == [
        "MetricsJsonlCallback",
        "LossPlotCallback",
    ]


class ToyModel(nn.Module):
    """Embedding -> 'projector' -> head; returns HF-style {"loss": ...}."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> dict:
        logits = self.head(self.proj(self.emb(input_ids)))
        return {"loss": nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)}


class ToyTrainer(Trainer):
    def __init__(self, *args: Any, tracker: ThroughputTracker, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tracker = tracker

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        m = self.model
        self.optimizer = torch.optim.AdamW(
            [
                {"name": "projector/decay", "params": list(m.proj.parameters()), "lr": 1e-2},
                {"name": "language_model/decay", "params": [*m.emb.parameters(), *m.head.parameters()], "lr": 1e-3},
            ]
        )
        return self.optimizer

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch: Any = None) -> torch.Tensor:
        self.tracker.observe(inputs)
        return super().training_step(model, inputs, num_items_in_batch)


def collate(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def test_real_trainer_writes_jsonl_png_and_console_line(tmp_path: Path, captured: CaptureLog) -> None:
    torch.manual_seed(0)
    rows = [[1 + (i + j) % 15 for j in range(3 + i % 4)] for i in range(24)]
    cfg = run_config(tmp_path, report_to=[])
    args = TrainingArguments(
        output_dir=cfg.output_dir,
        max_steps=6,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=3,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        lr_scheduler_type="constant",
    )
    tracker = ThroughputTracker(None, None, image_token_id=99)
    trainer = ToyTrainer(
        model=ToyModel(), args=args, train_dataset=rows, eval_dataset=rows[:8], data_collator=collate, tracker=tracker
    )
    throughput, *others = build_callbacks(cfg, tracker)
    trainer.callback_handler.callbacks.insert(0, throughput)  # first, as training.assembly installs it
    for callback in others:
        trainer.add_callback(callback)
    assert isinstance(trainer.callback_handler.callbacks[0], ThroughputCallback)
    trainer.train()
    records = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    train_logs = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_logs] == [2, 4, 6]
    for r in train_logs:
        assert set(r) >= THROUGHPUT_KEYS | {"grad_norm", "learning_rate"}
        assert r["lr/projector"] == 1e-2 and r["lr/language_model"] == 1e-3
        assert "mfu" not in r and "gpu_mem_peak_gb" not in r
        assert r["image_token_fraction"] == 0.0 and 0 < r["padding_efficiency"] <= 1
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    assert any("train_runtime" in r for r in records)
    assert (Path(cfg.output_dir) / "loss.png").read_bytes()[:8] == PNG_MAGIC
    console = [line for line in captured.lines if line.startswith("step ")]
    # metrics_every=3 with logs at 2, 4, 6: printed at 2 (first) and 6 (>= 3 steps later).
    assert [line.split(" | ")[0] for line in console] == ["step 2", "step 6"]
    assert "tok/s" in console[0] and "real " in console[0]
    assert LossPlotCallback in {type(c) for c in trainer.callback_handler.callbacks}


def test_wandb_extras_offline_logs_nested_config_and_predictions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wandb = pytest.importorskip("wandb")
    from PIL import Image

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = run_config(tmp_path, report_to=["wandb"])
    rows = [
        {"image": Image.new("RGB", (8, 8), (255, 0, 0)), "prompt": "colour?", "prediction": "red", "reference": "red"}
    ]
    cb = WandbExtrasCallback(cfg.to_dict(), {"rows": 10, "skipped": {"too_long": 2}}, lambda model: rows)
    args = TrainingArguments(output_dir="unused", report_to=["wandb"])
    state, control = TrainerState(), TrainerControl()
    run = wandb.init(project="p", dir=str(tmp_path))
    try:
        cb.on_train_begin(args, state, control)
        assert run.config["llava_train"]["wandb"]["tags"] == ["a", "b"]
        assert run.config["llava_train"]["train"]["output_dir"] == cfg.output_dir
        assert set(run.tags) == {"a", "b"}
        assert run.summary["data_report/rows"] == 10 and run.summary["data_report/skipped/too_long"] == 2
        cb.on_evaluate(args, state, control, model=object())
    finally:
        wandb.finish()
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
