"""Merging a LoRA run's adapters into its base model: an HF-native folder (`llava-train merge-lora`, the final save,
the checkpoint export). Lives with the writers of final folders, above `components` (it rebuilds the base model).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from peft import PeftModel

from llava_train.components import load_components
from llava_train.config import dump_config, load_config
from llava_train.model.projector import load_projector
from llava_train.model.serving import save_serving_files
from llava_train.run_files import ADAPTER_DIR, CONFIG_FILENAME, PROJECTOR_FILE
from llava_train.utils.logging import get_logger

log = get_logger(__name__)


def find_adapter(path: str | os.PathLike) -> Path:
    """The adapter folder of a run folder (`<run>/adapter`) or of a checkpoint folder (the folder itself)."""
    path = Path(path)
    for candidate in (path / ADAPTER_DIR, path):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"no LoRA adapter in {path}: expected {path / ADAPTER_DIR}/adapter_config.json or {path}/adapter_config.json"
    )


def find_run_config(path: str | os.PathLike) -> Path:
    """The resolved run config of a run folder or of one of its checkpoints (the folder, then its parent)."""
    path = Path(path)
    for candidate in (path / CONFIG_FILENAME, path.parent / CONFIG_FILENAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no {CONFIG_FILENAME} in {path} or {path.parent}")


def merge_lora(run_dir_or_checkpoint: str | os.PathLike, out_dir: str | os.PathLike, dtype: str | None = None) -> str:
    """Merge a LoRA run's adapters into its base model and write a HF-native LLaVA folder; returns `out_dir`.

    The base model is rebuilt from the run's resolved config (its language model, vision tower and
    `init_from`, unquantized even for QLoRA runs), the adapter (and its projector copy) is loaded from
    safetensors, merged with `merge_and_unload`, and saved with the processor (the run's template as
    chat template), generation config and the resolved config. `dtype` overrides `model.dtype`.
    `out_dir` may be the run folder itself (the adapter stays in `adapter/`).
    """
    src = Path(run_dir_or_checkpoint)
    cfg = load_config(find_run_config(src))
    adapter = find_adapter(src)
    model_cfg = dataclasses.replace(cfg.model, dtype=dtype or cfg.model.dtype)
    base_cfg = dataclasses.replace(cfg, model=model_cfg, lora=dataclasses.replace(cfg.lora, bits=None))
    parts = load_components(base_cfg)
    peft_model = PeftModel.from_pretrained(parts.model, str(adapter))
    merged = peft_model.merge_and_unload()
    projector = src / PROJECTOR_FILE
    if projector.is_file():
        # The adapter's projector copy and the checkpoint's projector.safetensors are the same weights;
        # loading the file also covers adapters saved without the projector.
        load_projector(merged, projector)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    save_serving_files(out, parts.processor, merged.generation_config)
    dump_config(cfg, out / CONFIG_FILENAME)
    log.info("merged LoRA adapter %s into %s", adapter, out)
    return str(out)
