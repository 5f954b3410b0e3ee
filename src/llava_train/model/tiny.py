"""Tiny random-init language models and vision towers written as real pretrained-model folders (tests, demo).

Each folder looks exactly like a hub download (config.json, model.safetensors, tokenizer or image
processor files), so the builder takes the same code path for a tiny model as for a 7B one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_train.data.tiny_tokenizer import build_tiny_tokenizer

TOKENIZER_STYLES = ("llama", "chatml")
VISION_KINDS = ("clip", "siglip")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TinyPreset:
    """What `model.preset` writes: the tokenizer style (llama -> LlamaConfig, chatml -> Qwen2Config) and tower kind."""

    tokenizer_style: str
    vision_kind: str


TINY_PRESETS: dict[str, TinyPreset] = {
    "tiny": TinyPreset(tokenizer_style="llama", vision_kind="clip"),
    "tiny_chatml": TinyPreset(tokenizer_style="chatml", vision_kind="siglip"),
}


def get_tiny_preset(name: str) -> TinyPreset:
    """The preset called `name`; an unknown name raises KeyError listing the valid ones."""
    if name not in TINY_PRESETS:
        raise KeyError(f"unknown tiny preset {name!r}; valid presets: {', '.join(TINY_PRESETS)}")
    return TINY_PRESETS[name]


def write_tiny_language_model(
    out_dir: str | os.PathLike,
    tokenizer_style: str = "llama",
    corpus: list[str] | None = None,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
) -> str:
    """Write a random-init causal LM folder (tokenizer + config + model.safetensors); returns its path.

    `llama` style: a trained SentencePiece tokenizer and a LlamaForCausalLM (untied lm_head).
    `chatml` style: a byte-level BPE tokenizer with a chat template and a Qwen2ForCausalLM with tied
    embeddings (as the small Qwen2.5 models). The vocabulary equals the tokenizer's size, so adding
    `<image>` later really exercises the embedding resize. Deterministic for a given seed and corpus.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if tokenizer_style not in TOKENIZER_STYLES:
        raise KeyError(f"unknown tokenizer_style {tokenizer_style!r}; valid styles: {', '.join(TOKENIZER_STYLES)}")
    out = Path(out_dir)
    build_tiny_tokenizer(out, corpus=corpus, style=tokenizer_style)
    tokenizer = AutoTokenizer.from_pretrained(str(out), trust_remote_code=False)
    common: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": 4096,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(seed)
    if tokenizer_style == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    model.save_pretrained(str(out))
    return str(out)


def write_tiny_vision_tower(
    out_dir: str | os.PathLike,
    kind: str = "clip",
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    layers: int = 2,
    seed: int = 0,
) -> str:
    """Write a random-init CLIPVisionModel / SiglipVisionModel folder plus its image processor; returns its path.

    The processor's resize/crop sizes equal `image_size`, so one image becomes
    (image_size // patch_size) ** 2 patches (16 with the defaults).
    """
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    if kind not in VISION_KINDS:
        raise KeyError(f"unknown vision tower kind {kind!r}; valid kinds: {', '.join(VISION_KINDS)}")
    common: dict[str, Any] = {
        "image_size": image_size,
        "patch_size": patch_size,
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if kind == "clip":
        model: Any = CLIPVisionModel(CLIPVisionConfig(**common, projection_dim=hidden_size))
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**common))
    model.save_pretrained(str(out))
    _tiny_image_processor(kind, image_size).save_pretrained(str(out))
    return str(out)


def _tiny_image_processor(kind: str, image_size: int) -> Any:
    # The Pil classes are the ones that work without torchvision; they save as the plain class name,
    # so the folder loads with AutoImageProcessor wherever torchvision is installed too.
    import transformers

    if kind == "clip":
        cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
        return cls(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
        )
    cls = getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor
    return cls(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def _write_atomically(target: Path, write: Any) -> None:
    # Several ranks may start at once: each writes into its own temporary folder and renames it into
    # place; a rank that loses the race drops its copy (the contents are identical, writes are seeded).
    if (target / "config.json").is_file():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_tiny_components(model_cfg: Any) -> None:
    """For `model.preset` set, write the tiny LM and vision tower into their folders when missing.

    `model_cfg` is a `ModelConfig`; `language_model` and `vision_tower` must be local paths. Existing
    folders (with a config.json) are left untouched. Does nothing when no preset is set. The global RNG
    is left as it was: writing the parts seeds torch, and a run that wrote them must initialise its
    projector exactly as a run that found them (same config, same losses).
    """
    if model_cfg.preset is None:
        return
    import torch

    preset = get_tiny_preset(model_cfg.preset)
    lm_dir, vt_dir = Path(model_cfg.language_model), Path(model_cfg.vision_tower)
    with torch.random.fork_rng(devices=[]):
        _write_atomically(lm_dir, lambda d: write_tiny_language_model(d, tokenizer_style=preset.tokenizer_style))
        _write_atomically(vt_dir, lambda d: write_tiny_vision_tower(d, kind=preset.vision_kind))
