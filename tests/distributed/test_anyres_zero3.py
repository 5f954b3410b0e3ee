"""2-rank ZeRO-3 on CPU for LLaVA-NeXT and OneVision: ranks whose micro-batches differ in crops, images,
videos and text-only samples make the same collectives (the keepalive tops up the tower passes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_deepspeed_cpu import DS_DIR, HERE, launch, logged_losses, reports, write_config

from tiny_models import write_anyres_data

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
STEPS = 14  # one epoch of the 27-28 rows at 1 sample per rank: every special row (text-only, 2 images, video) runs


def config(root: Path, arch: str, out: Path) -> dict[str, Any]:
    return {
        "stage": "finetune",
        "model": {
            "language_model": str(root / "models" / "lm"),
            "vision_tower": str(root / "models" / "vision"),
            "preset": "tiny",
            "dtype": "float32",
            "arch": arch,
        },
        "data": {
            "train": [{"path": str(root / "data" / "finetune.json"), "image_folder": str(root / "data" / "images")}],
            "template": "vicuna_v1",
            "model_max_length": 512,
            "video_frames": 4,
        },
        "train": {
            "output_dir": str(out),
            "deepspeed": str(DS_DIR / "zero3.json"),
            "max_steps": STEPS,
            "per_device_train_batch_size": 1,
            "learning_rate": 1e-3,
            "lr_scheduler_type": "constant",
            "logging_steps": 1,
            "save_strategy": "no",
            "seed": 0,
            "dataloader_num_workers": 0,
            "report_to": [],
            "disable_tqdm": True,
        },
    }


@pytest.mark.parametrize("arch", ["llava_next", "llava_onevision"])
def test_zero3_two_ranks_with_mixed_sizes_text_only_and_video(arch: str, tmp_path: Path) -> None:
    from llava_train.config import from_dict
    from llava_train.model.tiny import ensure_tiny_components

    write_anyres_data(tmp_path / "data", arch)
    out = tmp_path / "out"
    cfg = config(tmp_path, arch, out)
    ensure_tiny_components(from_dict(cfg).model)
    path = write_config(tmp_path, "finetune", cfg)
    wall, log = launch([str(HERE / "train_observer.py"), str(tmp_path / "r"), str(path)], cwd=tmp_path)
    assert "process group destroyed (run finished)" in log
    r0, r1 = reports(tmp_path / "r")
    steps = list(zip(r0["batches"][:STEPS], r1["batches"][:STEPS]))
    # The two ranks' micro-batches differed in crop counts, and some step paired text-only with an image.
    assert any(a["crops"] != b["crops"] and a["crops"] and b["crops"] for a, b in steps), steps
    assert any((a["crops"] == 0) != (b["crops"] == 0) for a, b in steps), steps
    if arch == "llava_onevision":
        # The video row met an image-only micro-batch on the other rank.
        assert any((a["videos"] > 0) != (b["videos"] > 0) for a, b in steps), steps
    losses = logged_losses(out)
    assert len(losses) == STEPS and all(loss == loss for loss in losses)
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["model_type"] == arch
    print(f"{arch}: 2-rank ZeRO-3 finetune {wall:.0f}s")
