"""Vision-tower geometry: the one home of how many tokens an image becomes (data, plan, bench, FLOPs, processor).

LLaVA-1.5 feeds the hidden state of one tower layer to the projector: CLIP's starts with a CLS token
that `patch` selection (`vision_feature_select_strategy="default"`) drops; SigLIP has none. One
336 px image through CLIP-L/14 is (336 // 14)^2 = 576 feature tokens; the tower itself runs 577.
"""

from __future__ import annotations

from typing import Any

# model_type of vision configs whose encoder output starts with a CLS token, and of those without.
CLS_TOWERS = ("clip_vision_model",)
NO_CLS_TOWERS = ("siglip_vision_model",)
FEATURE_SELECTS = ("patch", "cls_patch")


def vision_config_of(config: Any) -> Any:
    """The vision part of a CLIP/SigLIP/LLaVA config (a full CLIPConfig or LlavaConfig holds it as `vision_config`)."""
    inner = getattr(config, "vision_config", None)
    return inner if inner is not None else config


def has_cls(vision_config: Any) -> bool:
    """Whether the tower's encoder output starts with a CLS token; unknown towers are an error listing the known."""
    model_type = getattr(vision_config_of(vision_config), "model_type", "")
    if model_type in CLS_TOWERS:
        return True
    if model_type in NO_CLS_TOWERS:
        return False
    known = ", ".join(CLS_TOWERS + NO_CLS_TOWERS)
    raise ValueError(f"unsupported vision tower config model_type {model_type!r}; supported: {known}")


def feature_select_strategy(vision_config: Any, feature_select: str) -> str:
    """transformers' `vision_feature_select_strategy` for our `model.vision_feature_select`.

    `default` drops the first (CLS) token, `full` keeps every token. CLIP: `patch` -> `default`,
    `cls_patch` -> `full`. SigLIP has no CLS token, so `patch` -> `full` and `cls_patch` is an error.
    """
    if feature_select not in FEATURE_SELECTS:
        raise ValueError(f"unknown vision_feature_select {feature_select!r}; valid: {', '.join(FEATURE_SELECTS)}")
    if has_cls(vision_config):
        return "default" if feature_select == "patch" else "full"
    if feature_select == "cls_patch":
        raise ValueError("vision_feature_select=cls_patch needs a vision tower with a CLS token; SigLIP has none")
    return "full"


def image_size(vision_config: Any) -> int:
    """Side of the square crop the tower takes, in pixels."""
    size = vision_config_of(vision_config).image_size
    return int(size if isinstance(size, int) else size[0])


def patches_per_side(vision_config: Any) -> int:
    """Patches along one side of a crop: image_size // patch_size (24 for CLIP-L/14-336)."""
    return image_size(vision_config) // int(vision_config_of(vision_config).patch_size)


def tower_tokens(vision_config: Any) -> int:
    """Tokens the tower's encoder runs per crop (what its FLOPs scale with): patches, plus CLIP's CLS."""
    return patches_per_side(vision_config) ** 2 + (1 if has_cls(vision_config) else 0)


def num_additional_image_tokens(vision_config: Any) -> int:
    """Tokens the tower adds besides the patches (LlavaProcessor's `num_additional_image_tokens`): CLS or none."""
    return 1 if has_cls(vision_config) else 0


def image_tokens(vision_config: Any, feature_select: str) -> int:
    """Feature tokens one image becomes in the LM's input (LLaVA-1.5: one crop per image).

    576 for CLIP-L/14 at 336 px with `patch`; 577 with `cls_patch`; 729 for SigLIP-so400m/14 at 384 px.
    """
    strategy = feature_select_strategy(vision_config, feature_select)  # also validates the selection
    keeps_cls = has_cls(vision_config) and strategy == "full"
    return patches_per_side(vision_config) ** 2 + (1 if keeps_cls else 0)
