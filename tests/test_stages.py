"""Stages as data: exact trainable parameter names per stage, LoRA ordering, the meta-device parameter table."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llava_train.components import load_components
from llava_train.config import RunConfig, from_dict, load_config
from llava_train.model.freeze import apply_stage, trainable_names
from llava_train.stages import STAGES, get_stage, stage_groups
from llava_train.tools.param_counts import parameter_table_from_configs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROJECTOR = [f"model.multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")]
LM_LAYER = (
    [f"self_attn.{m}_proj.weight" for m in ("q", "k", "v", "o")]
    + [f"mlp.{m}_proj.weight" for m in ("gate", "up", "down")]
    + ["input_layernorm.weight", "post_attention_layernorm.weight"]
)
LANGUAGE_MODEL = (
    ["model.language_model.embed_tokens.weight"]
    + [f"model.language_model.layers.{i}.{n}" for i in (0, 1) for n in LM_LAYER]
    + ["model.language_model.norm.weight"]
)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where `model.preset: tiny` writes its LM and vision tower (once for this module)."""
    return tmp_path_factory.mktemp("stages_tiny")


@pytest.fixture()
def make_cfg(tiny_root: Path) -> Callable[..., RunConfig]:
    """make_cfg(stage=..., model={...}, lora={...}, data={...}) -> a RunConfig on the tiny preset."""

    def make(
        stage: str = "finetune",
        model: dict[str, Any] | None = None,
        lora: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
    ) -> RunConfig:
        model_cfg = {
            "preset": "tiny",
            "language_model": str(tiny_root / "lm"),
            "vision_tower": str(tiny_root / "vt"),
            "dtype": "float32",
            **(model or {}),
        }
        return from_dict(
            {
                "stage": stage,
                "model": model_cfg,
                "lora": lora or {},
                "data": data or {},
                "train": {"output_dir": str(tiny_root / "run")},
            }
        )

    return make


def test_stage_registry() -> None:
    assert list(STAGES) == ["pretrain", "finetune", "dpo"]
    assert get_stage("pretrain").trainable == ("multi_modal_projector", "image_newline")
    assert get_stage("pretrain").default_template == "plain"
    assert get_stage("finetune").trainable == ("multi_modal_projector", "image_newline", "language_model", "lm_head")
    assert get_stage("dpo").trainable == get_stage("finetune").trainable and get_stage("dpo").preference
    assert get_stage("dpo").lora_allowed and not get_stage("finetune").preference
    with pytest.raises(KeyError, match=re.escape("unknown stage 'align'; valid stages: pretrain, finetune, dpo")):
        get_stage("align")


def test_pretrain_trains_projector_only(make_cfg) -> None:
    cfg = make_cfg(stage="pretrain", data={"template": "plain"})
    model = load_components(cfg).model
    table = apply_stage(model, cfg)
    assert trainable_names(model) == PROJECTOR
    assert table[-1]["trainable"] == 6272


def test_finetune_trains_projector_language_model_and_lm_head(make_cfg) -> None:
    cfg = make_cfg(stage="finetune")
    model = load_components(cfg).model
    apply_stage(model, cfg)
    assert trainable_names(model, "multi_modal_projector") == PROJECTOR
    assert trainable_names(model, "language_model") == LANGUAGE_MODEL
    assert trainable_names(model, "lm_head") == ["lm_head.weight"]
    assert trainable_names(model, "vision_tower") == []
    assert trainable_names(model) == PROJECTOR + LANGUAGE_MODEL + ["lm_head.weight"]


def test_finetune_with_vision_tower_from_layer(make_cfg) -> None:
    cfg = make_cfg(model={"train_vision_tower": True, "vision_tower_train_from_layer": 1, "vision_feature_layer": -1})
    assert stage_groups(cfg) == ("multi_modal_projector", "image_newline", "language_model", "lm_head", "vision_tower")
    model = load_components(cfg).model
    apply_stage(model, cfg)
    names = [n.replace("vision_tower.vision_model.", "vision_tower.") for n in trainable_names(model, "vision_tower")]
    assert len(names) == 16
    assert all(n.startswith("model.vision_tower.encoder.layers.1.") for n in names)


def test_lora_needs_adapters_first(make_cfg) -> None:
    cfg = make_cfg(lora={"enabled": True, "r": 4, "alpha": 8})
    assert stage_groups(cfg) == ("multi_modal_projector", "image_newline", "language_model")
    model = load_components(cfg).model
    with pytest.raises(ValueError, match=re.escape("call model.lora.apply_lora(model, cfg) before apply_stage")):
        apply_stage(model, cfg)


def test_meta_table_matches_the_built_model(make_cfg) -> None:
    cfg = make_cfg(stage="finetune")
    model = load_components(cfg).model
    assert parameter_table_from_configs(cfg) == apply_stage(model, cfg)


def test_meta_table_for_the_7b_recipe() -> None:
    # Vicuna-7B (+1 row for <image>: vocab 32001) + CLIP-L/14-336 + mlp2x_gelu 1024 -> 4096.
    pretrain = parameter_table_from_configs(load_config(CONFIGS / "llava-1.5-7b" / "pretrain.yaml"))
    assert pretrain == [
        {"group": "vision_tower", "trainable": 0, "frozen": 303_507_456},
        {"group": "multi_modal_projector", "trainable": 20_979_712, "frozen": 0},
        {"group": "language_model", "trainable": 0, "frozen": 6_607_347_712},
        {"group": "lm_head", "trainable": 0, "frozen": 131_076_096},
        {"group": "total", "trainable": 20_979_712, "frozen": 7_041_931_264},
    ]
    lora = parameter_table_from_configs(load_config(CONFIGS / "llava-1.5-7b" / "finetune_lora.yaml"))
    # r=128 on q,k,v,o (4096x4096), gate/up (4096->11008) and down in 32 layers: 319,815,680 adapter weights.
    # peft keeps the pretrained projector as a frozen copy next to the trained one.
    assert lora == [
        {"group": "vision_tower", "trainable": 0, "frozen": 303_507_456},
        {"group": "multi_modal_projector", "trainable": 20_979_712, "frozen": 20_979_712},
        {"group": "language_model", "trainable": 319_815_680, "frozen": 6_607_347_712},
        {"group": "lm_head", "trainable": 0, "frozen": 131_076_096},
        {"group": "total", "trainable": 340_795_392, "frozen": 7_062_910_976},
    ]
