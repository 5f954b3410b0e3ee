"""Tests for plan: ZeRO settings from the shipped JSONs, exact per-state bytes for the 7B recipes, verdicts, output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_train.config import load_config
from llava_train.tools.plan import (
    GIB,
    OVERHEAD_BYTES,
    ZeroSettings,
    estimate,
    format_plan,
    plan,
    read_zero_settings,
    verdict,
)

REPO = Path(__file__).resolve().parents[2]
DS = REPO / "configs" / "deepspeed"
SEVEN = REPO / "configs" / "llava-1.5-7b"
# LlavaForConditionalGeneration(vicuna-7b-v1.5 + <image> row, CLIP-L/14-336, mlp2x_gelu projector).
VISION = 303_507_456
PROJECTOR = 20_979_712
LM = 6_607_347_712
LM_HEAD = 131_076_096
LM_LINEARS = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
LORA_R128 = 319_815_680


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    # Recipes name their DeepSpeed JSON relative to the repository root.
    monkeypatch.chdir(REPO)


def test_zero_settings_of_shipped_configs() -> None:
    assert read_zero_settings(str(DS / "zero2.json")) == ZeroSettings(2, False, False, str(DS / "zero2.json"))
    assert read_zero_settings(str(DS / "zero3.json")) == ZeroSettings(3, False, False, str(DS / "zero3.json"))
    offload = str(DS / "zero3_offload.json")
    assert read_zero_settings(offload) == ZeroSettings(3, True, True, offload)
    assert read_zero_settings(None) == ZeroSettings(0, False, False, "none")
    inline = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert read_zero_settings(inline) == ZeroSettings(2, True, False, "inline dict")


def test_missing_deepspeed_json_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"train.deepspeed: no DeepSpeed JSON at {tmp_path / 'x.json'}"):
        read_zero_settings(str(tmp_path / "x.json"))


def test_shipped_deepspeed_configs_leave_batch_and_precision_to_hf() -> None:
    for name in ("zero2.json", "zero3.json", "zero3_offload.json"):
        data = json.loads((DS / name).read_text())
        assert "optimizer" not in data and "scheduler" not in data
        auto = ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps")
        assert [data[k] for k in auto] == ["auto"] * 3
        assert (data["bf16"]["enabled"], data["fp16"]["enabled"]) == ("auto", "auto")
        assert data["zero_optimization"]["reduce_bucket_size"] == "auto"
    for name in ("zero3.json", "zero3_offload.json"):
        assert json.loads((DS / name).read_text())["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]


def test_finetune_zero3_rows_are_params_times_bytes() -> None:
    p = estimate(load_config(SEVEN / "finetune.yaml"), num_gpus=8)
    trainable, frozen = PROJECTOR + LM + LM_HEAD, VISION
    assert (p.counts.trainable, p.counts.frozen, p.counts.largest_layer) == (trainable, frozen, LM_HEAD)
    tokens = 16 * 2048
    assert p.rows == [
        ("16-bit weights (all params) / 8", 2 * (trainable + frozen) // 8),
        ("16-bit grads (trainable / 8)", 2 * trainable // 8),
        ("fp32 grads + master + Adam m, v (trainable / 8)", 16 * trainable // 8),
        ("largest layer gathered (weight + grad)", 4 * LM_HEAD),
        ("LM activations (checkpointed: 32 layer inputs + 1 layer)", 32 * 2 * tokens * 4096 + 34 * tokens * 4096),
        ("logits + fp32 loss copy + grad (4096 rows: perf.loss_chunk_size)", 10 * 4096 * 32001),
        ("CUDA context, workspaces, allocator slack", OVERHEAD_BYTES),
    ]
    assert p.cpu_bytes_per_node == 0
    assert "SW: Model with 7062M total params, 131M largest layer params." in p.deepspeed_estimate


def test_dpo_counts_two_sequences_per_pair_and_the_frozen_reference() -> None:
    from llava_train.config import load_config as load

    precomputed = estimate(load(SEVEN / "dpo_rlaif_v.yaml"), num_gpus=8)
    assert precomputed.micro_batch == 2  # 1 pair per GPU = chosen + rejected
    assert not any("reference" in name for name, _ in precomputed.rows)
    frozen = estimate(load(SEVEN / "dpo_rlaif_v.yaml", ["dpo.reference=frozen"]), num_gpus=8)
    copy = dict(frozen.rows)["DPO frozen reference (a copy of the model)"]
    assert copy == 2 * (PROJECTOR + LM + LM_HEAD + VISION) and frozen.total == precomputed.total + copy


def test_pretrain_zero2_keeps_frozen_weights_replicated_without_optimizer_state() -> None:
    p = estimate(load_config(SEVEN / "pretrain.yaml"), num_gpus=8)
    assert (p.counts.trainable, p.counts.frozen) == (PROJECTOR, VISION + LM + LM_HEAD)
    assert p.rows[:3] == [
        ("16-bit weights (all params), replicated", 2 * (PROJECTOR + VISION + LM + LM_HEAD)),
        ("16-bit grads (trainable / 8)", 2 * PROJECTOR // 8),
        ("fp32 grads + master + Adam m, v (trainable / 8)", 16 * PROJECTOR // 8),
    ]


def test_lora_offload_and_qlora_bytes() -> None:
    lora = load_config(SEVEN / "finetune_lora.yaml", ["train.deepspeed=configs/deepspeed/zero3_offload.json"])
    p = estimate(lora, num_gpus=8)
    # peft keeps a frozen copy of the projector beside the trained one (modules_to_save).
    assert (p.counts.trainable, p.counts.frozen) == (LORA_R128 + PROJECTOR, VISION + PROJECTOR + LM + LM_HEAD)
    assert [b for name, b in p.rows[:3]] == [0, 0, 0]
    assert p.cpu_bytes_per_node == 16 * p.counts.trainable + 2 * (p.counts.trainable + p.counts.frozen)
    qlora = load_config(SEVEN / "finetune_lora.yaml", ["lora.bits=4", "train.deepspeed=null"])
    q = estimate(qlora, num_gpus=1)
    assert q.counts.quantizable == LM_LINEARS
    fp32_rest = q.counts.frozen - LM_LINEARS + q.counts.trainable
    assert q.rows[:2] == [
        ("weights (4-bit LM linears, fp32 rest)", int(LM_LINEARS * 4.127 / 8) + 4 * fp32_rest),
        ("grads + AdamW m, v (fp32, trainable)", 12 * q.counts.trainable),
    ]
    assert q.deepspeed_estimate == ""


def test_no_deepspeed_counts_fp32_masters_of_trainable_weights() -> None:
    """Outside DeepSpeed trainable weights are fp32 masters with fp32 grads and AdamW state (training.precision);
    frozen ones stay in model.dtype. `model.master_weights=false` (pure bf16) counts every state in bf16."""
    cfg = load_config(SEVEN / "pretrain.yaml", ["train.deepspeed=null", "perf.loss_on_trained_only=false"])
    p = estimate(cfg, num_gpus=1)
    assert p.rows[4] == ("logits + fp32 loss copy + grad (every position)", 10 * 32 * 2048 * 32001)
    assert p.rows[:3] == [
        ("frozen weights (bfloat16)", 2 * (VISION + LM + LM_HEAD)),
        ("trainable weights (fp32 masters)", 4 * PROJECTOR),
        ("grads + AdamW m, v (fp32, trainable)", 12 * PROJECTOR),
    ]
    pure = estimate(load_config(SEVEN / "pretrain.yaml", ["train.deepspeed=null", "model.master_weights=false"]), 1)
    assert pure.rows[:2] == [
        ("weights (bfloat16, all params; pure, no fp32 masters)", 2 * (PROJECTOR + VISION + LM + LM_HEAD)),
        ("grads + AdamW m, v (bfloat16, trainable)", 6 * PROJECTOR),
    ]


def test_verdict_thresholds() -> None:
    assert [verdict(int(36 * GIB), 40), verdict(int(36.5 * GIB), 40), verdict(40 * GIB + 1, 40)] == [
        "fits",
        "tight",
        "OOM",
    ]


def test_plan_text_names_both_estimates_and_the_verdicts() -> None:
    text = plan(load_config(SEVEN / "finetune.yaml"), num_gpus=8)
    assert text.startswith("world: 1 node(s) x 8 GPU(s) = 8; ZeRO-3 (configs/deepspeed/zero3.json)")
    assert "verdict: 24 GB GPU: OOM, 40 GB GPU: fits, 80 GB GPU: fits" in text
    assert "DeepSpeed's estimator (model states only, assumes EVERY parameter trains" in text
    assert "(the row for this config: offload_param=none, offload_optimizer=none, zero_init=1)" in text
    assert "language_model             6,607,347,712               0" in text


def test_bad_world_size_is_an_error() -> None:
    with pytest.raises(ValueError, match="num_gpus and num_nodes must be >= 1, got 0 and 1"):
        estimate(load_config(SEVEN / "finetune.yaml"), num_gpus=0)


def test_plan_prints_the_exact_table_for_the_7b_pretrain_recipe() -> None:
    """What `llava-train plan configs/llava-1.5-7b/pretrain.yaml --num-gpus 2 --num-nodes 2` prints, line by line."""
    lines = plan(load_config(SEVEN / "pretrain.yaml"), num_gpus=2, num_nodes=2).splitlines()
    assert lines[0] == (
        "world: 2 node(s) x 2 GPU(s) = 4; ZeRO-2 (configs/deepspeed/zero2.json); micro-batch 32 x 2048 tokens; "
        "gradient checkpointing on"
    )
    assert lines[3:9] == [
        "vision_tower                           0     303,507,456",
        "multi_modal_projector         20,979,712               0",
        "language_model                         0   6,607,347,712",
        "lm_head                                0     131,076,096",
        "total                         20,979,712   7,041,931,264",
        "",
    ]
    rows = [line.split("  ")[-1].strip() for line in lines[10:17]]
    assert rows == ["13.16 GiB", "0.01 GiB", "0.08 GiB", "24.50 GiB", "1.22 GiB", "2.00 GiB", "40.96 GiB"]
    assert "verdict: 24 GB GPU: OOM, 40 GB GPU: OOM, 80 GB GPU: fits" in lines


@pytest.mark.parametrize("recipe", ["llava-1.5-7b/finetune_task.yaml", "llava-1.5-13b/finetune_task_lora.yaml"])
def test_plan_of_a_task_recipe_needs_no_network(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """init_from is a hub id of an original checkpoint: plan builds from the built-in configs, never resolving it."""
    import huggingface_hub

    def offline(*args: object, **kwargs: object) -> None:
        raise AssertionError("plan must not download anything")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    text = plan(load_config(REPO / "configs" / recipe), num_gpus=8)
    assert text.startswith("world: 1 node(s) x 8 GPU(s) = 8; ZeRO-3 (configs/deepspeed/zero3.json)")


def test_fsdp2_rows_shard_every_state_without_16bit_copies() -> None:
    """`train.fsdp`: frozen weights in model.dtype, fp32 masters + fp32 grads + AdamW m, v, all / world; two gathered
    units; 2 bytes per trainable parameter less than ZeRO-3 (no separate 16-bit copy); offload moves the shards."""
    fsdp = ["train.deepspeed=null", "train.fsdp=configs/fsdp/fsdp2.yaml"]
    p = estimate(load_config(SEVEN / "finetune.yaml", fsdp), num_gpus=8)
    zero3 = estimate(load_config(SEVEN / "finetune.yaml"), num_gpus=8)
    trainable, frozen = PROJECTOR + LM + LM_HEAD, VISION
    assert p.rows[:4] == [
        ("frozen weights (bfloat16 / 8)", 2 * frozen // 8),
        ("trainable weights (fp32 masters / 8)", 4 * trainable // 8),
        ("fp32 grads + AdamW m, v (trainable / 8)", 12 * trainable // 8),
        ("2 units gathered (compute dtype) + 1 unsharded grad", 8 * LM_HEAD),
    ]
    assert p.rows[4:] == zero3.rows[4:]  # activations, logits, overhead: the same
    assert p.cpu_bytes_per_node == 0
    assert "; FSDP2 (configs/fsdp/fsdp2.yaml); " in format_plan(p)
    offload = estimate(load_config(SEVEN / "finetune.yaml", [*fsdp[:1], "train.fsdp=configs/fsdp/fsdp2_offload.yaml"]))
    assert offload.rows[0] == ("2 units gathered (compute dtype) + 1 unsharded grad", 8 * LM_HEAD)
    assert offload.cpu_bytes_per_node == 8 * ((2 * frozen + 16 * trainable) // 8)
    assert offload.gradient_checkpointing is True
