"""Parameter counts of a run's model without weights: the model built on the meta device (exact configs from
`model.known_configs`, no download), LoRA applied, the stage set (`llava-train plan`, the stage tables).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from llava_train.config import RunConfig
from llava_train.model.builder import meta_model
from llava_train.model.freeze import apply_stage, parameter_table
from llava_train.model.lora import apply_lora
from llava_train.model.vision import run_geometry, tower_tokens


@dataclass
class ParamCounts:
    """Parameter counts of the run's model on the meta device.

    groups: rows of `model.freeze.parameter_table` (group, trainable, frozen; `total` last).
    largest_layer: parameters of the largest single module (DeepSpeed's `largest_layer_params`).
    quantizable: language-model linear weights QLoRA would quantise.
    hidden, layers, vocab: language-model hidden size, layer count and vocabulary (activations).
    vision_hidden, vision_layers, vision_tokens: the same for the vision tower (tokens incl. CLS, per crop).
    crops_per_image: the most crops one image becomes (1; anyres: base + the largest grid).
    """

    groups: list[dict[str, Any]]
    largest_layer: int
    quantizable: int
    hidden: int
    layers: int
    vocab: int
    vision_hidden: int
    vision_layers: int
    vision_tokens: int
    crops_per_image: int = 1

    @property
    def trainable(self) -> int:
        """Trainable parameters in total."""
        return int(self.groups[-1]["trainable"])

    @property
    def frozen(self) -> int:
        """Frozen parameters in total."""
        return int(self.groups[-1]["frozen"])


def count_parameters(cfg: RunConfig) -> ParamCounts:
    """Build the run's LlavaForConditionalGeneration on the meta device (LoRA applied, stage set) and count."""

    model = meta_model(cfg)
    config = model.config
    quantizable = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("model.language_model.")
    )
    if cfg.lora.enabled:
        # QLoRA's quantisation is accounted for by bytes per parameter, not built (bitsandbytes is CUDA-only).
        model = apply_lora(model, dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, bits=None)))
    apply_stage(model, cfg)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    vc = config.vision_config
    return ParamCounts(
        groups=parameter_table(model),
        largest_layer=int(largest),
        quantizable=int(quantizable),
        hidden=int(config.text_config.hidden_size),
        layers=int(config.text_config.num_hidden_layers),
        vocab=int(config.text_config.vocab_size),
        vision_hidden=int(vc.hidden_size),
        vision_layers=int(vc.num_hidden_layers),
        vision_tokens=tower_tokens(vc),
        crops_per_image=run_geometry(cfg, vc).max_crops(),
    )


def parameter_table_from_configs(cfg: RunConfig, extra_tokens: int | None = None) -> list[dict[str, Any]]:
    """The stage's parameter table for `cfg` without weights (`model.builder.meta_model`), LoRA added when enabled."""

    model = meta_model(cfg, extra_tokens)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg)
    return apply_stage(model, cfg)
