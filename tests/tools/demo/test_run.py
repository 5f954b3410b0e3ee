"""Tests of the demo runner: config path rewriting, the table, the loss plot, and a shortened end-to-end demo."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from llava_train.config import load_config
from llava_train.tools.demo import run as demo
from llava_train.tools.demo import shapes
from llava_train.tools.demo.report import build_table, format_table
from llava_train.tools.demo.run import DemoSize, run_demo, stage_config

REPO = Path(__file__).resolve().parents[3]


def test_demo_configs_parse() -> None:
    pre = load_config(REPO / "configs" / "demo" / "pretrain.yaml")
    fin = load_config(REPO / "configs" / "demo" / "finetune.yaml")
    assert (pre.stage, pre.data.template, pre.model.preset, pre.model.init_from) == ("pretrain", "plain", "tiny", None)
    assert (fin.stage, fin.data.template, fin.model.init_from) == ("finetune", "vicuna_v1", "runs/demo/stage1")
    assert pre.train["use_cpu"] is True and fin.train["save_strategy"] == "no"
    assert pre.output_dir == "runs/demo/stage1" and fin.output_dir == "runs/demo/model"


def test_stage_config_moves_paths(tmp_path: Path) -> None:
    cfg = stage_config("finetune", tmp_path, steps=7, overrides=["train.learning_rate=1e-4"])
    assert cfg.model.language_model == str(tmp_path / "models" / "lm")
    assert cfg.model.vision_tower == str(tmp_path / "models" / "vision")
    assert cfg.model.init_from == str(tmp_path / "stage1")
    assert [(s.path, s.image_folder) for s in cfg.data.train] == [
        (str(tmp_path / "data" / "finetune.json"), str(tmp_path / "data" / "images"))
    ]
    assert cfg.output_dir == str(tmp_path / "model")
    assert cfg.train["max_steps"] == 7 and cfg.train["learning_rate"] == 1e-4
    assert stage_config("finetune", tmp_path, init_from=None).model.init_from is None
    pre = stage_config("pretrain", tmp_path)
    assert pre.output_dir == str(tmp_path / "stage1") and pre.train["max_steps"] == 800


def test_table() -> None:
    def report(colour: float) -> dict:
        return {"per_type": {"colour": {"exact_match": colour, "contains_match": 1.0}}}

    table = build_table(
        {"untrained": report(0.0), "after stage 2": report(0.955)},
        {"colour": 1 / 6, "shape": 1 / 3, "position": 1 / 9, "count": 1 / 3},
    )
    assert table["rows"]["colour"] == {
        "chance": 1 / 6,
        "untrained": {"exact": 0.0, "contains": 1.0},
        "after stage 2": {"exact": 0.955, "contains": 1.0},
    }
    assert table["rows"]["shape"]["untrained"] is None
    lines = format_table(table).splitlines()
    assert lines[0] == "| question type | untrained | after stage 2 | chance |"
    assert lines[2] == "| colour | 0% (100%) | 96% (100%) | 17% |"
    assert lines[3] == "| shape | n/a | n/a | 33% |"


def test_plot_losses(tmp_path: Path) -> None:
    history = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"train_runtime": 1.0}]
    out = demo.write_loss_plot({"stage 1": history, "stage 2": history[:1]}, tmp_path / "loss.png")
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (1000, 400)  # one 5 x 4 inch panel per stage


# A process that never imports llava_train: the exported folder must work with plain transformers.
PLAIN_HF = textwrap.dedent(
    """
    import sys
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model_dir, image = sys.argv[1], sys.argv[2]
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the shape?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[Image.open(image).convert("RGB")], text=[prompt], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    answer = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert not any(m.startswith("llava_train") for m in sys.modules)
    print("ANSWER=" + answer.strip())
    """
)


@pytest.mark.slow
def test_short_demo_end_to_end(tmp_path: Path) -> None:
    size = DemoSize(n_pretrain=24, n_finetune=24, n_eval=8, vision_pretrain_steps=3, lm_pretrain_steps=3)
    result = run_demo(
        tmp_path / "demo", pretrain_steps=2, finetune_steps=2, size=size, eval_limit=8, without_stage1=True
    )
    w = result.workdir
    for name in (
        "data/pretrain.json",
        "data/finetune.json",
        "data/eval.json",
        "data/meta.json",
        "eval_table.md",
        "eval_table.json",
        "loss_curve.png",
        "demo_summary.json",
        "eval/before_stage1/eval_report.json",
        "eval/stage1/eval_report.json",
        "eval/stage2/eval_report.json",
        "eval/stage2/eval_predictions.jsonl",
        "model/config.json",
        "model/model.safetensors",
        "model/chat_template.jinja",
        "stage1/config.json",
        "lmms_tasks/llava_train_demo/llava_train_demo.yaml",
        "lmms_tasks/llava_train_demo/llava_train_demo.jsonl",
    ):
        assert (w / name).is_file(), name
    assert result.model_dir == w / "model"
    table = json.loads((w / "eval_table.json").read_text())
    assert table["phases"] == ["before stage 1", "after stage 1", "after stage 2", "stage 2 without stage 1"]
    assert list(table["rows"]) == ["colour", "shape", "position", "count"]
    assert table == result.table
    assert (
        (w / "eval_table.md")
        .read_text()
        .startswith("| question type | before stage 1 | after stage 1 | after stage 2 | stage 2 without stage 1 |")
    )
    summary = json.loads((w / "demo_summary.json").read_text())
    assert set(summary["timings_s"]) >= {
        "generate data",
        "vision tower pretraining",
        "LM pretraining",
        "stage 1",
        "stage 2",
        "stage 2 without stage 1",
        "total",
    }
    assert (w / "model_without_stage1" / "config.json").is_file()
    assert [t["type"] for t in summary["chat"]["turns"]] == ["colour", "shape", "position"]
    colour, shape, position = (t["truth"] for t in summary["chat"]["turns"])
    assert (colour, shape, position) in shapes.HELD_OUT
    with Image.open(w / "loss_curve.png") as img:
        assert img.format == "PNG"
    preds = (w / "eval/stage2/eval_predictions.jsonl").read_text().splitlines()
    assert len(preds) == 8
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_HF, str(w / "model"), summary["chat"]["image"]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ANSWER=" in proc.stdout


@pytest.mark.slow
def test_short_anyres_demo_on_mixed_sizes(tmp_path: Path) -> None:
    """`llava-train demo --arch llava_next`: mixed-size images, anyres token counts, the NeXT class saved."""
    from PIL import Image

    size = DemoSize(n_pretrain=16, n_finetune=16, n_eval=8, vision_pretrain_steps=2, lm_pretrain_steps=2)
    result = run_demo(
        tmp_path / "demo", pretrain_steps=2, finetune_steps=2, size=size, eval_limit=8, arch="llava_next"
    )
    w = result.workdir
    sizes = {Image.open(p).size for p in (w / "data" / "images" / "finetune").glob("*.png")}
    assert len(sizes) >= 3 and sizes <= {(64, 64), (96, 64), (128, 64), (64, 96), (64, 128)}
    config = json.loads((w / "model" / "config.json").read_text())
    assert config["model_type"] == "llava_next"
    assert config["image_grid_pinpoints"] == [[64, 128], [128, 64], [128, 128], [192, 64], [64, 192]]
    report = json.loads((w / "data_report_finetune.json").read_text())
    tokens = report["sources"][0]["image_tokens"]
    assert tokens["p50"] < tokens["max"]  # per-image counts vary with the image's size
    assert list(result.table["rows"]) == ["colour", "shape", "position", "count"]


@pytest.mark.slow
def test_short_onevision_demo_trains_and_scores_two_image_and_video_questions(tmp_path: Path) -> None:
    """`llava-train demo --arch llava_onevision`: anyres_max_9 images, two-image rows and three-frame video rows
    through both stages, every type in the table (the video questions scored through the exported folder)."""
    size = DemoSize(n_pretrain=16, n_finetune=24, n_eval=12, vision_pretrain_steps=2, lm_pretrain_steps=2)
    result = run_demo(tmp_path / "demo", pretrain_steps=2, finetune_steps=2, size=size, arch="llava_onevision")
    w = result.workdir
    config = json.loads((w / "model" / "config.json").read_text())
    assert config["model_type"] == "llava_onevision" and config["vision_aspect_ratio"] == "anyres_max_9"
    rows = json.loads((w / "data" / "finetune.json").read_text())
    assert sum(isinstance(r.get("image"), list) for r in rows) == 8 and sum("video" in r for r in rows) == 4
    assert list(result.table["rows"]) == ["colour", "shape", "position", "count", "two images", "motion"]
    videos = json.loads((w / "eval" / "stage2" / "eval_video_predictions.json").read_text())
    assert len(videos) == 2 and all(v["type"] == "motion" for v in videos)
    assert all(result.table["rows"][t]["after stage 2"] is not None for t in result.table["rows"])


@pytest.mark.parametrize(
    ("arch", "tower", "lm", "finetune"),
    [("llava", 1200, 200, None), ("llava_next", 3600, 200, None), ("llava_onevision", 3600, 400, 1600)],
)
def test_default_sizes_per_arch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, arch: str, tower: int, lm: int, finetune: int | None
) -> None:
    """The step counts measured per arch in docs/demo.md: anyres towers 3600 steps; OneVision's LM pretraining
    400 and stage 2 1600 (its stage-2 split is half as long again); an explicit size or step count wins."""
    seen = []
    monkeypatch.setattr(demo, "_run_demo", lambda w, p, f, size, *rest: seen.append((f, size)))
    demo.run_demo(tmp_path, arch=arch)
    (f, size), *_ = seen
    assert (size.vision_pretrain_steps, size.lm_pretrain_steps, f) == (tower, lm, finetune)
    demo.run_demo(tmp_path, arch=arch, finetune_steps=5, size=DemoSize(lm_pretrain_steps=7))
    assert (seen[1][0], seen[1][1].lm_pretrain_steps, seen[1][1].vision_pretrain_steps) == (5, 7, 1200)
