"""Fixtures for model tests: tiny LM + vision tower folders written once per session, and RunConfig factories."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llava_train.config import RunConfig, from_dict
from llava_train.model.tiny import write_tiny_language_model, write_tiny_vision_tower

# The tiny tokenizers have 512 pieces; load_tokenizer appends <image> as id 512.
TINY_VOCAB = 512
IMAGE_TOKEN_ID = 512


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Folders: `llama` LM, `qwen` (chatml, tied) LM, `clip` and `siglip` vision towers."""
    root = tmp_path_factory.mktemp("tiny_parts")
    return {
        "llama": write_tiny_language_model(root / "llama", tokenizer_style="llama"),
        "qwen": write_tiny_language_model(root / "qwen", tokenizer_style="chatml"),
        "clip": write_tiny_vision_tower(root / "clip", kind="clip"),
        "siglip": write_tiny_vision_tower(root / "siglip", kind="siglip"),
    }


@pytest.fixture()
def make_cfg(tiny_parts: dict[str, str], tmp_path: Path) -> Callable[..., RunConfig]:
    """make_cfg(lm="llama", tower="clip", stage="finetune", model={...}, lora={...}, data={...}) -> RunConfig."""

    def make(
        lm: str = "llama",
        tower: str = "clip",
        stage: str = "finetune",
        model: dict[str, Any] | None = None,
        lora: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
    ) -> RunConfig:
        model_cfg = {"language_model": tiny_parts[lm], "vision_tower": tiny_parts[tower], "dtype": "float32"}
        model_cfg.update(model or {})
        template = "vicuna_v1" if lm == "llama" else "tokenizer"
        return from_dict(
            {
                "stage": stage,
                "model": model_cfg,
                "lora": lora or {},
                "data": {"template": template, **(data or {})},
                "train": {"output_dir": str(tmp_path / "run")},
            }
        )

    return make
