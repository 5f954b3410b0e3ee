"""Model folders never run their own code: a folder whose config files map classes to its own Python (`auto_map`)
is refused before transformers sees it, and every `from_pretrained` passes `trust_remote_code=False`.

transformers asks "run custom code? [y/N]" for such a folder (on predict's stdout) and imports its Python on
`y`; with `trust_remote_code=False` it either raises a multi-line error or silently uses the built-in class of
the folder's `model_type`. Refusing here gives one line (exit 2) and the same answer whatever the model type.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llava_train.errors import RemoteCodeError

# The files of an HF folder that may carry an `auto_map` (model, tokenizer, image / video processor, processor).
CODE_MAP_FILES = (
    "config.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
)


def refuse_remote_code(folder: str | os.PathLike) -> None:
    """RemoteCodeError when a config file of `folder` holds an `auto_map`; a hub id (not a local folder) is left
    to `trust_remote_code=False`."""
    path = Path(folder)
    if not path.is_dir():
        return
    for name in CODE_MAP_FILES:
        file = path / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # an unreadable config is reported by the loader that needs it
        if isinstance(data, dict) and "auto_map" in data:
            raise RemoteCodeError(
                f"{file} has an `auto_map` (the folder's own Python code); llava-train never runs a model "
                "folder's code (trust_remote_code is off): use a folder of a built-in transformers model"
            )
