"""LoRA / QLoRA (peft) on the language model's linear layers only (merging: `training.lora_merge`).

Adapters are placed by module path (`model.language_model.…`), never by bare names: CLIP's attention
has `q_proj`/`k_proj`/`v_proj` too. The projector is peft's `modules_to_save`, so every adapter
checkpoint (intermediate ones included) holds the trained projector and resuming restores it.
"""

from __future__ import annotations

from typing import Any

from llava_train.config import RunConfig
from llava_train.model.freeze import MODULE_GROUPS, strip_wrappers
from llava_train.utils.logging import get_logger

log = get_logger(__name__)

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
    (`builder.build_model` does); peft's k-bit preparation is applied first. Call `model.freeze.apply_stage`
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
