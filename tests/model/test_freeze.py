"""Module groups, set_trainable and the parameter table on a tiny LLaVA model."""

from __future__ import annotations

import re

import pytest

from llava_train.components import load_components
from llava_train.model.freeze import (
    format_parameter_table,
    group_of,
    parameter_table,
    set_trainable,
    trainable_names,
    vision_param_trainable,
)

PROJECTOR = [
    "model.multi_modal_projector.linear_1.weight",
    "model.multi_modal_projector.linear_1.bias",
    "model.multi_modal_projector.linear_2.weight",
    "model.multi_modal_projector.linear_2.bias",
]
VISION_LAYER_0 = [
    f"model.vision_tower.encoder.layers.0.{m}.{p}"
    for m in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "layer_norm1")
    + ("mlp.fc1", "mlp.fc2", "layer_norm2")
    for p in ("weight", "bias")
]
VISION_STEM = [
    "model.vision_tower.embeddings.class_embedding",
    "model.vision_tower.embeddings.patch_embedding.weight",
    "model.vision_tower.embeddings.position_embedding.weight",
    "model.vision_tower.pre_layrnorm.weight",
    "model.vision_tower.pre_layrnorm.bias",
]


def _plain(names: list[str]) -> list[str]:
    # transformers versions differ on CLIP's `vision_model.` level; compare without it.
    return [n.replace("vision_tower.vision_model.", "vision_tower.") for n in names]


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("model.vision_tower.encoder.layers.0.self_attn.q_proj.weight", "vision_tower"),
        ("model.multi_modal_projector.linear_1.weight", "multi_modal_projector"),
        ("model.language_model.layers.0.self_attn.q_proj.weight", "language_model"),
        ("lm_head.weight", "lm_head"),
        ("base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight", "language_model"),
        (
            "base_model.model.model.multi_modal_projector.modules_to_save.default.linear_1.weight",
            "multi_modal_projector",
        ),
        ("module.base_model.model.lm_head.weight", "lm_head"),
    ],
)
def test_group_of(name: str, group: str) -> None:
    assert group_of(name) == group


def test_group_of_unknown_lists_groups() -> None:
    expected = (
        "parameter 'vision_model.x' is in no module group; groups and their prefixes: "
        "vision_tower=model.vision_tower., multi_modal_projector=model.multi_modal_projector., "
        "image_newline=model.image_newline, language_model=model.language_model., lm_head=lm_head."
    )
    with pytest.raises(KeyError, match=re.escape(expected)):
        group_of("vision_model.x")


def test_set_trainable_unknown_group(make_cfg) -> None:
    model = load_components(make_cfg()).model
    with pytest.raises(KeyError, match=re.escape("unknown module group(s) projector; valid groups: vision_tower, ")):
        set_trainable(model, ["projector"])


def test_set_trainable_projector_only_and_table(make_cfg) -> None:
    model = load_components(make_cfg()).model
    set_trainable(model, ["multi_modal_projector"])
    assert trainable_names(model) == PROJECTOR
    table = parameter_table(model)
    # Projector Linear(32->64) + Linear(64->64); LM: embeddings + lm_head 513x64, 2 layers (4 attention
    # 64x64, 3 MLP 64x128, 2 norms) and the final norm.
    projector = 32 * 64 + 64 + 64 * 64 + 64
    lm = 513 * 64 * 2 + 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    assert table == [
        {"group": "vision_tower", "trainable": 0, "frozen": vision},
        {"group": "multi_modal_projector", "trainable": projector, "frozen": 0},
        {"group": "language_model", "trainable": 0, "frozen": lm - 513 * 64},
        {"group": "lm_head", "trainable": 0, "frozen": 513 * 64},
        {"group": "total", "trainable": projector, "frozen": vision + lm},
    ]
    text = format_parameter_table(table)
    assert text.splitlines()[0] == f"{'module group':<24}{'trainable':>16}{'frozen':>16}"
    assert text.splitlines()[2] == f"{'multi_modal_projector':<24}{'6,272':>16}{'0':>16}"


def test_vision_tower_from_layer(make_cfg) -> None:
    model = load_components(make_cfg(model={"vision_feature_layer": -1})).model
    set_trainable(model, ["vision_tower"], vision_from_layer=1)
    # Layer 1 is the last one and feeds the projector with vision_feature_layer=-1; post_layernorm never does.
    assert _plain(trainable_names(model)) == [n.replace("layers.0", "layers.1") for n in VISION_LAYER_0]
    set_trainable(model, ["vision_tower"], vision_from_layer=0)
    expected = VISION_STEM + VISION_LAYER_0 + [n.replace("layers.0", "layers.1") for n in VISION_LAYER_0]
    assert _plain(trainable_names(model)) == expected


def test_vision_layers_after_feature_layer_stay_frozen(make_cfg) -> None:
    model = load_components(make_cfg()).model  # vision_feature_layer=-2: layer 1's output is never used
    set_trainable(model, ["vision_tower"], vision_from_layer=0)
    assert _plain(trainable_names(model)) == VISION_STEM + VISION_LAYER_0
    with pytest.raises(ValueError, match=re.escape("vision_tower_train_from_layer=1 is outside the layers feeding")):
        set_trainable(model, ["vision_tower"], vision_from_layer=1)


@pytest.mark.parametrize(
    ("name", "from_layer", "expected"),
    [
        ("encoder.layers.3.mlp.fc1.weight", 2, True),
        ("encoder.layers.1.mlp.fc1.weight", 2, False),
        ("encoder.layers.9.mlp.fc1.weight", 2, False),
        ("vision_model.embeddings.patch_embedding.weight", 0, True),
        ("embeddings.patch_embedding.weight", 2, False),
        ("post_layernorm.weight", 0, False),
        ("head.attention.in_proj_weight", 0, False),
    ],
)
def test_vision_param_trainable(name: str, from_layer: int, expected: bool) -> None:
    assert vision_param_trainable(name, from_layer, last_layer=8) is expected
