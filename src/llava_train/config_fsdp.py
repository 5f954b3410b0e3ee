"""The FSDP2 settings file named by `train.fsdp` (`configs/fsdp/*.yaml`): typed, torch-free (read by `plan` too).

Like `config.py`, this module must not import torch or transformers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llava_train.config_io import ConfigError


@dataclass(frozen=True)
class FsdpSettings:
    """One FSDP2 settings file.

    reshard_after_forward: free each unit's gathered weights after its forward and gather them again for its
        backward (ZeRO-3-like memory); false keeps them gathered until the backward (ZeRO-2-like, fewer gathers).
    cpu_offload: sharded parameters, gradients and optimizer state live in CPU RAM; the optimizer steps on CPU.
    activation_checkpointing: HF's per-layer activation checkpointing (`train.gradient_checkpointing`), which keeps
        parameter names (FSDP's own checkpoint wrapper renames them, which checkpoints and lr groups rely on).
    source: the file it was read from.
    """

    reshard_after_forward: bool = True
    cpu_offload: bool = False
    activation_checkpointing: bool = False
    source: str = ""


FSDP_KEYS = tuple(f.name for f in dataclasses.fields(FsdpSettings) if f.name != "source")


def load_fsdp_settings(path: Any) -> FsdpSettings:
    """Read `train.fsdp` (a YAML path, or an inline mapping); unknown keys and non-boolean values are errors."""
    if isinstance(path, dict):
        data, source = dict(path), "inline mapping"
    else:
        file = Path(str(path))
        if not file.is_file():
            raise ConfigError(f"train.fsdp: no FSDP settings file at {file} (see configs/fsdp/fsdp2.yaml)")
        data, source = yaml.safe_load(file.read_text()) or {}, str(file)
        if not isinstance(data, dict):
            raise ConfigError(f"train.fsdp: {file} must hold a mapping of {', '.join(FSDP_KEYS)}")
    unknown = sorted(set(data) - set(FSDP_KEYS))
    if unknown:
        raise ConfigError(f"train.fsdp: unknown keys {unknown} in {source}; valid keys: {', '.join(FSDP_KEYS)}")
    for key, value in data.items():
        if not isinstance(value, bool):
            raise ConfigError(f"train.fsdp: {key} must be true or false, got {value!r} ({source})")
    return FsdpSettings(**data, source=source)
