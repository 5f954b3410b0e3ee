"""Config system: every shipped YAML parses, overrides (both forms), clear errors, resolved dump."""

from __future__ import annotations

import glob
import time
from pathlib import Path

import pytest
import yaml

from llava_train import config as config_mod
from llava_train.config import RunConfig, config_reference, dump_config, from_dict, load_config
from llava_train.config_io import ConfigError, apply_overrides, parse_override

REPO = Path(__file__).resolve().parents[1]
ALL_YAML = sorted(glob.glob(str(REPO / "configs/**/*.yaml"), recursive=True))
# Run configs; sweeps (wandb sweep format), accelerate launch configs and FSDP2 settings (tests/test_config_fsdp.py)
# are checked by their own tests.
SHIPPED = [p for p in ALL_YAML if "/sweeps/" not in p and "/accelerate/" not in p and "/fsdp/" not in p]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(Path(p).relative_to(REPO)))
def test_every_shipped_config_parses_and_validates(path: str) -> None:
    text = Path(path).read_text()
    assert text.startswith("# "), "each recipe is headed by the command that launches it"
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    if cfg.train.get("deepspeed"):
        assert (REPO / cfg.train["deepspeed"]).is_file(), cfg.train["deepspeed"]


@pytest.mark.parametrize("path", [p for p in ALL_YAML if "/accelerate/" in p], ids=lambda p: Path(p).name)
def test_accelerate_launch_configs_use_deepspeed(path: str) -> None:
    data = yaml.safe_load(Path(path).read_text())
    assert data["distributed_type"] == "DEEPSPEED"
    ds_file = data["deepspeed_config"]["deepspeed_config_file"]
    assert (REPO / ds_file).is_file(), ds_file


def test_llava_7b_recipes_match_reference() -> None:
    pre = load_config(REPO / "configs/llava-1.5-7b/pretrain.yaml")
    ft = load_config(REPO / "configs/llava-1.5-7b/finetune.yaml")
    lora = load_config(REPO / "configs/llava-1.5-7b/finetune_lora.yaml")
    assert (pre.stage, pre.data.template, pre.train["learning_rate"]) == ("pretrain", "plain", 1e-3)
    assert pre.train["per_device_train_batch_size"] * pre.train["gradient_accumulation_steps"] * 8 == 256
    assert pre.train["deepspeed"].endswith("zero2.json")
    assert (ft.stage, ft.data.template, ft.train["learning_rate"]) == ("finetune", "vicuna_v1", 2e-5)
    assert ft.train["per_device_train_batch_size"] * ft.train["gradient_accumulation_steps"] * 8 == 128
    assert ft.train["deepspeed"].endswith("zero3.json") and ft.data.group_by_modality_length
    assert ft.model.init_from == pre.train["output_dir"]
    assert ft.data.image_aspect_ratio == "pad" and ft.data.model_max_length == 2048
    assert (lora.lora.enabled, lora.lora.r, lora.lora.alpha, lora.lora.dropout) == (True, 128, 256, 0.05)
    assert (lora.train["learning_rate"], lora.optim.projector_lr) == (2e-4, 2e-5)
    for c in (pre, ft, lora):
        assert c.train["warmup_steps"] == 0.03 and c.train["lr_scheduler_type"] == "cosine"
        assert c.train["weight_decay"] == 0.0 and c.train["bf16"] and c.train["gradient_checkpointing"]


def test_dpo_recipe_matches_rlaif_v() -> None:
    """RLAIF-V's script/train/llava15_train.sh + muffin/train/trainers.py (sigmoid DPO, precomputed reference)."""
    dpo = load_config(REPO / "configs/llava-1.5-7b/dpo_rlaif_v.yaml")
    assert (dpo.stage, dpo.dpo.beta, dpo.dpo.loss, dpo.dpo.reference) == ("dpo", 0.1, "sigmoid", "precomputed")
    assert dpo.model.init_from == "liuhaotian/llava-v1.5-7b" and not dpo.lora.enabled
    t = dpo.train
    assert (t["learning_rate"], t["weight_decay"], t["warmup_steps"], t["lr_scheduler_type"]) == (
        5e-7,
        0.01,
        0.05,
        "cosine",
    )
    assert (t["per_device_train_batch_size"], t["gradient_accumulation_steps"], t["max_steps"]) == (1, 1, 2672)
    assert dpo.data.model_max_length == 2048 and dpo.data.image_aspect_ratio == "pad" and t["bf16"]


