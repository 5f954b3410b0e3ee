"""A 3-step finetune from every kind of model.init_from (original checkpoints, mm_projector.bin, converted), on CPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from llava_train.config import from_dict
from llava_train.train import run
from original_format import hf_name, original_state, write_original_checkpoint, write_original_projector
from tiny_models import losses, tiny_config, write_tiny_data


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from llava_train.model.tiny import ensure_tiny_components

    root = tmp_path_factory.mktemp("init_from")
    ws: dict[str, object] = dict(write_tiny_data(root / "data", n=8, text_only=2))
    ws["lm"], ws["vision"] = str(root / "models" / "lm"), str(root / "models" / "vision")
    ensure_tiny_components(from_dict(tiny_config(ws, "finetune", str(root / "unused"))).model)
    ws["state"] = original_state(ws["lm"], ws["vision"], with_tower=True, seed=5)
    ws["original_bin"] = write_original_checkpoint(root / "orig_bin", ws["lm"], ws["vision"], "bin", state=ws["state"])
    ws["original_st"] = write_original_checkpoint(root / "orig_st", ws["lm"], ws["vision"], "safetensors")
    ws["mm_projector"] = write_original_projector(root / "stage1", ws["lm"], ws["vision"]) / "mm_projector.bin"
    ws["root"] = root
    return ws


def _finetune(ws: dict, init_from: object, name: str, **extra: object) -> tuple[Path, list[float]]:
    out = Path(ws["root"]) / "runs" / name
    config = tiny_config(ws, "finetune", str(out), max_steps=3, save_strategy="no")
    config["model"]["init_from"] = str(init_from)
    config.update(extra)
    result = run(from_dict(config))
    steps = losses(result.log_history)
    assert sorted(steps) == [1, 2, 3] and all(math.isfinite(v) for v in steps.values()), steps
    return out, [steps[s] for s in (1, 2, 3)]


def _load_plain(out: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    AutoProcessor.from_pretrained(str(out))
    return AutoModelForImageTextToText.from_pretrained(str(out))


@pytest.mark.parametrize("kind", ["original_st", "mm_projector"])
def test_finetune_from_original_safetensors_and_mm_projector_bin(workspace: dict, kind: str) -> None:
    out, _ = _finetune(workspace, workspace[kind], kind)
    _load_plain(out)


def test_lora_finetune_from_an_original_checkpoint_merges(workspace: dict) -> None:
    lora = {"lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}, "optim": {"projector_lr": 1e-3}}
    out, _ = _finetune(workspace, workspace["original_st"], "lora", **lora)
    model = _load_plain(out)  # merge-lora rebuilt the base from the original checkpoint
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_finetune_from_an_original_bin_checkpoint_and_from_its_conversion(workspace: dict, tmp_path: Path) -> None:
    """The sharded-.bin original trains and its output keeps the checkpoint's frozen tower; the folder `convert`
    makes of it starts the same run (the same three losses)."""
    from llava_train.cli import main

    out, from_original = _finetune(workspace, workspace["original_bin"], "original_bin")
    tower = _load_plain(out).model.vision_tower.state_dict()
    for key, tensor in workspace["state"].items():  # the tower is frozen in finetune
        name = hf_name(key)
        if name is not None and name.startswith("model.vision_tower."):
            assert torch.equal(tower[name.removeprefix("model.vision_tower.")], tensor.half().float()), key
    converted = tmp_path / "converted"
    assert main(["convert", str(workspace["original_bin"]), "--out", str(converted), "--dtype", "float32"]) == 0
    _, from_converted = _finetune(workspace, converted, "converted")
    assert from_converted == pytest.approx(from_original, rel=1e-6)


def test_a_wrong_pairing_stops_training_with_exit_2_and_one_line(workspace: dict, tmp_path: Path, capsys) -> None:
    import yaml

    from llava_train.train import main

    config = tiny_config(workspace, "finetune", str(tmp_path / "never"), max_steps=3)
    config["model"].update(init_from=str(workspace["original_st"]), vision_feature_layer=-1)
    path = tmp_path / "wrong.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert (
        f"llava-train: error: model.init_from={workspace['original_st']} was trained with mm_vision_select_layer=-2 "
        "but model.vision_feature_layer=-1\n"
    ) in err
    assert "Traceback" not in err and not (tmp_path / "never" / "checkpoint-1").exists()
