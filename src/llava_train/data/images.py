"""Images: vision-token counts per image, RGB loading, LLaVA's pad-to-square, and the image processor call."""

from __future__ import annotations

from typing import Any

# Vision towers whose encoder output starts with a CLS token (dropped by `patch`).
_CLS_TOWERS = ("clip_vision_model",)
_NO_CLS_TOWERS = ("siglip_vision_model",)


def _vision_config(config: Any) -> Any:
    """The vision part of a CLIP/SigLIP config (a full CLIPConfig/SiglipConfig holds it as `vision_config`)."""
    inner = getattr(config, "vision_config", None)
    return inner if inner is not None else config


def _tower_kind(vision_config: Any) -> str:
    vc = _vision_config(vision_config)
    model_type = getattr(vc, "model_type", "")
    if model_type in _CLS_TOWERS:
        return "cls"
    if model_type in _NO_CLS_TOWERS:
        return "no_cls"
    raise ValueError(
        f"unsupported vision tower config model_type {model_type!r}; "
        f"supported: {', '.join(_CLS_TOWERS + _NO_CLS_TOWERS)}"
    )


def feature_select_strategy(vision_config: Any, feature_select: str) -> str:
    """transformers' `vision_feature_select_strategy` for our `vision_feature_select`.

    `default` drops the first (CLS) token, `full` keeps every token. CLIP: `patch` -> `default`,
    `cls_patch` -> `full`. SigLIP has no CLS token, so `patch` -> `full` and `cls_patch` is an error.
    """
    if feature_select not in ("patch", "cls_patch"):
        raise ValueError(f"unknown vision_feature_select {feature_select!r}; valid: patch, cls_patch")
    kind = _tower_kind(vision_config)
    if kind == "cls":
        return "default" if feature_select == "patch" else "full"
    if feature_select == "cls_patch":
        raise ValueError("vision_feature_select=cls_patch needs a vision tower with a CLS token; SigLIP has none")
    return "full"


def num_image_tokens(vision_config: Any, feature_select: str) -> int:
    """Exact number of feature tokens one image becomes: (image_size // patch_size)**2, +1 for CLIP `cls_patch`.

    576 for CLIP-L/14 at 336 px with `patch`; 577 with `cls_patch`.
    """
    vc = _vision_config(vision_config)
    strategy = feature_select_strategy(vc, feature_select)
    patches = (int(vc.image_size) // int(vc.patch_size)) ** 2
    has_cls = _tower_kind(vc) == "cls"
    return patches + (1 if has_cls and strategy == "full" else 0)