def test_next_and_onevision_recipes_match_the_published_values() -> None:
    pre = load_config(REPO / "configs/llava-next-7b/pretrain.yaml")
    ft = load_config(REPO / "configs/llava-next-7b/finetune.yaml")
    assert (pre.model.arch, pre.data.image_aspect_ratio, pre.train["learning_rate"]) == ("llava_next", "anyres", 1e-3)
    assert pre.train["per_device_train_batch_size"] * 8 == 256
    assert (ft.model.train_vision_tower, ft.optim.vision_tower_lr, ft.train["learning_rate"]) == (True, 2e-6, 2e-5)
    assert ft.model.init_from == pre.train["output_dir"] and ft.data.model_max_length == 4096
    assert ft.train["per_device_train_batch_size"] * 8 == 128 and ft.train["deepspeed"].endswith("zero3.json")
    for size, lm in (("0.5b", "Qwen/Qwen2-0.5B-Instruct"), ("7b", "Qwen/Qwen2-7B-Instruct")):
        stages = [load_config(REPO / f"configs/llava-onevision-{size}/{n}.yaml") for n in ONEVISION_STAGES]
        s1, mid, si, ov = stages
        for c in stages:
            assert (c.model.arch, c.model.language_model) == ("llava_onevision", lm)
            assert c.model.vision_tower == "google/siglip-so400m-patch14-384"
            assert c.data.image_aspect_ratio == "anyres_max_9" and c.train["deepspeed"].endswith("zero3.json")
            assert c.train["num_train_epochs"] == 1 and c.train["warmup_steps"] == 0.03
        assert (s1.stage, s1.data.template, s1.train["learning_rate"], s1.model.train_vision_tower) == (
            "pretrain",
            "plain",
            1e-3,
            False,
        )
        for c in (mid, si, ov):
            assert (c.stage, c.data.template, c.train["learning_rate"], c.optim.vision_tower_lr) == (
                "finetune",
                "chatml",
                1e-5,
                2e-6,
            )
            assert c.model.train_vision_tower and c.data.model_max_length == 32768 and c.data.video_frames == 32
            assert c.train["per_device_train_batch_size"] * c.train["gradient_accumulation_steps"] * 8 == 256
        # Each stage starts from the one before it.
        assert [c.model.init_from for c in (mid, si, ov)] == [c.train["output_dir"] for c in (s1, mid, si)]


ONEVISION_STAGES = ("pretrain", "stage1_5", "finetune_si", "finetune_ov")


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_task_recipes_match_the_original_custom_data_scripts(size: str) -> None:
    """scripts/v1_5/finetune_task.sh and finetune_task_lora.sh: from the released liuhaotian/llava-v1.5-*."""
    full = load_config(REPO / f"configs/llava-1.5-{size}/finetune_task.yaml")
    lora = load_config(REPO / f"configs/llava-1.5-{size}/finetune_task_lora.yaml")
    for c in (full, lora):
        assert (c.stage, c.model.init_from, c.model.language_model) == (
            "finetune",
            f"liuhaotian/llava-v1.5-{size}",
            f"lmsys/vicuna-{size}-v1.5",
        )
        assert (c.model.vision_tower, c.model.vision_feature_layer, c.model.projector) == (
            "openai/clip-vit-large-patch14-336",
            -2,
            "mlp2x_gelu",
        )
        assert (c.data.template, c.data.image_aspect_ratio, c.data.model_max_length) == ("vicuna_v1", "pad", 2048)
        assert c.data.group_by_modality_length and c.train["deepspeed"].endswith("zero3.json")
        assert c.train["per_device_train_batch_size"] * c.train["gradient_accumulation_steps"] * 8 == 128
        assert (c.train["num_train_epochs"], c.train["warmup_steps"], c.train["lr_scheduler_type"]) == (
            1,
            0.03,
            "cosine",
        )
        assert c.train["weight_decay"] == 0.0 and c.train["bf16"] and c.train["gradient_checkpointing"]
    assert (full.train["learning_rate"], full.lora.enabled) == (2e-5, False)
    assert (lora.lora.enabled, lora.lora.r, lora.lora.alpha, lora.lora.dropout) == (True, 128, 256, 0.05)
    assert (lora.train["learning_rate"], lora.optim.projector_lr) == (2e-4, 2e-5)


def test_overrides_dotted_and_sweep_forms() -> None:
    cfg = load_config(
        None,
        [
            "train.output_dir=runs/x",
            "data.model_max_length=1024",
            "--optim.projector_lr=2e-5",
            "--train.learning_rate=1e-3",
            "data.train=[{path: a.json, image_folder: img}]",
        ],
    )
    assert cfg.data.model_max_length == 1024
    assert cfg.optim.projector_lr == 2e-5 and cfg.train["learning_rate"] == 1e-3
    assert cfg.data.train[0].path == "a.json" and cfg.data.train[0].image_folder == "img"
    assert parse_override("--a.b=true") == (["a", "b"], True)
    assert parse_override("x=null") == (["x"], None)
    assert parse_override("--optim.projector_lr=None") == (["optim", "projector_lr"], None)
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown config key\(s\) data\.max_len; valid keys in data: .*model_max_length"
    ):
        from_dict({"data": {"max_len": 3}})
    with pytest.raises(ConfigError, match="valid keys in the top level: .*stage"):
        from_dict({"stages": "pretrain"})


