"""The precision policy on 2 CPU ranks (gloo) whose data differ: DDP and FSDP2 under torchrun (our fp32 masters; FSDP2
shards them and gathers bf16), ZeRO-2 and ZeRO-3 under the deepspeed launcher (DeepSpeed's own masters, never a
second upcast). From bf16 parts, one AdamW
step at lr 2e-5 moves every trainable element that has a gradient in the checkpoint's fp32 masters, and the frozen
vision tower is bit-identical in the final folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_deepspeed_cpu import DS_DIR, launch, workspace, write_config  # noqa: F401  (workspace: a fixture)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
LR = 2e-5


@pytest.fixture(scope="module")
def stage1(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """An fp32 HF-native stage-1 folder: what the finetunes start from (no random init left in them)."""
    from llava_train.config import from_dict
    from llava_train.train import run

    out = tmp_path_factory.mktemp("precision") / "stage1"
    run(from_dict(finetune_config(workspace, out, engine="none") | {"stage": "pretrain"}))
    return out


def finetune_config(root: Path, out: Path, engine: str, init_from: Path | None = None) -> dict[str, Any]:
    """Stage 2 from `init_from` in bf16 (frozen parts bf16; bf16 autocast or DeepSpeed bf16), one step, one sample a
    rank; without `init_from` the fp32 stage-1 run it starts from."""
    pretrain = init_from is None
    train: dict[str, Any] = {
        "output_dir": str(out),
        "max_steps": 2 if pretrain else 1,
        "per_device_train_batch_size": 1,
        "learning_rate": 1e-3 if pretrain else LR,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "no" if pretrain else "steps",
        "save_steps": 1,
        "seed": 0,
        "dataloader_num_workers": 0,
        "report_to": [],
        "disable_tqdm": True,
    }
    if not pretrain:
        train["bf16"] = True
    if engine == "fsdp2":
        train["fsdp"] = str(DS_DIR.parent / "fsdp" / "fsdp2.yaml")
    elif engine != "none" and engine != "ddp":
        train["deepspeed"] = str(DS_DIR / f"{engine}.json")
    config: dict[str, Any] = {
        "stage": "finetune",
        "model": {
            "language_model": str(root / "models" / "lm"),
            "vision_tower": str(root / "models" / "vision"),
            "preset": "tiny",
            "dtype": "float32" if pretrain else "bfloat16",
        },
        "data": {
            "train": [
                {
                    "path": str(root / f"{'pretrain' if pretrain else 'finetune'}.json"),
                    "image_folder": str(root / "images"),
                }
            ],
            "template": "plain" if pretrain else "vicuna_v1",
            "model_max_length": 256,
        },
        "train": train,
    }
    if init_from is not None:
        config["model"]["init_from"] = str(init_from)
    return config


def masters(ckpt: Path, engine: str) -> dict[str, torch.Tensor]:
    """The fp32 master weights a checkpoint holds: ours in model.safetensors (DDP) or in the DCP shards (FSDP2),
    DeepSpeed's in its optimizer states."""
    if engine == "ddp":
        return load_file(ckpt / "model.safetensors")
    if engine == "fsdp2":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(ckpt / "pytorch_model_fsdp_0", ckpt.parent / "fsdp_masters.pt")
        return torch.load(ckpt.parent / "fsdp_masters.pt", weights_only=True)["model"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt))


@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3", "fsdp2"])
def test_one_step_moves_fp32_masters_on_two_ranks(engine: str, workspace: Path, stage1: Path, tmp_path: Path) -> None:  # noqa: F811
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "out"
    cfg = write_config(tmp_path, "ft", finetune_config(workspace, out, engine, init_from=stage1))
    launcher = "torchrun" if engine in ("ddp", "fsdp2") else "deepspeed"
    module_flag = "-m" if launcher == "torchrun" else "--module"
    _, output = launch([module_flag, "llava_train.train", str(cfg)], workspace, launcher=launcher)
    assert "training arguments ready (world size 2" in output
    policy_line = next(line for line in output.splitlines() if "precision:" in line)
    if engine in ("ddp", "fsdp2"):
        assert "trainable in fp32 (master weights, fp32 optimizer state)" in policy_line, policy_line
    else:
        assert "held by DeepSpeed's optimizer" in policy_line, policy_line
    if engine == "fsdp2":
        assert "gather in torch.bfloat16, reduce in torch.float32" in output
    start = dict(AutoModelForImageTextToText.from_pretrained(str(stage1), dtype=torch.bfloat16).named_parameters())
    after = masters(out / "checkpoint-1", engine)
    trainable = [n for n in start if not n.startswith("model.vision_tower.")]
    assert set(trainable) <= set(after), sorted(set(trainable) - set(after))[:5]
    for name in trainable:
        assert after[name].dtype == torch.float32, name
        delta = (after[name] - start[name].float()).abs()
        assert delta.max().item() <= LR * 1.01, f"{name}: moved {delta.max().item():g}"
        if name.endswith("embed_tokens.weight"):
            delta = delta[delta.amax(dim=1) > 0]  # rows of tokens in the batches (the others had no gradient)
        changed = (delta > 0).float().mean().item()
        assert changed >= 0.99, f"{engine} {name}: only {changed:.1%} moved"
    final = dict(AutoModelForImageTextToText.from_pretrained(str(out), dtype="auto").named_parameters())
    tower = [n for n in start if n.startswith("model.vision_tower.")]
    assert tower
    for name in tower:
        assert final[name].dtype == torch.bfloat16 and torch.equal(final[name], start[name]), name
