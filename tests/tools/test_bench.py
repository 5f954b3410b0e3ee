"""`llava-train bench`: synthetic mix shape, mode/preset registries, and real LLaVATrainer steps per mode on CPU."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from llava_train.config_io import ConfigError
from llava_train.tools.bench import (
    MODES,
    PRESETS,
    SyntheticMix,
    get_preset,
    parse_modes,
    run_mode,
    summary,
    synthetic_layout,
)


def _small(**changes: object) -> object:
    """cpu-tiny shrunk so one step takes well under a second: small vocab and LM, 64 image tokens."""
    base = get_preset("cpu-tiny")
    return replace(
        base,
        **changes,
        text={**base.text, "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1},
        vision={**base.vision, "image_size": 32},
        batch_size=4,
        packing_length=512,
        rows=1,
        steps=2,
        warmup=1,
        num_samples=48,
    )


def test_registries_list_valid_keys() -> None:
    valid = (
        "valid presets: cpu-tiny, cpu-tiny-576, gpu-1b-finetune, gpu-7b-pretrain, gpu-7b-next-finetune, "
        "gpu-7b-lora-finetune, cpu-tiny-lora, cpu-tiny-next"
    )
    with pytest.raises(ConfigError, match=valid):
        get_preset("gpu-70b")
    with pytest.raises(ConfigError, match="unknown bench mode"):
        parse_modes("hf-padded,fast")
    assert parse_modes(None) == ["hf-padded", "grouped", "packed", "ours"]
    assert parse_modes("ours, packed") == ["ours", "packed"]
    assert set(MODES) >= {"hf-padded", "grouped", "packed", "ours"}


def test_gpu_presets_have_the_issue_shapes() -> None:
    one_b, seven_b = PRESETS["gpu-1b-finetune"], PRESETS["gpu-7b-pretrain"]
    assert (
        one_b.text["hidden_size"],
        one_b.text["num_hidden_layers"],
        one_b.text["num_attention_heads"],
        one_b.text["num_key_value_heads"],
        one_b.text["intermediate_size"],
        one_b.text["vocab_size"],
    ) == (2048, 22, 32, 4, 5632, 32000)
    assert (seven_b.text["hidden_size"], seven_b.text["num_hidden_layers"], seven_b.text["intermediate_size"]) == (
        4096,
        32,
        11008,
    )
    assert one_b.vision["image_size"] == 336 and one_b.vision["patch_size"] == 14
    assert (one_b.stage, seven_b.stage, seven_b.mix) == ("finetune", "pretrain", "stage1")


def test_665k_mix_shape() -> None:
    preset = replace(get_preset("cpu-tiny-576"), num_samples=4000)
    layout = synthetic_layout(preset, seed=0)
    assert layout == synthetic_layout(preset, seed=0)
    with_image = [t for k, t, _ in layout if k == 1]
    text_only = [t for k, t, _ in layout if k == 0]
    assert 0.93 < len(with_image) / len(layout) < 0.95
    assert 100 <= sorted(with_image)[len(with_image) // 2] <= 140
    assert 420 <= sorted(text_only)[len(text_only) // 2] <= 580
    ds = SyntheticMix(preset, image_token_id=7999)
    assert max(ds.lengths) <= preset.max_length
    item = ds[0]
    assert len(item["input_ids"]) == ds.lengths[0]
    assert int((item["input_ids"] == 7999).sum()) == 576 * layout[0][0]


def test_scaled_mix_is_the_same_shape() -> None:
    full = synthetic_layout(replace(get_preset("cpu-tiny-576"), num_samples=300), seed=2)
    quarter = synthetic_layout(replace(get_preset("cpu-tiny"), num_samples=300), seed=2)
    assert [k for k, _, _ in full] == [k for k, _, _ in quarter]
    assert all(abs(q - f / 4) <= 1 for (_, f, _), (_, q, _) in zip(full, quarter, strict=True) if f < 1400)


def test_stage1_mix() -> None:
    layout = synthetic_layout(replace(get_preset("gpu-7b-pretrain"), num_samples=500), seed=1)
    assert all(k == 1 and 20 <= t <= 60 and trained == t for k, t, trained in layout)


# (padding efficiency, real tokens per step) of the seeded synthetic data and samplers: exact, not timings.
EXACT = {"hf-padded": (0.517, 486), "grouped": (0.894, 342), "packed": (1.0, 480), "ours": (0.9375, 480)}


@pytest.mark.parametrize("mode", ["hf-padded", "grouped", "packed", "ours"])
def test_mode_runs_real_trainer_steps(mode: str) -> None:
    record = run_mode("cpu-tiny", mode, preset=_small())
    assert record["mode"] == mode and record["steps"] == 2 and record["mfu"] is None
    assert record["tokens_per_s"] > 0 and record["trained_tokens_per_s"] > 0
    assert 0 <= record["data_wait_fraction"] < 1
    # ours pads every packed row to packing_length (one shape for the run): 480 of 512 positions are real.
    assert (record["padding_efficiency"], record["tokens_per_step"]) == EXACT[mode]


def test_lora_preset_trains_adapters_and_projector_only() -> None:
    from llava_train.tools.bench.run import build_bench_model

    lora = PRESETS["gpu-7b-lora-finetune"]
    assert (lora.lora_r, lora.stage, lora.mix, lora.text["hidden_size"]) == (128, "finetune", "665k", 4096)
    model = build_bench_model(_small(lora_r=4))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "multi_modal_projector" in n for n in trained)
    assert any("lora_A" in n for n in trained) and not any("vision_tower" in n for n in trained)
    record = run_mode("cpu-tiny-lora", "ours", preset=_small(lora_r=4))
    assert record["steps"] == 2 and record["tokens_per_s"] > 0 and record["checkpointing"] is False


@pytest.mark.parametrize("mode", ["hf-padded", "ours"])
def test_anyres_preset_runs_real_trainer_steps(mode: str) -> None:
    """LLaVA-NeXT: every 480 x 640 synthetic image is 5 crops and its exact anyres token count."""
    preset = replace(get_preset("cpu-tiny-next"), num_samples=32, steps=1, warmup=1, batch_size=2)
    from llava_train.tools.bench import crops_per_image, image_tokens_per_image

    # 48 px crops, 12 x 12 patches: best pinpoint 96 x 96 (2 x 2 crops), 24 x 24 patches unpadded to
    # 18 rows of 24, + one newline per row: 144 + 18 * 24 + 18.
    assert (image_tokens_per_image(preset), crops_per_image(preset)) == (144 + 18 * 24 + 18, 5)
    mix = SyntheticMix(preset, image_token_id=4095)
    item = next(mix[i] for i in range(len(mix)) if mix.layout[i][0])
    assert tuple(item["pixel_values"].shape) == (5, 3, 48, 48) and item["image_sizes"].tolist() == [[480, 640]]
    record = run_mode("cpu-tiny-next", mode, preset=preset)
    assert record["steps"] == 1 and record["tokens_per_s"] > 0


def test_seeded_mix_is_exact() -> None:
    """(images, text tokens, trained tokens) of the first samples of cpu-tiny's mix, seed 0."""
    layout = synthetic_layout(replace(get_preset("cpu-tiny"), num_samples=6), seed=0)
    assert layout == [(1, 37, 22), (1, 39, 23), (1, 35, 21), (1, 41, 24), (1, 21, 12), (1, 47, 28)]
    ds = SyntheticMix(replace(get_preset("cpu-tiny"), num_samples=6), image_token_id=4095)
    assert ds.lengths == [1 + 144 + t for _, t, _ in layout]  # BOS + (48 // 4)^2 image tokens + text


