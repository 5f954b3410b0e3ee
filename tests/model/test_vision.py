"""The one tokens-per-image formula: CLS handling, feature selection, the tower's own token count."""

from __future__ import annotations

import pytest
from transformers import AutoConfig, CLIPConfig, CLIPVisionConfig, LlavaConfig, SiglipVisionConfig

from llava_train.model.vision import (
    feature_select_strategy,
    has_cls,
    image_tokens,
    num_additional_image_tokens,
    patches_per_side,
    tower_tokens,
)


def test_image_token_counts(clip_vision_dir: str, siglip_vision_dir: str) -> None:
    clip, siglip = AutoConfig.from_pretrained(clip_vision_dir), AutoConfig.from_pretrained(siglip_vision_dir)
    assert image_tokens(clip, "patch") == 16
    assert image_tokens(clip, "cls_patch") == 17
    assert (feature_select_strategy(clip, "patch"), feature_select_strategy(clip, "cls_patch")) == ("default", "full")
    assert image_tokens(siglip, "patch") == 16
    assert feature_select_strategy(siglip, "patch") == "full"
    with pytest.raises(ValueError, match="SigLIP has none"):
        image_tokens(siglip, "cls_patch")
    assert image_tokens(CLIPVisionConfig(image_size=336, patch_size=14), "patch") == 576
    assert image_tokens(CLIPConfig(vision_config={"image_size": 336, "patch_size": 14}), "cls_patch") == 577
    assert image_tokens(SiglipVisionConfig(image_size=384, patch_size=14), "patch") == 729


def test_tower_tokens_count_the_cls_token_only_where_there_is_one() -> None:
    """What the tower's FLOPs scale with: 577 tokens through CLIP-L/14-336, 729 through SigLIP-so400m/14-384."""
    clip, siglip = CLIPVisionConfig(image_size=336, patch_size=14), SiglipVisionConfig(image_size=384, patch_size=14)
    assert (tower_tokens(clip), tower_tokens(siglip)) == (577, 729)
    assert (has_cls(clip), has_cls(siglip)) == (True, False)
    assert (num_additional_image_tokens(clip), num_additional_image_tokens(siglip)) == (1, 0)
    assert patches_per_side(LlavaConfig(vision_config=clip.to_dict())) == 24
    with pytest.raises(ValueError, match="unsupported vision tower config model_type 'llama'"):
        has_cls(AutoConfig.for_model("llama"))
