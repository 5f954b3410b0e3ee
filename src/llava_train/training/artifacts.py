"""Checkpoint artifacts: projector + resolved config in every checkpoint, trainable-only checkpoints for partial stages."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback

from llava_train.model.builder import save_projector
from llava_train.utils.distributed import gathered
from llava_train.utils.logging import is_main_process

PROJECTOR_FILE = "projector.safetensors"
CHECKPOINT_INFO = "llava_train_checkpoint.json"


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered under ZeRO-3) CPU copies of the trainable parameters, keyed as in state_dict()."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out: dict[str, torch.Tensor] = {}
    with gathered([p for _, p in named]):
        for name, p in named:
            out[name] = p.detach().to("cpu").clone().contiguous()
    return out


def save_trainable_checkpoint(model: torch.nn.Module, output_dir: str | os.PathLike, frozen_from: dict[str, Any]) -> None:
    """Write `model.safetensors` holding only the trainable parameters, plus config and a marker.

    A stage that trains a small part (stage 1: the projector) would otherwise write the whole frozen
    LM into every checkpoint (14 GB for 7B). HF Trainer resumes with a non-strict load, so the
    frozen weights, rebuilt from the named base models, stay as they are.
    """
    state = trainable_state_dict(model)
    if not is_main_process():
        return
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "llava_train": "trainable-only"})
    model.config.save_pretrained(out)
    info = {"kind": "trainable-only", "num_tensors": len(state),
            "num_params": int(sum(t.numel() for t in state.values())), "frozen_from": frozen_from}
    (out / CHECKPOINT_INFO).write_text(json.dumps(info, indent=2))


class CheckpointArtifactsCallback(TrainerCallback):
    """Adds `projector.safetensors` and `llava_train_config.yaml` to every checkpoint.

    Runs on every rank (the projector gather under ZeRO-3 is collective); rank 0 writes.
    """

    def __init__(self, model: torch.nn.Module, config_yaml: str) -> None:
        self.model = model
        self.config_yaml = config_yaml

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        save_projector(self.model, ckpt / PROJECTOR_FILE)
        if is_main_process():
            ckpt.mkdir(parents=True, exist_ok=True)
            (ckpt / "llava_train_config.yaml").write_text(self.config_yaml)
