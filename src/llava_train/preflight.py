"""User-mistake checks that run before anything heavy loads: each is a one-line ConfigError naming the config key
(a data path or image folder that does not exist, a local model folder that does not exist)."""

from __future__ import annotations

import os
from pathlib import Path

from llava_train.config import RunConfig
from llava_train.config_io import ConfigError
from llava_train.data.rows import shard_paths

MODEL_KEYS = ("language_model", "tokenizer", "vision_tower", "init_from")


def looks_local(value: str) -> bool:
    """Whether a model reference is meant as a local path rather than a hub id (`org/name`): it is absolute,
    starts with `.` or `~`, or has more than one `/`."""
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or os.sep != "/" and os.sep in value


def check_paths(cfg: RunConfig) -> None:
    """Raise ConfigError for the first missing data source, image folder or local model folder of `cfg`.

    Model folders written by `model.preset` are exempt (the preset creates them); `init_from` is always local.
    """

    for split, sources in (("train", cfg.data.train), ("eval", cfg.data.eval)):
        for i, src in enumerate(sources):
            try:
                shard_paths(src.path)
            except FileNotFoundError as e:
                raise ConfigError(f"data.{split}[{i}].path: {e}") from None
            if src.image_folder is not None and not Path(src.image_folder).is_dir():
                raise ConfigError(f"data.{split}[{i}].image_folder: folder not found: {src.image_folder}")
    for key in MODEL_KEYS:
        value = getattr(cfg.model, key)
        if value is None or (cfg.model.preset is not None and key in ("language_model", "vision_tower")):
            continue
        local = key == "init_from" or looks_local(value)
        if Path(value).expanduser().exists():
            continue
        if local:
            what = "folder" if key != "init_from" else "run folder"
            raise ConfigError(f"model.{key}: local {what} not found: {value} (and not a hub id like org/name)")
        _check_hub_id(f"model.{key}", value)


def _check_hub_id(key: str, value: str) -> None:
    """huggingface_hub's own repo-id rules, as a one-line error naming the key (instead of its HFValidationError
    deep inside a download)."""
    try:
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id
    except ImportError:
        return
    try:
        validate_repo_id(value)
    except HFValidationError as e:
        raise ConfigError(f"{key}: {value!r} is neither a local folder nor a valid hub id: {e}") from None
