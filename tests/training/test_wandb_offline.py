"""An offline wandb run of the tiny model: the SDK's run file holds every logged key and the nested config."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tiny_models import write_caption_data

REPO = Path(__file__).resolve().parents[2]
# What HF's WandbCallback writes (train/ prefix) plus our ThroughputCallback keys; mfu and
# gpu_mem_peak_gb are absent on CPU.
EXPECTED_HISTORY_KEYS = {
    "train/loss",
    "train/grad_norm",
    "train/learning_rate",
    "train/lr/projector",
    "train/tokens_per_s",
    "train/trained_tokens_per_s",
    "train/samples_per_s",
    "train/images_per_s",
    "train/padding_efficiency",
    "train/image_token_fraction",
    "train/global_step",
}
BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc32c, length, type) chunks
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> list[Any]:
    """Parse the SDK's `run-*.wandb` file into `wandb_internal_pb2.Record` messages (no network, no API)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail shorter than a chunk header is zero padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
        else:
            break
    return [pb.Record.FromString(r) for r in records]


def history_rows(records: list[Any]) -> list[dict[str, Any]]:
    """The `wandb.log` rows, keys joined as the UI shows them."""
    rows = []
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            rows.append(
                {"/".join(i.nested_key) if i.nested_key else i.key: json.loads(i.value_json) for i in rec.history.item}
            )
    return rows


def config_values(records: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rec in records:
        if rec.WhichOneof("record_type") in ("config", "run"):
            items = rec.config.update if rec.HasField("config") else rec.run.config.update
            for i in items:
                out["/".join(i.nested_key) if i.nested_key else i.key] = json.loads(i.value_json)
    return out


@pytest.mark.slow
def test_offline_wandb_run_records_throughput_keys_and_nested_config(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    source = write_caption_data(tmp_path / "data")
    out = tmp_path / "run"
    overrides = [
        f"model.language_model={tmp_path / 'models' / 'lm'}",
        f"model.vision_tower={tmp_path / 'models' / 'vision'}",
        f"data.train=[{json.dumps(source)}]",
        f"train.output_dir={out}",
        "train.max_steps=4",
        "train.logging_steps=2",
        "train.per_device_train_batch_size=4",
        "train.report_to=[wandb]",
        "wandb.project=llava-train-test",
        "wandb.tags=[tiny, offline]",
        "metrics_every=2",
    ]
    # A clean environment: an in-process wandb run earlier in the session leaves wandb's own service
    # variables behind (and DeepSpeed tests their launcher variables); a child must not inherit them.
    inherited = ("WANDB_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(inherited)}
    env.update({"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"})
    proc = subprocess.run(
        [sys.executable, "-m", "llava_train.train", str(REPO / "configs/demo/pretrain.yaml"), *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_files = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    records = read_wandb_records(run_files[0])
    rows = history_rows(records)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["train/global_step"] for r in train_rows] == [2, 4]
    for row in train_rows:
        assert set(row) >= EXPECTED_HISTORY_KEYS, sorted(EXPECTED_HISTORY_KEYS - set(row))
        assert "train/mfu" not in row and "train/gpu_mem_peak_gb" not in row
        assert 0 < row["train/padding_efficiency"] <= 1 and 0 < row["train/image_token_fraction"] < 1
    config = config_values(records)
    assert config["llava_train"]["stage"] == "pretrain"
    assert config["llava_train"]["wandb"]["tags"] == ["tiny", "offline"]
    # Without wandb the same scalars are in the run folder, and the loss curve is drawn.
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {k.removeprefix("train/") for k in EXPECTED_HISTORY_KEYS} - {"global_step"} <= set(jsonl[0]) | {"loss"}
    assert (out / "loss.png").is_file()
    assert "tok/s" in proc.stderr and "| real " in proc.stderr
