"""LoRA / QLoRA (peft) on the language model's linear layers only, and merging adapters into a HF-native folder.

Adapters are placed by module path (`model.language_model.…`), never by bare names: CLIP's attention
has `q_proj`/`k_proj`/`v_proj` too. The projector is peft's `modules_to_save`, so every adapter
checkpoint (intermediate ones included) holds the trained projector and resuming restores it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from llava_train.config import CONFIG_FILENAME, RunConfig, dump_config, load_config
from llava_train.model.freeze import MODULE_GROUPS, strip_wrappers
from llava_train.model.serving import save_serving_files
from llava_train.utils.logging import get_logger

log = get_logger(__name__)

ADAPTER_DIR = "adapter"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PROJECTOR_MODULE = "multi_modal_projector"


def lora_target_modules(model: Any, suffixes: list[str] | None = None) -> list[str]:
    """Full module names of the language model's linear layers (optionally only those ending in `suffixes`).

    Only modules under `model.language_model.` qualify, so the vision tower, the projector and lm_head
    never get adapters. Unknown suffixes raise ValueError listing the language model's linear names.
    """
    import torch

    prefix = MODULE_GROUPS["language_model"].prefix
    linears = [
        name
        for name, module in model.named_modules()
        if strip_wrappers(name).startswith(prefix) and isinstance(module, torch.nn.Linear)
    ]
    if suffixes is None:
        return linears
    available = sorted({n.rsplit(".", 1)[-1] for n in linears})
    unknown = sorted(set(suffixes) - set(available))
    if unknown:
        raise ValueError(
            f"lora.target_modules {unknown} match no linear layer of the language model; available: {available}"
        )
    return [n for n in linears if n.rsplit(".", 1)[-1] in suffixes]


def apply_lora(model: Any, cfg: RunConfig) -> Any:
    """Wrap `model` with peft LoRA adapters on the language model's linears; returns the PeftModel.

    r/alpha/dropout come from `cfg.lora`; the projector is a `modules_to_save` copy (trainable, saved in
    every adapter checkpoint). For QLoRA (`lora.bits`), the model must have been built quantized
    (`builder.build_model` does); peft's k-bit preparation is applied first. Call `stages.apply_stage`
    afterwards: it decides what trains.
    """
    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules(model, cfg.lora.target_modules)
    if not targets:
        raise ValueError("the language model has no linear layers to put LoRA adapters on")
    if cfg.lora.bits:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(cfg.train.get("gradient_checkpointing", False))
        )
    config = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,
        modules_to_save=[PROJECTOR_MODULE],
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    # With gradient checkpointing and frozen embeddings the checkpointed blocks would see inputs that
    # do not require grad and the adapters would get no gradient.
    if hasattr(peft_model, "enable_input_require_grads"):
        peft_model.enable_input_require_grads()
    return peft_model


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
    from peft import PeftModel

    from llava_train.components import load_components
    from llava_train.model.projector import PROJECTOR_FILE, load_projector

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