def test_summary_ratio() -> None:
    records = {
        "hf-padded": {"tokens_per_s": 100.0, "mfu": 0.05},
        "packed": {"tokens_per_s": 160.0, "mfu": 0.08},
        "ours": {"tokens_per_s": 500.0, "mfu": 0.3},
    }
    assert summary("p", records) == {
        "preset": "p",
        "ratio": 5.0,
        "packed_ratio": 1.6,
        "ours_mfu": 0.3,
        "hf_padded_mfu": 0.05,
    }
    assert summary("p", {"ours": {"tokens_per_s": 1.0, "mfu": None}})["ratio"] is None
    cpu = {m: {**r, "device": "cpu", "tokens_per_cpu_s": r["tokens_per_s"] / 2} for m, r in records.items()}
    cpu["packed"]["tokens_per_cpu_s"] = 100.0
    out = summary("p", cpu)
    assert (out["cpu_time_ratio"], out["cpu_time_packed_ratio"]) == (5.0, 2.0)


@pytest.mark.slow
def test_cli_cpu_tiny_prints_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """The full cpu-tiny preset through the CLI, one measured step per mode (about a minute on 2 cores)."""
    from llava_train.cli import main

    assert main(["bench", "--preset", "cpu-tiny", "--steps", "1"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [x.get("mode") for x in lines[:-1]] == ["hf-padded", "grouped", "packed", "ours"]
    assert set(lines[-1]) == {
        "preset",
        "ratio",
        "packed_ratio",
        "ours_mfu",
        "hf_padded_mfu",
        "cpu_time_ratio",
        "cpu_time_packed_ratio",
    }


def test_summary_table_rows_and_ratios(tmp_path) -> None:
    from llava_train.tools.bench.table import format_table, read_records

    lines = [
        {
            "preset": "p",
            "mode": "hf-padded",
            "tokens_per_s": 1000.0,
            "mfu": 0.05,
            "hfu": 0.06,
            "peak_mem_gb": 40.0,
            "data_wait_fraction": 0.01,
            "padding_efficiency": 0.5,
        },
        {
            "preset": "p",
            "mode": "ours",
            "tokens_per_s": 5500.0,
            "mfu": 0.41,
            "hfu": 0.41,
            "peak_mem_gb": 60.25,
            "data_wait_fraction": 0.0,
            "padding_efficiency": 0.97,
        },
        {"preset": "p", "ratio": 5.5},
    ]
    path = tmp_path / "bench_p.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\nTraceback (most recent call last):\n")
    table = format_table(read_records([str(path)])).splitlines()
    assert table[0] == "| preset | mode | tokens/s | MFU | HFU | peak GB | x hf-padded | data wait | padding eff. |"
    assert table[2] == "| p | hf-padded | 1,000 | 5.0% | 6.0% | 40.0 | 1.00 | 1.0% | 50.0% |"
    assert table[3] == "| p | ours | 5,500 | 41.0% | 41.0% | 60.2 | 5.50 | 0.0% | 97.0% |"
    assert len(table) == 4


def test_bench_line_is_the_training_runs_metrics_line(tmp_path) -> None:
    """One assembly: the bench's figures are the tracker's log line that the run writes to metrics.jsonl."""
    record = run_mode("cpu-tiny", "ours", preset=_small(), output_dir=str(tmp_path))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = next(x for x in lines if x.get("step") == 3 and "tokens_per_s" in x)  # warmup 1 + 2 timed steps
    assert record["tokens_per_s"] == round(logged["tokens_per_s"], 1)
    assert record["trained_tokens_per_s"] == round(logged["trained_tokens_per_s"], 1)
    assert record["padding_efficiency"] == round(logged["padding_efficiency"], 4)
    assert [x["step"] for x in lines if "tokens_per_s" in x] == [1, 3]  # the end of warmup, the end of the timed steps


BENCH_FSDP2 = """
import json
from dataclasses import replace
from llava_train.tools.bench.presets import get_preset
from llava_train.tools.bench.run import run_mode
preset = replace(get_preset("cpu-tiny"), warmup=1, steps=2, num_samples=64)
print(json.dumps(run_mode("cpu-tiny", "ours-fsdp2", preset=preset)))
"""


def test_fsdp2_mode_runs_one_process() -> None:
    """`--modes ours-fsdp2`: the same trainer under FSDP2 with one process (in a subprocess: it sets accelerate's
    process-wide state), the padding and tokens of `ours`."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-c", BENCH_FSDP2], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "engine: FSDP2 (world size 1)" in proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["mode"] == "ours-fsdp2" and record["steps"] == 2 and record["tokens_per_s"] > 0
