"""Training stages as data: the one owner of every stage fact (what trains, template, checkpoints, LoRA).

Pure data below the config layer (which reads the registry to validate); `model.freeze.apply_stage` applies a
stage to a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llava_train.utils.logging import get_logger

if TYPE_CHECKING:
    from llava_train.config import RunConfig

log = get_logger(__name__)


@dataclass(frozen=True)
class StageSpec:
    """One training stage.

    name: the `stage` config value.
    trainable: module groups that train (see `model.freeze.MODULE_GROUPS`); with LoRA the language
        model trains through its adapters only and lm_head stays frozen.
    default_template: the conversation template LLaVA-1.5 uses in this stage (`data.template` when unset).
    partial_checkpoints: checkpoints hold only the trainable weights (stage 1's projector: tens of MB
        for 7B instead of 14 GB); the frozen rest is rebuilt from the base models on resume. Not when
        the vision tower is unfrozen (then it trains too and is saved in full).
    lora_allowed: `lora.enabled` is valid in this stage.
    description: one line for logs and docs.
    preference: rows are preference pairs and the loss is DPO's (`training.dpo`); starts from `model.init_from`.
    """

    name: str
    trainable: tuple[str, ...]
    default_template: str
    partial_checkpoints: bool
    lora_allowed: bool
    description: str
    preference: bool = False

    def checkpoints_are_partial(self, cfg: RunConfig) -> bool:
        """Whether this run's checkpoints hold only the trainable weights."""
        return self.partial_checkpoints and not cfg.model.train_vision_tower


STAGES: dict[str, StageSpec] = {
    "pretrain": StageSpec(
        name="pretrain",
        trainable=("multi_modal_projector", "image_newline"),
        default_template="plain",
        partial_checkpoints=True,
        lora_allowed=False,
        description="feature alignment: train the projector (+ NeXT/OneVision image newline), tower and LM frozen",
    ),
    "finetune": StageSpec(
        name="finetune",
        trainable=("multi_modal_projector", "image_newline", "language_model", "lm_head"),
        default_template="vicuna_v1",
        partial_checkpoints=False,
        lora_allowed=True,
        description="visual instruction tuning: train projector + language model (+ lm_head), vision tower frozen",
    ),
    "dpo": StageSpec(
        name="dpo",
        trainable=("multi_modal_projector", "image_newline", "language_model", "lm_head"),
        default_template="vicuna_v1",
        partial_checkpoints=False,
        lora_allowed=True,
        description="preference optimisation (DPO) from a finetuned model: trains what finetune trains (or LoRA)",
        preference=True,
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
