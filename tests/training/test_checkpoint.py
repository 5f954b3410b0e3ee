"""Checkpoint weights: runtime names, trainable-only for partial stages, and only rank 0 builds and writes them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_train.training.checkpoint import CHECKPOINT_INFO, save_checkpoint_weights
from tiny_models import tiny_llava


def test_rank0_writes_runtime_named_weights(tmp_path: Path) -> None:
    model = tiny_llava("sdpa")
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    assert save_checkpoint_weights(model, tmp_path, trainable_only=True, frozen_from={"language_model": "lm"}) == 4
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert sorted(saved) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert all(name.startswith("model.multi_modal_projector.") for name in saved)
    assert (tmp_path / CHECKPOINT_INFO).is_file()


def test_other_ranks_copy_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 7B DDP run used to build a 14 GB CPU state dict on every rank before the rank check."""
    model = tiny_llava("sdpa")
    copies: list[int] = []
    clone = torch.Tensor.clone

    def counting_clone(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        copies.append(self.numel())
        return clone(self, *args, **kwargs)

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(torch.Tensor, "clone", counting_clone)
    assert save_checkpoint_weights(model, tmp_path / "ckpt", trainable_only=False, frozen_from={}) == 0
    assert copies == [] and not (tmp_path / "ckpt").exists()
    monkeypatch.setenv("RANK", "0")
    assert save_checkpoint_weights(model, tmp_path / "ckpt", trainable_only=False, frozen_from={}) > 0
    assert sum(copies) == sum(p.numel() for p in model.parameters())