def test_invalid_values_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="stage='align' is not valid; choose one of: pretrain, finetune"):
        from_dict({"stage": "align"})
    with pytest.raises(ConfigError, match="data.template='vicuna' is not valid"):
        from_dict({"data": {"template": "vicuna"}})
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(None, ["data.model_max_length"])
    with pytest.raises(ConfigError, match="lora.enabled is only valid with stage: finetune"):
        from_dict({"lora": {"enabled": True}})
    with pytest.raises(ConfigError, match="train.output_dir is required"):
        _ = from_dict({}).output_dir


def test_yaml_alias_bomb_is_refused_in_under_a_second(tmp_path: Path) -> None:
    # The "billion laughs": 9 levels of 9 aliases, ~1 KB, 9**9 strings once copied out.
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{k}: &a{k} [{', '.join([f'*a{k - 1}'] * 9)}]" for k in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("train:\n  " + "\n  ".join(lines) + "\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=f"YAML alias \\*a0 at line 3 of {bomb}: aliases are not allowed"):
        load_config(bomb)
    with pytest.raises(ConfigError, match="YAML alias \\*x at line 1 of <override>"):
        parse_override("train.x=[&x [1], *x]")
    assert time.perf_counter() - start < 1.0
    assert load_config(None, ["train.x=[&x 1]"]).train["x"] == [1]  # an anchor alone is harmless


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs/llava-1.5-7b/finetune_lora.yaml", ["data.model_max_length=1024"])
    path = dump_config(cfg, tmp_path / "run" / "llava_train_config.yaml")
    again = from_dict(yaml.safe_load(path.read_text()))
    assert again == cfg and again.data.model_max_length == 1024


def test_reference_documents_every_key() -> None:
    """Every key of every config dataclass is listed by `llava-train config`, with its documentation."""
    import dataclasses
    import types
    import typing

    rows = config_reference()
    keys = [key for key, _, _ in rows]
    assert len(keys) == len(set(keys))
    assert [key for key, _, doc in rows if not doc] == []

    def leaves(cls: type, prefix: str = "") -> list[str]:
        out = []
        for name, tp in typing.get_type_hints(cls).items():
            if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None -> X
                tp = next(a for a in typing.get_args(tp) if a is not type(None))
            if dataclasses.is_dataclass(tp):
                out += leaves(tp, f"{prefix}{name}.")
                continue
            out.append(prefix + name)
            item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
            if dataclasses.is_dataclass(item):
                out += leaves(item, f"{prefix}{name}[].")
        return out

    assert sorted(keys) == sorted(leaves(RunConfig))
    assert "data.train[].image_folder" in keys and "lora.r" in keys


def test_config_choice_lists_are_the_registries() -> None:
    """The choices config validates against are exactly what the code has registered."""
    from llava_train.archs import ARCHS, DEFAULT_ASPECT_RATIO, IMAGE_ASPECT_RATIOS
    from llava_train.data import images
    from llava_train.data.templates import TEMPLATES
    from llava_train.model.builder import ARCH_CLASSES
    from llava_train.model.tiny import TINY_PRESETS
    from llava_train.model.vision import FEATURE_SELECTS
    from llava_train.stages import STAGES
    from llava_train.training.safety import NAN_POLICIES
    from llava_train.utils.attention import SDPA_BACKENDS

    assert tuple(TEMPLATES) == config_mod.TEMPLATES
    assert images.IMAGE_ASPECT_RATIOS is IMAGE_ASPECT_RATIOS  # preprocessing takes what config validates
    assert tuple(ARCH_CLASSES) == ARCHS == tuple(DEFAULT_ASPECT_RATIO)
    assert config_mod.FEATURE_SELECTS == FEATURE_SELECTS
    assert tuple(SDPA_BACKENDS) == config_mod.SDPA_BACKENDS
    assert tuple(TINY_PRESETS) == config_mod.TINY_PRESETS
    assert config_mod.NAN_POLICIES == NAN_POLICIES
    assert tuple(STAGES) == ("pretrain", "finetune", "dpo")
    with pytest.raises(ConfigError, match="stage='x' is not valid; choose one of: pretrain, finetune, dpo"):
        from_dict({"stage": "x"})
