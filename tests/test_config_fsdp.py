"""`train.fsdp`: shipped FSDP2 settings files parse, bad files are one-line errors, FSDP2 excludes DeepSpeed."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest

from llava_train.config import from_dict, load_config
from llava_train.config_fsdp import FSDP_KEYS, FsdpSettings, load_fsdp_settings
from llava_train.config_io import ConfigError

REPO = Path(__file__).resolve().parents[1]
FSDP_YAML = sorted(glob.glob(str(REPO / "configs/fsdp/*.yaml")))


def test_fsdp2_yaml_is_shipped() -> None:
    assert str(REPO / "configs/fsdp/fsdp2.yaml") in FSDP_YAML


@pytest.mark.parametrize("path", FSDP_YAML, ids=lambda p: Path(p).name)
def test_every_fsdp_settings_file_parses(path: str) -> None:
    assert Path(path).read_text().startswith("# "), "headed by what it is and the command that launches it"
    settings = load_fsdp_settings(path)
    assert isinstance(settings, FsdpSettings) and settings.source == path


def test_defaults_and_offload_file() -> None:
    assert load_fsdp_settings(REPO / "configs/fsdp/fsdp2.yaml") == FsdpSettings(
        reshard_after_forward=True, cpu_offload=False, activation_checkpointing=False,
        source=str(REPO / "configs/fsdp/fsdp2.yaml"),
    )  # fmt: skip
    assert load_fsdp_settings(REPO / "configs/fsdp/fsdp2_offload.yaml").cpu_offload is True


def test_unknown_key_lists_the_valid_ones(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("reshard_after_forwards: true\n")
    with pytest.raises(ConfigError) as e:
        load_fsdp_settings(bad)
    assert str(e.value) == (
        f"train.fsdp: unknown keys ['reshard_after_forwards'] in {bad}; valid keys: {', '.join(FSDP_KEYS)}"
    )


def test_missing_file_and_non_boolean(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no FSDP settings file at"):
        load_fsdp_settings(tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="cpu_offload must be true or false, got 'yes'"):
        load_fsdp_settings({"cpu_offload": "yes"})


def test_fsdp_and_deepspeed_are_exclusive() -> None:
    train = {"output_dir": "x", "fsdp": "configs/fsdp/fsdp2.yaml", "deepspeed": "configs/deepspeed/zero3.json"}
    with pytest.raises(ConfigError, match="two distributed engines"):
        from_dict({"train": train})


def test_every_recipe_takes_fsdp2_by_one_override() -> None:
    """`train.deepspeed=null train.fsdp=configs/fsdp/fsdp2.yaml` turns any shipped recipe into an FSDP2 run."""
    recipes = [p for p in glob.glob(str(REPO / "configs/**/*.yaml"), recursive=True) if "/llava-" in p or "/qwen" in p]
    assert recipes
    for path in recipes:
        cfg = load_config(path, ["train.deepspeed=null", "train.fsdp=configs/fsdp/fsdp2.yaml"])
        assert cfg.train["fsdp"] == "configs/fsdp/fsdp2.yaml" and not cfg.train.get("deepspeed"), path
