"""Shared test fixtures: tiny tokenizers trained in the session and tiny CLIP/SigLIP vision folders (no downloads)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llava_train.data.tiny_tokenizer import build_tiny_tokenizer

TINY_IMAGE_SIZE = 32
TINY_PATCH_SIZE = 8
# (32 // 8) ** 2 patches; +1 with CLIP's CLS token (cls_patch).
TINY_NUM_PATCHES = 16


@pytest.fixture(autouse=True)
def _restore_environment() -> Iterator[None]:
    """Each test sees the environment the session started with: in-process runs export variables
    (DS_ACCELERATOR, WANDB_*, the single-process RANK/MASTER_PORT) that must not reach later tests."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Folder of a tiny Llama-style SentencePiece BPE tokenizer (`<s>`, `</s>`, `<unk>`; no pad)."""
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok_llama"), style="llama")


@pytest.fixture(scope="session")
def chatml_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Folder of a tiny chatml byte-level BPE tokenizer with a Qwen2-like chat template."""
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok_chatml"), style="chatml")


@pytest.fixture(scope="session")
def llama_tokenizer(llama_tokenizer_dir: str) -> Any:
    """The tiny Llama tokenizer loaded as training loads it (`<image>` added, pad = unk)."""
    from llava_train.data.tokenize import load_tokenizer

    return load_tokenizer(llama_tokenizer_dir)


@pytest.fixture(scope="session")
def chatml_tokenizer(chatml_tokenizer_dir: str) -> Any:
    """The tiny chatml tokenizer loaded as training loads it (`<image>` added, pad = `<|endoftext|>`)."""
    from llava_train.data.tokenize import load_tokenizer

    return load_tokenizer(chatml_tokenizer_dir)


def _tiny_vision_kwargs() -> dict[str, int]:
    return {
        "image_size": TINY_IMAGE_SIZE,
        "patch_size": TINY_PATCH_SIZE,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    }


@pytest.fixture(scope="session")
def clip_vision_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Folder with a tiny CLIPVisionConfig (32 px, patch 8, no weights) and a CLIP image processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    out = Path(tmp_path_factory.mktemp("clip_vision"))
    CLIPVisionConfig(**_tiny_vision_kwargs()).save_pretrained(out)
    CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    ).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def siglip_vision_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Folder with a tiny SiglipVisionConfig (32 px, patch 8, no weights) and a SigLIP image processor."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig

    out = Path(tmp_path_factory.mktemp("siglip_vision"))
    SiglipVisionConfig(**_tiny_vision_kwargs()).save_pretrained(out)
    SiglipImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def clip_image_processor(clip_vision_dir: str) -> Any:
    """The tiny CLIP image processor loaded with AutoImageProcessor."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(clip_vision_dir)


@pytest.fixture(scope="session")
def siglip_image_processor(siglip_vision_dir: str) -> Any:
    """The tiny SigLIP image processor loaded with AutoImageProcessor."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(siglip_vision_dir)
