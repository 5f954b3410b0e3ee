"""FlopModel against hand-counted parameters of a tiny LLaVA, and the peak FLOP/s table."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

from llava_train.training.flops import FlopModel, peak_flops_for_device

# Hand count of the tiny config below (embedding tables and CLIP's class/position embeddings are lookups).
# Llama layer, d=32, ff=64, 4 heads x 8, 2 kv heads: q 32*32 + k 16*32 + v 16*32 + o 32*32 = 3072;
# mlp 3*64*32 = 6144; two RMSNorms 64 -> 9280 per layer.
LM_LAYER = 3072 + 6144 + 64
LM_NORM = 32
LM_HEAD = 100 * 32
LM_TOTAL = 2 * LM_LAYER + LM_NORM + LM_HEAD  # 21792
# CLIP layer, d=16, ff=32: q/k/v/out with bias 4*(16*16+16) = 1088; two LayerNorms 64; fc1 32*16+32 = 544;
# fc2 16*32+16 = 528 -> 2224 per layer. Patch conv 16*3*14*14 = 9408, pre/post LayerNorm 32 each.
V_LAYER = 1088 + 64 + 544 + 528
V_PRE = 9408 + 32
V_POST = 32
V_TOTAL = V_PRE + 2 * V_LAYER + V_POST  # 13920
# Projector 16 -> 32 -> 32 with biases.
PROJ = (16 * 32 + 32) + (32 * 32 + 32)  # 1600
T_V = 4 + 1  # (28 / 14)^2 patches + CLS
D_LM, D_V = 32, 16

STATS = {"real_tokens": 17, "image_tokens": 8, "images": 2, "sum_sq_lengths": 10**2 + 7**2}


def tiny_config() -> LlavaConfig:
    text = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14
    )
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=99)


def test_hand_count_stage1_frozen_lm_gets_4n_and_frozen_vision_2n() -> None:
    fm = FlopModel.from_config(tiny_config(), {"multi_modal_projector"})
    expected = (
        2 * V_TOTAL * 2 * T_V  # frozen vision tower, forward only, 2 images x 5 tokens
        + 4 * D_V * 2 * 2 * T_V**2  # vision attention: 4 d L^2 per layer, 2 layers, forward only
        + 6 * PROJ * 8  # trained projector on 8 image tokens
        + 4 * LM_TOTAL * 17  # frozen LM with gradient flowing through: forward + input grad
        + 3 * 4 * D_LM * 2 * (10**2 + 7**2)  # LM attention forward + backward, per-sample L^2
    )
    assert fm.flops_per_step(STATS) == expected
    assert fm.vision_tokens_per_image == T_V


def test_hand_count_finetune_trains_lm_with_6n() -> None:
    fm = FlopModel.from_config(tiny_config(), {"multi_modal_projector", "language_model", "lm_head"})
    expected = 2 * V_TOTAL * 10 + 4 * D_V * 2 * 2 * 25 + 6 * PROJ * 8 + 6 * LM_TOTAL * 17 + 3 * 4 * D_LM * 2 * 149
    assert fm.flops_per_step(STATS) == expected


def test_recompute_flops_are_one_more_forward_of_the_lm_layers_the_gradient_crosses() -> None:
    # Gradient checkpointing reruns each decoder layer's forward: 2N per token + attention forward 4 d L^2,
    # for the two LM layers only (not the norm, lm_head, projector or the frozen tower).
    per_step = 2 * 2 * LM_LAYER * 17 + 2 * 4 * D_LM * (10**2 + 7**2)
    for trainable in ({"multi_modal_projector"}, {"multi_modal_projector", "language_model", "lm_head"}):
        assert FlopModel.from_config(tiny_config(), trainable).recompute_flops_per_step(STATS) == per_step
    # Nothing trains before or in the LM (only lm_head): no gradient crosses its layers, nothing recomputed.
    assert FlopModel.from_config(tiny_config(), {"lm_head"}).recompute_flops_per_step(STATS) == 0


def test_hand_count_partially_trained_vision_tower() -> None:
    config = tiny_config()
    config.vision_feature_layer = -1  # both encoder layers feed the projector, so layer 1 can train
    fm = FlopModel.from_config(
        config, {"vision_tower", "multi_modal_projector", "language_model", "lm_head"}, vision_train_from_layer=1
    )
    # Embeddings + layer 0 frozen with nothing trainable before them: 2N, attention forward only.
    # Layer 1 trains: 6N, attention x3; post LayerNorm is frozen but the gradient passes: 4N.
    vision = (2 * (V_PRE + V_LAYER) + 6 * V_LAYER + 4 * V_POST) * 10 + (4 * D_V + 3 * 4 * D_V) * 2 * 25
    expected = vision + 6 * PROJ * 8 + 6 * LM_TOTAL * 17 + 3 * 4 * D_LM * 2 * 149
    assert fm.flops_per_step(STATS) == expected


def test_from_model_matches_from_config_and_reads_requires_grad() -> None:
    model = LlavaForConditionalGeneration(tiny_config())
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    assert FlopModel.from_model(model) == FlopModel.from_config(tiny_config(), {"multi_modal_projector"})
    names = [b.name for b in FlopModel.from_model(model).blocks]
    assert names == [
        "vision_tower.pre",
        "vision_tower.encoder.layers.0",
        "vision_tower.encoder.layers.1",
        "vision_tower.post",
        "multi_modal_projector",
        "language_model.pre",
        "language_model.layers.0",
        "language_model.layers.1",
        "language_model.post",
        "lm_head",
    ]


def test_tied_lm_head_is_counted_once_as_a_matmul() -> None:
    cfg = tiny_config()
    text = Qwen2Config(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    )
    cfg = LlavaConfig(
        vision_config=cfg.vision_config, text_config=text, image_token_index=99, tie_word_embeddings=True
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    fm = FlopModel.from_model(model)
    head = [b for b in fm.blocks if b.name == "lm_head"][0]
    assert head.trained_params == 100 * 32 and head.frozen_params == 0
    assert [b for b in fm.blocks if b.name == "language_model.pre"][0].trained_params == 0


def test_unknown_group_lists_valid_ones() -> None:
    with pytest.raises(KeyError, match=r"unknown module group\(s\) llm; valid groups: vision_tower, "):
        FlopModel.from_config(tiny_config(), {"llm"})


@pytest.mark.parametrize(
    ("name", "dtype", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4e12),
        ("NVIDIA H100 PCIe", "bfloat16", 756e12),
        ("NVIDIA H100 NVL", torch.float16, 835e12),
        ("NVIDIA H200", torch.bfloat16, 989.4e12),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
        ("NVIDIA A100 80GB PCIe", torch.float16, 312e12),
        ("NVIDIA A10G", torch.bfloat16, 70e12),
        ("NVIDIA L4", torch.bfloat16, 121e12),
        ("NVIDIA L40S", torch.bfloat16, 362.05e12),
        ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165.2e12),
        ("Tesla V100-SXM2-32GB", torch.float16, 125e12),
        ("Tesla V100-PCIE-16GB", torch.float16, 112e12),
        ("Tesla V100-SXM2-32GB", torch.bfloat16, None),
        ("NVIDIA H100 80GB HBM3", torch.float32, None),
        ("cpu", torch.bfloat16, None),
    ],
)
def test_peak_flops_table(name: str, dtype: torch.dtype | str, peak: float | None) -> None:
    assert peak_flops_for_device(name, dtype) == peak
