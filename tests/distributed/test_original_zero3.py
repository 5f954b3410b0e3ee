"""2-rank ZeRO-3 on CPU from an original-format LLaVA checkpoint: every rank loads the same tensors in the same
order (gathered one at a time) and the run finishes with the checkpoint's frozen tower intact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_deepspeed_cpu import HERE, assert_partitioned, launch, logged_losses, reports, tiny_config, write_config

from original_format import hf_name, original_state, write_original_checkpoint
from tiny_models import write_tiny_data

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
STEPS = 3


def test_zero3_two_ranks_from_an_original_checkpoint(tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    from llava_train.config import from_dict
    from llava_train.model.tiny import ensure_tiny_components

    write_tiny_data(tmp_path, n=8, text_only=4)
    out = tmp_path / "out"
    config = tiny_config(tmp_path, "finetune", "zero3", out, init_from=tmp_path / "original")
    config["train"]["max_steps"] = STEPS
    ensure_tiny_components(from_dict(config).model)
    lm, vision = config["model"]["language_model"], config["model"]["vision_tower"]
    state = original_state(lm, vision, with_tower=True, seed=4)
    write_original_checkpoint(tmp_path / "original", lm, vision, "bin", state=state)
    wall, log = launch(
        [str(HERE / "train_observer.py"), str(tmp_path / "r"), str(write_config(tmp_path, "ft", config))], cwd=tmp_path
    )
    assert "process group destroyed (run finished)" in log
    assert "original checkpoint loaded: " in log
    r0, r1 = reports(tmp_path / "r")
    assert_partitioned(r0, r1, "zero3")
    assert len(logged_losses(out)) == STEPS
    tower = AutoModelForImageTextToText.from_pretrained(str(out)).model.vision_tower.state_dict()
    for key, tensor in state.items():
        name = hf_name(key)
        if name is not None and name.startswith("model.vision_tower."):
            assert torch.equal(tower[name.removeprefix("model.vision_tower.")], tensor.half().float()), key
    print(f"original checkpoint, 2-rank ZeRO-3 finetune: {wall:.0f}s")
