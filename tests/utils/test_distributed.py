"""Tests for utils.distributed: CPU launch preparation (subprocess: it starts process groups) and ZeRO helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava_train.utils import distributed
from llava_train.utils.distributed import (
    full_numel,
    gathered,
    is_zero3_param,
    load_state_dict_gathered,
    local_numel,
    prepare_distributed,
    rank,
    world_size,
)

REPO = Path(__file__).resolve().parents[2]
ZERO3 = REPO / "configs" / "deepspeed" / "zero3.json"
CLEAN_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "DS_ACCELERATOR",
    "ACCELERATE_USE_DEEPSPEED",
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return env


def test_accelerator_machine_gets_kwargs_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed, "has_accelerator", lambda: True)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    given = {"output_dir": "x", "deepspeed": "z.json", "bf16": True}
    got = prepare_distributed(given)
    assert got == given and got is not given
    assert "DS_ACCELERATOR" not in os.environ


def test_cpu_without_deepspeed_sets_use_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed, "has_accelerator", lambda: False)
    for name in CLEAN_ENV:
        monkeypatch.delenv(name, raising=False)
    got = prepare_distributed({"output_dir": "x", "bf16": True})
    assert got == {"output_dir": "x", "bf16": True, "use_cpu": True}
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    assert "RANK" not in os.environ and "ACCELERATE_USE_DEEPSPEED" not in os.environ


def test_non_mapping_accelerator_config_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed, "has_accelerator", lambda: False)
    monkeypatch.setattr("accelerate.PartialState", lambda **kw: None)
    for name in CLEAN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="train.accelerator_config must be a mapping when DeepSpeed runs on CPU"):
        prepare_distributed({"deepspeed": str(ZERO3), "accelerator_config": "acc.json"})


SINGLE_PROCESS = """
import json, os, sys
from llava_train.utils.distributed import prepare_distributed, world_size
kwargs = prepare_distributed({"output_dir": sys.argv[1], "deepspeed": sys.argv[2], "bf16": True, "report_to": [],
                              "accelerator_config": {"split_batches": False}})
from transformers import TrainingArguments
args = TrainingArguments(**kwargs)
print(json.dumps({
    "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "DS_ACCELERATOR")},
    "port": os.environ["MASTER_PORT"], "use_cpu": kwargs["use_cpu"],
    "accelerator_config": kwargs["accelerator_config"],
    "type": str(args.distributed_state.distributed_type), "world": args.world_size, "ws": world_size(),
    "device": str(args.device)}))
"""


def test_plain_python_with_deepspeed_config_runs_as_one_rank(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SINGLE_PROCESS, str(tmp_path), str(ZERO3)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["env"] == {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "DS_ACCELERATOR": "cpu",
    }
    assert int(got["port"]) > 0
    assert got["use_cpu"] is True
    assert got["accelerator_config"] == {"split_batches": False, "use_configured_state": True}
    assert (got["type"], got["world"], got["ws"], got["device"]) == ("DistributedType.DEEPSPEED", 1, 1, "cpu")


def test_helpers_on_plain_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = torch.nn.Linear(4, 3)
    assert not is_zero3_param(layer.weight)
    assert (local_numel(layer.weight), full_numel(layer.weight)) == (12, 12)
    with gathered(layer):
        assert layer.weight.shape == (3, 4)
    missing, unexpected = load_state_dict_gathered(layer, {"weight": torch.ones(3, 4), "bias": torch.zeros(3)})
    assert (missing, unexpected) == ([], [])
    assert torch.equal(layer.weight, torch.ones(3, 4))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert (world_size(), rank()) == (4, 3)


def test_zero3_param_detection_uses_deepspeed_attributes() -> None:
    p = torch.nn.Parameter(torch.empty(0))
    p.ds_id = 7
    p.ds_tensor = torch.zeros(5)
    p.ds_numel = 10
    assert is_zero3_param(p)
    assert (local_numel(p), full_numel(p)) == (5, 10)


TEARDOWN = """
import json, sys
import torch.distributed as dist
from llava_train.utils.distributed import prepare_distributed, shutdown_distributed
before = shutdown_distributed(True)  # nothing to tear down yet
from transformers import TrainingArguments
TrainingArguments(**prepare_distributed({"output_dir": sys.argv[1], "deepspeed": sys.argv[2], "report_to": []}))
group = dist.new_group([0])  # DeepSpeed creates groups of its own; all of them must go
up = dist.is_initialized()
destroyed = shutdown_distributed(True)
print(json.dumps({"before": before, "up": up, "destroyed": destroyed, "after": dist.is_initialized()}))
"""


def test_shutdown_destroys_every_process_group(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", TEARDOWN, str(tmp_path), str(ZERO3)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"before": False, "up": True, "destroyed": True, "after": False}
