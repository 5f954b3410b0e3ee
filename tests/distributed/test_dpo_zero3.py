"""Stage dpo on 2 CPU ranks under ZeRO-3 (gloo, the real `deepspeed` launcher): full (precomputed reference) and
LoRA (adapter reference). The ranks' pairs differ (one pair per rank per step, image and text-only pairs mixed, so
some steps put a text-only pair on one rank and an image pair on the other): the run finishes on both ranks, the
step-0 loss is ln 2, and the final folder loads in plain transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from test_deepspeed_cpu import COLOURS, DS_DIR, HERE, launch, logged_losses, reports, write_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

NAMES = list(COLOURS)


@pytest.fixture(scope="module")
def dpo_ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Colour images, finetune rows, preference pairs (6 with an image, 4 text-only) and a short finetune."""
    from PIL import Image

    from llava_train.config import from_dict
    from llava_train.train import run

    root = tmp_path_factory.mktemp("dpo_zero3")
    (root / "images").mkdir()
    finetune, pairs = [], []
    for i in range(6):
        colour, other = NAMES[i % 4], NAMES[(i + 1) % 4]
        Image.new("RGB", (40, 32), COLOURS[colour]).save(root / "images" / f"{i}.png")
        question = [{"from": "human", "value": "<image>\nWhat colour is it?"}]
        finetune.append(
            {"id": f"f{i}", "image": f"{i}.png", "conversations": [*question, {"from": "gpt", "value": colour}]}
        )
        pairs.append({"id": f"p{i}", "image": f"{i}.png", "prompt": question, "chosen": colour, "rejected": other})
    for i in range(4):
        pairs.append({"id": f"t{i}", "prompt": f"Say {NAMES[i]}.", "chosen": NAMES[i], "rejected": NAMES[(i + 2) % 4]})
    (root / "finetune.json").write_text(json.dumps(finetune))
    (root / "pairs.json").write_text(json.dumps(pairs))
    start = config(root, root / "finetuned", None)
    start.update(stage="finetune")
    start["data"]["train"][0]["path"] = str(root / "finetune.json")
    start["model"].pop("init_from")
    start["train"].pop("deepspeed")
    start["train"]["max_steps"] = 4
    run(from_dict(start))
    return root


def config(root: Path, out: Path, reference: str | None) -> dict[str, Any]:
    return {
        "stage": "dpo",
        "model": {
            "language_model": str(root / "models" / "lm"),
            "vision_tower": str(root / "models" / "vision"),
            "preset": "tiny",
            "dtype": "float32",
            "init_from": str(root / "finetuned"),
        },
        "data": {
            "train": [{"path": str(root / "pairs.json"), "image_folder": str(root / "images")}],
            "template": "vicuna_v1",
            "model_max_length": 256,
        },
        "dpo": {"beta": 0.1, "reference": reference or "frozen"},
        "train": {
            "output_dir": str(out),
            "deepspeed": str(DS_DIR / "zero3.json"),
            "max_steps": 6,
            "per_device_train_batch_size": 1,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "save_strategy": "no",
            "seed": 0,
            "dataloader_num_workers": 0,
            "report_to": [],
            "disable_tqdm": True,
        },
    }


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_dpo_zero3_two_ranks_with_different_pairs(variant: str, dpo_ws: Path, tmp_path: Path) -> None:
    out = tmp_path / variant
    cfg = config(dpo_ws, out, "precomputed" if variant == "full" else "adapter")
    if variant == "lora":
        cfg["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
    path = write_config(tmp_path, variant, cfg)
    _, output = launch([str(HERE / "train_observer.py"), str(tmp_path / "r"), str(path)], cwd=tmp_path)
    assert "process group destroyed (run finished)" in output
    r0, r1 = reports(tmp_path / "r")
    # Both ranks made the same collator calls (training and, for precomputed, the reference pass), in step.
    assert len(r0["batches"]) == len(r1["batches"])
    steps = list(zip(r0["batches"], r1["batches"]))
    assert any((a["images"] == 0) != (b["images"] == 0) for a, b in steps), steps
    assert all(len(b["ids"]) == 2 and b["ids"][0] == b["ids"][1] for b in r0["batches"])  # one whole pair
    losses = logged_losses(out)
    assert len(losses) == 6 and losses[0] == pytest.approx(math.log(2), abs=1e-4)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert all("rewards/margins" in r and "rewards/accuracies" in r for r in rows if "loss" in r)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if variant == "lora":  # under ZeRO-3 the run ends with its adapter; merge-lora makes the plain folder
        from llava_train.training.lora_merge import merge_lora

        out = Path(merge_lora(out, tmp_path / "merged"))
    model = AutoModelForImageTextToText.from_pretrained(str(out))
    assert not any("lora_" in n for n, _ in model.named_parameters())
    AutoProcessor.from_pretrained(str(out))
    if variant == "full":
        assert (out / "dpo_reference_logps.safetensors").is_file()
    else:
        assert r0["batches"] and all(b["trained"] > 0 for b in r0["batches"])
