"""Tiny random-init component folders: complete, deterministic, and written by `model.preset` only when missing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

from llava_train.config import ModelConfig
from llava_train.model.tiny import (
    ensure_tiny_components,
    get_tiny_preset,
    write_tiny_language_model,
    write_tiny_vision_tower,
)


def _tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    with safe_open(str(Path(folder) / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_language_model_folders(tiny_parts) -> None:
    llama = AutoConfig.from_pretrained(tiny_parts["llama"])
    qwen = AutoConfig.from_pretrained(tiny_parts["qwen"])
    assert (llama.model_type, llama.vocab_size, llama.hidden_size, llama.num_hidden_layers) == ("llama", 512, 64, 2)
    assert (llama.tie_word_embeddings, llama.bos_token_id, llama.eos_token_id) == (False, 1, 2)
    assert (qwen.model_type, qwen.vocab_size, qwen.tie_word_embeddings) == ("qwen2", 512, True)
    assert len(AutoTokenizer.from_pretrained(tiny_parts["llama"])) == 512
    assert "lm_head.weight" in _tensors(tiny_parts["llama"])
    assert "lm_head.weight" not in _tensors(tiny_parts["qwen"])


def test_vision_tower_folders(tiny_parts) -> None:
    clip = AutoConfig.from_pretrained(tiny_parts["clip"])
    siglip = AutoConfig.from_pretrained(tiny_parts["siglip"])
    assert (clip.model_type, clip.image_size, clip.patch_size, clip.hidden_size) == ("clip_vision_model", 32, 8, 32)
    assert (siglip.model_type, siglip.image_size, siglip.patch_size) == ("siglip_vision_model", 32, 8)
    clip_proc = AutoImageProcessor.from_pretrained(tiny_parts["clip"])
    assert (clip_proc.size, clip_proc.crop_size) == ({"shortest_edge": 32}, {"height": 32, "width": 32})
    assert AutoImageProcessor.from_pretrained(tiny_parts["siglip"]).size == {"height": 32, "width": 32}


def test_same_seed_same_weights(tiny_parts, tmp_path) -> None:
    again = _tensors(write_tiny_vision_tower(tmp_path / "clip", kind="clip", seed=0))
    other = _tensors(write_tiny_vision_tower(tmp_path / "clip1", kind="clip", seed=1))
    first = _tensors(tiny_parts["clip"])
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["encoder.layers.0.mlp.fc1.weight"], other["encoder.layers.0.mlp.fc1.weight"])


def test_ensure_tiny_components_writes_missing_parts_only(tmp_path) -> None:
    cfg = ModelConfig(preset="tiny_chatml", language_model=str(tmp_path / "lm"), vision_tower=str(tmp_path / "vt"))
    ensure_tiny_components(cfg)
    assert AutoConfig.from_pretrained(cfg.language_model).model_type == "qwen2"
    assert AutoConfig.from_pretrained(cfg.vision_tower).model_type == "siglip_vision_model"
    stamp = (Path(cfg.language_model) / "model.safetensors").stat().st_mtime_ns
    ensure_tiny_components(cfg)
    assert (Path(cfg.language_model) / "model.safetensors").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm", "vt"]  # no temporary folders left


def test_no_preset_writes_nothing(tmp_path) -> None:
    ensure_tiny_components(ModelConfig(language_model=str(tmp_path / "lm"), vision_tower=str(tmp_path / "vt")))
    assert list(tmp_path.iterdir()) == []


def test_unknown_names_list_valid_ones(tmp_path) -> None:
    with pytest.raises(KeyError, match=re.escape("unknown tiny preset 'big'; valid presets: tiny, tiny_chatml")):
        get_tiny_preset("big")
    with pytest.raises(KeyError, match=re.escape("unknown tokenizer_style 'gpt'; valid styles: llama, chatml")):
        write_tiny_language_model(tmp_path, tokenizer_style="gpt")
    with pytest.raises(KeyError, match=re.escape("unknown vision tower kind 'vit'; valid kinds: clip, siglip")):
        write_tiny_vision_tower(tmp_path, kind="vit")
