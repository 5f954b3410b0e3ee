"""Training stages as data: which module groups train, the default template, what the stage's output feeds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llava_train.config import RunConfig
from llava_train.utils.logging import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class StageSpec:
    """One training stage.

    name: the `stage` config value.
    trainable: module groups that train (see `model.freeze.MODULE_GROUPS`); with LoRA the language
        model trains through its adapters only and lm_head stays frozen.
    default_template: the conversation template LLaVA-1.5 uses in this stage.
    saves_projector: the stage's product is its projector (`projector.safetensors`), which the next
        stage starts from with `model.init_from`.
    description: one line for logs and docs.
    """

    name: str
    trainable: tuple[str, ...]
    default_template: str
    saves_projector: bool
    description: str


STAGES: dict[str, StageSpec] = {
    "pretrain": StageSpec(
        name="pretrain",
        trainable=("multi_modal_projector",),
        default_template="plain",
        saves_projector=True,
        description="feature alignment: train the projector only (vision tower and language model frozen)",
    ),
    "finetune": StageSpec(
        name="finetune",
        trainable=("multi_modal_projector", "language_model", "lm_head"),
        default_template="vicuna_v1",
        saves_projector=False,
        description="visual instruction tuning: train projector + language model (+ lm_head), vision tower frozen",
    ),
}


def get_stage(name: str) -> StageSpec:
    """The stage called `name`; an unknown name raises KeyError listing the valid ones."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; valid stages: {', '.join(STAGES)}")
    return STAGES[name]


def stage_groups(cfg: RunConfig) -> tuple[str, ...]:
    """The module groups that train for `cfg`: the stage's, + vision_tower if unfrozen, - lm_head under LoRA."""
    groups = list(get_stage(cfg.stage).trainable)
    if cfg.model.train_vision_tower:
        groups.append("vision_tower")
    if cfg.lora.enabled:
        # As LLaVA's LoRA recipe: adapters on the language model, lm_head stays as pretrained.
        groups = [g for g in groups if g != "lm_head"]
    return tuple(groups)


def apply_stage(model: Any, cfg: RunConfig) -> list[dict[str, Any]]:
    """Set requires_grad for `cfg.stage` and log the table (module group, trainable, frozen); returns the table.

    With `lora.enabled` call it AFTER `model.lora.apply_lora` (it checks): the language model then
    trains through its adapters only. The vision tower trains from `model.vision_tower_train_from_layer`
    when `model.train_vision_tower` is set.
    """
    from llava_train.model.freeze import format_parameter_table, is_peft_model, parameter_table, set_trainable

    if cfg.lora.enabled and not is_peft_model(model):
        raise ValueError("lora.enabled: call model.lora.apply_lora(model, cfg) before apply_stage")
    groups = stage_groups(cfg)
    set_trainable(model, groups, vision_from_layer=cfg.model.vision_tower_train_from_layer)
    table = parameter_table(model)
    log.info("stage %s: %s\n%s", cfg.stage, get_stage(cfg.stage).description, format_parameter_table(table))
    return table


def parameter_table_from_configs(cfg: RunConfig, extra_tokens: int | None = None) -> list[dict[str, Any]]:
    """The stage's parameter table for `cfg` without weights (`model.builder.meta_model`), LoRA added when enabled."""
    from llava_train.model.builder import meta_model

    model = meta_model(cfg, extra_tokens)
    if cfg.lora.enabled:
        from llava_train.model.lora import apply_lora

        model = apply_lora(model, cfg)
    return apply_stage(model, cfg)
