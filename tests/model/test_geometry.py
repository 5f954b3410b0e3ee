"""ImageGeometry: the data side's per-image token counts equal transformers' model and processor counts.

For each anyres arch, 300 seeded random image sizes (aspect ratios from 1:12 to 12:1, 8..900 px) go
through (a) our `ImageGeometry.image_tokens` / `crops`, (b) the model's own `pack_image_features`
on feature maps of the crops the image processor made, and (c) the processor's token count
(`_get_num_multimodal_tokens`, what `<image>` expands to at serving time). They must all agree.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    Qwen2Config,
    SiglipVisionConfig,
)

from llava_train.model.vision import default_pinpoints, image_geometry

CROP, PATCH = 32, 8  # P = 4 patches per side, 16 tokens per crop
SIZES = 300


def random_sizes(seed: int) -> list[tuple[int, int]]:
    """(height, width) pairs: log-uniform aspect ratio in [1/12, 12] and log-uniform area."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(SIZES):
        aspect = float(np.exp(rng.uniform(np.log(1 / 12), np.log(12))))  # width / height
        side = float(np.exp(rng.uniform(np.log(8), np.log(300))))
        h = max(1, round(side / np.sqrt(aspect)))
        w = max(1, round(side * np.sqrt(aspect)))
        out.append((min(h, 900), min(w, 900)))
    return out


def _text(cls):
    return cls(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )


def next_setup():
    vision = CLIPVisionConfig(
        image_size=CROP,
        patch_size=PATCH,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    pinpoints = default_pinpoints("llava_next", CROP)
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=_text(LlamaConfig),
        image_token_index=2,
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
    )
    model = LlavaNextForConditionalGeneration(config).model.eval()
    processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP}, image_grid_pinpoints=pinpoints
    )
    return vision, model, processor, "anyres"


def onevision_setup():
    vision = SiglipVisionConfig(
        image_size=CROP,
        patch_size=PATCH,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    pinpoints = default_pinpoints("llava_onevision", CROP)
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=_text(Qwen2Config),
        image_token_index=2,
        video_token_index=3,
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_9",
        vision_feature_select_strategy="full",
    )
    model = LlavaOnevisionForConditionalGeneration(config).model.eval()
    processor = LlavaOnevisionImageProcessorPil(size={"height": CROP, "width": CROP}, image_grid_pinpoints=pinpoints)
    return vision, model, processor, "anyres_max_9"


