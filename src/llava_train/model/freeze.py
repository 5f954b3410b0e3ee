"""Module groups of LlavaForConditionalGeneration, setting what trains (a stage applied to a model), and the
trainable/frozen parameter table."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llava_train.stages import get_stage, stage_groups
from llava_train.utils.distributed import full_numel
from llava_train.utils.logging import get_logger
from llava_train.utils.modules import unwrap

if TYPE_CHECKING:
    from llava_train.config import RunConfig

log = get_logger(__name__)


@dataclass(frozen=True)
class ModuleGroup:
    """A module group of LlavaForConditionalGeneration: the one table that freezing, lr groups and FLOPs read.

    prefix: exact parameter-name prefix in transformers' v5 layout.
    lr_group: optimizer group (its own lr: `optim.projector_lr` / `optim.vision_tower_lr`, else the main lr).
    stream: which tokens pass through it (FLOP accounting): `vision` (patches per image), `projector`
        (image tokens), `text` (every real token) or `none` (a parameter that is added, not multiplied:
        no FLOPs).
    optional: only some archs have it (LLaVA-NeXT / OneVision's `image_newline`); absent elsewhere.
    """

    prefix: str
    lr_group: str
    stream: str
    optional: bool = False


MODULE_GROUPS: dict[str, ModuleGroup] = {
    "vision_tower": ModuleGroup("model.vision_tower.", "vision_tower", "vision"),
    "multi_modal_projector": ModuleGroup("model.multi_modal_projector.", "projector", "projector"),
    # LLaVA-NeXT / OneVision: the learned embedding that ends every grid row; it trains with the projector.
    "image_newline": ModuleGroup("model.image_newline", "projector", "none", optional=True),
    "language_model": ModuleGroup("model.language_model.", "language_model", "text"),
    # lm_head learns at the language model's rate.
    "lm_head": ModuleGroup("lm_head.", "language_model", "text"),
}
LR_GROUPS: tuple[str, ...] = tuple(dict.fromkeys(g.lr_group for g in MODULE_GROUPS.values()))
# Prefixes that wrappers put in front of the model's own names (peft, DDP/DeepSpeed engines).
_WRAPPER_PREFIXES = ("module.", "base_model.model.")
_LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.")
_VISION_STEM = re.compile(r"(?:^|\.)(?:embeddings|pre_layrnorm)\.")


def strip_wrappers(name: str) -> str:
    """A parameter name without peft's `base_model.model.` or an engine's `module.` prefix."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def group_of(param_name: str) -> str:
    """The module group of a parameter name (plain, peft-wrapped or engine-wrapped); unknown names raise KeyError."""
    name = strip_wrappers(param_name)
    for group, spec in MODULE_GROUPS.items():
        if name.startswith(spec.prefix):
            return group
    raise KeyError(
        f"parameter {param_name!r} is in no module group; groups and their prefixes: "
        + ", ".join(f"{g}={s.prefix}" for g, s in MODULE_GROUPS.items())
    )


def check_groups(groups: list[str] | tuple[str, ...] | set[str]) -> None:
    unknown = sorted(set(groups) - set(MODULE_GROUPS))
    if unknown:
        raise KeyError(f"unknown module group(s) {', '.join(unknown)}; valid groups: {', '.join(MODULE_GROUPS)}")


def is_peft_model(model: Any) -> bool:
    """True when LoRA adapters have been added (any parameter named `lora_`)."""
    return any(".lora_" in n for n, _ in model.named_parameters())


def last_used_vision_layer(model: Any) -> int:
    """Index of the deepest vision encoder layer whose output reaches the projector (vision_feature_layer)."""
    config = getattr(model, "config", None)
    vision = config.vision_config
    n_layers = int(vision.num_hidden_layers)
    feature_layer = config.vision_feature_layer
    layers = feature_layer if isinstance(feature_layer, list) else [feature_layer]
    # hidden_states[0] is the embedding output and hidden_states[k] the output of layer k - 1.
    return max((k if k >= 0 else n_layers + 1 + k) - 1 for k in layers)


def vision_param_trainable(within_tower: str, from_layer: int, last_layer: int) -> bool:
    """Whether a vision-tower parameter trains when the tower trains from `from_layer` on.

    Encoder layers from_layer..last_layer train; the patch embedding and pre-layernorm only with
    from_layer == 0. Layers after the feature layer, the post-layernorm and SigLIP's pooling head
    never reach the projector, so they stay frozen (they would get no gradient).
    """
    match = _LAYER.search(within_tower)
    if match:
        return from_layer <= int(match.group(1)) <= last_layer
    return from_layer == 0 and bool(_VISION_STEM.search(within_tower))


def set_trainable(model: Any, groups: list[str] | tuple[str, ...], vision_from_layer: int | None = None) -> None:
    """Train exactly the parameters of `groups`; freeze everything else.

    vision_from_layer: with `vision_tower` in groups, train only from that encoder layer on (see
    `vision_param_trainable`); None trains the whole tower up to the feature layer. With LoRA applied,
    `language_model` means its adapters only (base weights stay frozen) and peft's frozen copies
    (`original_module`) stay frozen.
    """
    check_groups(groups)
    lora = is_peft_model(model)
    last_layer = last_used_vision_layer(unwrap(model)) if "vision_tower" in groups else -1
    from_layer = vision_from_layer or 0
    if "vision_tower" in groups and not 0 <= from_layer <= last_layer:
        raise ValueError(
            f"vision_tower_train_from_layer={from_layer} is outside the layers feeding the projector (0..{last_layer})"
        )
    for name, param in model.named_parameters():
        group = group_of(name)
        plain = strip_wrappers(name)
        train = group in groups and ".original_module." not in plain
        if train and group == "language_model" and lora:
            train = ".lora_" in plain
        if train and group == "vision_tower":
            train = vision_param_trainable(plain[len(MODULE_GROUPS["vision_tower"].prefix) :], from_layer, last_layer)
        param.requires_grad_(train)


def parameter_table(model: Any) -> list[dict[str, Any]]:
    """One row per module group (in MODULE_GROUPS order; optional groups only when the arch has them) plus
    `total`: group, trainable and frozen parameter counts.

    Tied parameters are counted once (under the group that owns them first in `named_parameters`).
    """
    rows = {g: {"group": g, "trainable": 0, "frozen": 0} for g in MODULE_GROUPS}
    seen: set[str] = set()
    for name, param in model.named_parameters():
        group = group_of(name)
        seen.add(group)
        rows[group]["trainable" if param.requires_grad else "frozen"] += full_numel(param)
    table = [r for g, r in rows.items() if g in seen or not MODULE_GROUPS[g].optional]
    table.append(
        {"group": "total", "trainable": sum(r["trainable"] for r in table), "frozen": sum(r["frozen"] for r in table)}
    )
    return table


def trainable_names(model: Any, group: str | None = None) -> list[str]:
    """Names (wrappers stripped) of the parameters that train, optionally of one group only, in model order."""
    if group is not None:
        check_groups([group])
    return [
        strip_wrappers(n)
        for n, p in model.named_parameters()
        if p.requires_grad and (group is None or group_of(n) == group)
    ]


def format_parameter_table(table: list[dict[str, Any]]) -> str:
    """The table as aligned text: `group  trainable  frozen` with thousands separators."""
    lines = [f"{'module group':<24}{'trainable':>16}{'frozen':>16}"]
    for row in table:
        lines.append(f"{row['group']:<24}{row['trainable']:>16,}{row['frozen']:>16,}")
    return "\n".join(lines)


def apply_stage(model: Any, cfg: RunConfig) -> list[dict[str, Any]]:
    """Set requires_grad for `cfg.stage` and log the table (module group, trainable, frozen); returns the table.

    With `lora.enabled` call it AFTER `model.lora.apply_lora` (it checks): the language model then
    trains through its adapters only. The vision tower trains from `model.vision_tower_train_from_layer`
    when `model.train_vision_tower` is set.
    """
    if cfg.lora.enabled and not is_peft_model(model):
        raise ValueError("lora.enabled: call model.lora.apply_lora(model, cfg) before apply_stage")
    groups = stage_groups(cfg)
    set_trainable(model, groups, vision_from_layer=cfg.model.vision_tower_train_from_layer)
    table = parameter_table(model)
    log.info("stage %s: %s\n%s", cfg.stage, get_stage(cfg.stage).description, format_parameter_table(table))
    return table
