"""The run's model sources, resolved once: what `model.init_from` is, and the folders and configs the tokenizer,
processor and model are built from. Every builder takes this record instead of re-reading the run config (each
resolution can read config.json, safetensors headers or a hub snapshot).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_train.config import RunConfig
from llava_train.model.init_source import InitSource, init_source, tokenizer_folder
from llava_train.model.vision import vision_config_of
from llava_train.model.weights import resolve_folder


@dataclass(frozen=True)
class ModelSources:
    """Where a run's model side comes from.

    init: the resolved `model.init_from` (None without one).
    tokenizer_folder: the tokenizer's folder (a full / original init_from folder, else `model.tokenizer` or the LM).
    vision_folder: the image processor's folder (a HF-native init_from folder, else the vision tower's).
    vision_config: the tower's vision config (the part of a CLIP/SigLIP or LLaVA config the tower is built from).
    tower_config: the tower folder's whole config (CLIPConfig & co., what its weights load with); None when the
        vision side comes from a HF-native init_from folder.
    """

    init: InitSource | None
    tokenizer_folder: Path
    vision_folder: Path
    vision_config: Any
    tower_config: Any = None


def resolve_sources(cfg: RunConfig, weights: bool = True) -> ModelSources:
    """Resolve `cfg.model`'s sources once; `weights=False` fetches no weights (configs and tokenizer files only)."""
    from transformers import AutoConfig

    init = init_source(cfg.model.init_from, weights=weights)
    folder = tokenizer_folder(init)
    if folder is None:
        folder = resolve_folder(cfg.model.tokenizer or cfg.model.language_model, weights=False)
    if init is not None and init.kind == "full":
        vision = AutoConfig.from_pretrained(str(init.folder), trust_remote_code=False).vision_config
        return ModelSources(init, folder, init.folder, vision)
    tower = resolve_folder(cfg.model.vision_tower, weights=weights)
    tower_config = AutoConfig.from_pretrained(str(tower), trust_remote_code=False)
    return ModelSources(init, folder, tower, vision_config_of(tower_config), tower_config)