def model_feature_count(arch: str, model, crops: int, height: int, width: int) -> int:
    """Tokens transformers' own pack_image_features makes of one image's `crops` feature maps."""
    features = [torch.zeros(crops, (CROP // PATCH) ** 2, model.config.text_config.hidden_size)]
    sizes = torch.tensor([[height, width]])
    with torch.no_grad():
        if arch == "llava_next":
            packed, _ = model.pack_image_features(features, sizes, "default", image_newline=model.image_newline)
        else:
            packed, _ = model.pack_image_features(
                features, sizes, image_newline=model.image_newline, vision_aspect_ratio="anyres_max_9"
            )
    return int(packed[0].shape[0])


@pytest.mark.parametrize("arch", ["llava_next", "llava_onevision"])
def test_300_random_sizes_match_model_and_processor(arch: str) -> None:
    vision, model, image_processor, aspect = next_setup() if arch == "llava_next" else onevision_setup()
    geometry = image_geometry(arch, vision, "patch", aspect)
    sizes = random_sizes(seed=13 if arch == "llava_next" else 17)
    mismatches = []
    shapes = set()
    for h, w in sizes:
        img = Image.new("RGB", (w, h), (120, 30, 200))
        pixel_values = image_processor(images=[img], return_tensors="pt")["pixel_values"]  # [1, crops, 3, S, S]
        crops = int(pixel_values.shape[1])
        ours = (geometry.image_tokens(h, w), geometry.crops(h, w))
        theirs = (model_feature_count(arch, model, crops, h, w), crops)
        if ours != theirs:
            mismatches.append(((h, w), ours, theirs))
        shapes.add((round(w / h, 1), ours[0]))
    assert mismatches == []
    # The draw covers many shapes and counts, not one case 300 times.
    assert len({t for _, t in shapes}) >= 12


def test_processor_expands_image_tokens_as_the_geometry_counts() -> None:
    """The serving processors' own counts (what `<image>` becomes) for the same draws."""
    from transformers import LlavaNextProcessor

    from llava_train.model.processor import _onevision_processor_class

    vision, _, next_ip, _ = next_setup()
    tok = _tiny_tokenizer()
    next_proc = LlavaNextProcessor(
        image_processor=next_ip,
        tokenizer=tok,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    next_geo = image_geometry("llava_next", vision, "patch", "anyres")
    sizes = random_sizes(seed=13)
    counts = next_proc._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    assert counts == [next_geo.image_tokens(h, w) for h, w in sizes]

    ov_vision, _, ov_ip, _ = onevision_setup()
    ov_proc = _onevision_processor_class()(
        image_processor=ov_ip,
        tokenizer=tok,
        video_processor=None,
        num_image_tokens=(CROP // PATCH) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    ov_geo = image_geometry("llava_onevision", ov_vision, "patch", "anyres_max_9")
    sizes = random_sizes(seed=17)
    counts = ov_proc._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    assert counts == [ov_geo.image_tokens(h, w) for h, w in sizes]
    # One prompt with two images: each is its base crop + one newline (no anyres grid).
    batch = ov_proc(
        text=["<image> <image> hello"],
        images=[[Image.new("RGB", (50, 30)), Image.new("RGB", (20, 90))]],
        return_tensors="pt",
    )
    assert int((batch["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum()) == 2 * ov_geo.image_tokens(
        30, 50, images_in_sample=2
    )
    assert ov_geo.image_tokens(30, 50, images_in_sample=2) == 16 + 1


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<image>": 2, "<video>": 3, "hello": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    return tok


# Worked examples at the released sizes (CLIP-L/14-336 for NeXT, SigLIP-so400m/14-384 for OneVision),
# (height, width) -> LM tokens; the closing note of the anyres issue walks through the first of each.
NEXT_7B = {(336, 336): 1176, (480, 640): 2340, (640, 480): 2352, (1080, 1920): 1948, (336, 1008): 2328}
ONEVISION = {(336, 336): 1485, (480, 640): 2929, (640, 480): 2943, (1080, 1920): 7269, (336, 1008): 2943}


def test_worked_examples_at_release_sizes() -> None:
    clip = CLIPVisionConfig(image_size=336, patch_size=14)
    siglip = SiglipVisionConfig(image_size=384, patch_size=14)
    next_geo = image_geometry("llava_next", clip, "patch", "anyres")
    ov_geo = image_geometry("llava_onevision", siglip, "patch", "anyres_max_9")
    assert {hw: next_geo.image_tokens(*hw) for hw in NEXT_7B} == NEXT_7B
    assert {hw: ov_geo.image_tokens(*hw) for hw in ONEVISION} == ONEVISION
    # 480x640: best pinpoint 672x672 (2x2 crops), 48x48 patches, unpadded to 36 rows of 48: 576 + 36*48 + 36.
    assert next_geo.grid(480, 640) == (2, 2) and 576 + 36 * 48 + 36 == 2340
    assert (next_geo.crops(480, 640), ov_geo.crops(480, 640)) == (5, 5)
    assert ov_geo.image_tokens(480, 640, images_in_sample=2) == 730
    assert ov_geo.video_tokens(8) == 8 * 14 * 14 + 1  # 27 patches per side pooled to 14
    assert (next_geo.max_crops(), ov_geo.max_crops()) == (5, 37)


def test_geometry_rejects_what_transformers_cannot_pack() -> None:
    clip = CLIPVisionConfig(image_size=336, patch_size=14)
    with pytest.raises(ValueError, match="needs vision_feature_select=patch"):
        image_geometry("llava_next", clip, "cls_patch", "anyres")
    with pytest.raises(ValueError, match=r"\[\[336, 500\]\] are not multiples of the tower's crop 336 px"):
        image_geometry("llava_next", clip, "patch", "anyres", [[336, 672], [336, 500]])
    with pytest.raises(ValueError, match="has no video input"):
        image_geometry("llava_next", clip, "patch", "anyres").video_tokens(4)
