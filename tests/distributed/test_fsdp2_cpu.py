"""FSDP2 (`train.fsdp=configs/fsdp/fsdp2.yaml`) on 2 CPU ranks (gloo) under torchrun: both stages with ranks whose
data differ, the loss sequence against the same runs under DeepSpeed ZeRO-3, the final folder in plain transformers
(a process that never imports llava_train), the precision policy, kill -9 + exact resume, LoRA + merge-lora.

Tolerance against ZeRO-3: fp32 on CPU, same data, same init; the two engines sum the same gradients in a different
order (reduce-scatter vs ZeRO's bucketed reduce), so losses agree to ~1e-6 relative after 6 AdamW steps at lr 1e-2:
asserted at rel 1e-4.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_deepspeed_cpu import (  # noqa: F401  (workspace: a fixture)
    HERE,
    REPO,
    assert_sharded,
    assert_straddles,
    launch,
    logged_losses,
    reports,
    tiny_config,
    workspace,
    write_config,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

FSDP_YAML = REPO / "configs" / "fsdp" / "fsdp2.yaml"
CHUNK = 2
ZERO3_REL = 1e-4


def fsdp_config(root: Path, stage: str, out: Path, init_from: Path | None = None, **fsdp: Any) -> dict[str, Any]:
    """`tiny_config` with `train.fsdp` instead of `train.deepspeed` (an inline mapping when settings are given)."""
    config = with_init(tiny_config(root, stage, "zero3", out, init_from=init_from), init_from)
    config["train"].pop("deepspeed")
    config["train"]["fsdp"] = dict(fsdp) if fsdp else str(FSDP_YAML)
    return config


def with_init(config: dict[str, Any], init_from: Path | None) -> dict[str, Any]:
    """`model.init_from` for either stage (`tiny_config` sets it for finetune only)."""
    if init_from is not None:
        config["model"]["init_from"] = str(init_from)
    return config


def assert_fsdp_sharded(r0: dict[str, Any], r1: dict[str, Any]) -> None:
    """Each rank holds its FSDP2 shard of every parameter (dim-0 chunks: half the rows, rounded up on rank 0)."""
    assert r0["shards_training"].keys() == r1["shards_training"].keys()
    for name, (local0, full) in r0["shards_training"].items():
        local1, full1 = r1["shards_training"][name]
        assert full1 == full and local0 + local1 == full, name
        assert local0 < full, name  # sharded, not replicated


LOAD_IN_PLAIN_TRANSFORMERS = """
import json, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor
out = sys.argv[1]
model = AutoModelForImageTextToText.from_pretrained(out)
AutoProcessor.from_pretrained(out)
projector = dict(model.model.multi_modal_projector.named_parameters())
saved = load_file(out + "/projector.safetensors")
same = sorted(saved) == sorted(projector) and all(
    torch.equal(projector[k].detach(), v.to(projector[k].dtype)) for k, v in saved.items()
)
print(json.dumps({"projector_equal": same, "imported": "llava_train" in sys.modules,
                  "architectures": model.config.architectures}))
"""


def load_in_plain_transformers(out: Path) -> dict[str, Any]:
    """Load the folder in a fresh interpreter that never imports llava_train (no PYTHONPATH to src)."""
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_IN_PLAIN_TRANSFORMERS, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def start_projector(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """A stage-1 projector both engines start from (ZeRO-3 builds under zero.Init: its random init differs)."""
    from llava_train.config import from_dict
    from llava_train.train import run

    out = tmp_path_factory.mktemp("fsdp_start") / "stage0"
    config = tiny_config(workspace, "pretrain", "zero3", out)
    config["train"].pop("deepspeed")
    config["train"]["max_steps"] = 1
    run(from_dict(config))
    return out / "projector.safetensors"


def test_both_stages_match_zero3_and_load_in_plain_transformers(
    workspace: Path,  # noqa: F811
    start_projector: Path,
    tmp_path: Path,
) -> None:
    """Stage 1 and 2 under FSDP2 on 2 ranks (text-only vs image micro-batches, trained-token counts straddling
    a loss chunk; stage 2 with activation checkpointing): every parameter sharded, the losses of ZeRO-3's runs
    from the same starting weights (stage 1 from `start_projector`, stage 2 from FSDP2's stage-1 folder)."""
    chunked = {"perf": {"loss_on_trained_only": True, "loss_chunk_size": CHUNK}}
    losses: dict[str, list[float]] = {}
    inits: dict[str, Path] = {"pretrain": start_projector}
    for stage in ("pretrain", "finetune"):
        out = tmp_path / stage
        fsdp = {"activation_checkpointing": True} if stage == "finetune" else {}
        config = fsdp_config(workspace, stage, out, init_from=inits[stage], **fsdp) | chunked
        cfg = write_config(tmp_path, stage, config)
        report = tmp_path / f"r_{stage}"
        _, output = launch([str(HERE / "train_observer.py"), str(report), str(cfg)], cwd=tmp_path, launcher="torchrun")
        assert "engine: FSDP2 (world size 2)" in output
        assert "process group destroyed (run finished)" in output
        r0, r1 = reports(report)
        assert (r0["world_size"], r1["world_size"]) == (2, 2)
        assert_sharded(r0, r1, per_rank=1 if stage == "finetune" else 2)
        assert_fsdp_sharded(r0, r1)
        assert_straddles(r0, r1)
        if stage == "finetune":
            steps = list(zip(r0["batches"][:6], r1["batches"][:6]))
            assert any((a["images"] == 0) != (b["images"] == 0) for a, b in steps), steps
            assert r0["projector_equals_init"] is True
        losses[stage] = logged_losses(out)
        assert len(losses[stage]) == 6 and losses[stage][-1] < losses[stage][0]
        inits.setdefault("finetune", out)  # stage 2 (both engines) starts from FSDP2's stage 1
        plain = load_in_plain_transformers(out)
        assert plain == {
            "projector_equal": True,
            "imported": False,
            "architectures": ["LlavaForConditionalGeneration"],
        }

    # The same two runs under DeepSpeed ZeRO-3 (deepspeed launcher), from the same starting weights.
    for stage in ("pretrain", "finetune"):
        out = tmp_path / f"{stage}_zero3"
        config = with_init(tiny_config(workspace, stage, "zero3", out, init_from=inits[stage]), inits[stage]) | chunked
        launch(["--module", "llava_train.train", str(write_config(tmp_path, f"{stage}_z3", config))], cwd=tmp_path)
        assert logged_losses(out) == pytest.approx(losses[stage], rel=ZERO3_REL), stage


FAULT_RUNNER = REPO / "tests" / "fault_runner.py"


def drill(root: Path, out: Path, **train: Any) -> dict[str, Any]:
    """Stage 2 from the base models under FSDP2, 6 steps, 1 sample per rank, checkpoints every 2 steps."""
    config = fsdp_config(root, "finetune", out)
    config["model"].pop("init_from")
    config["train"].update({"save_strategy": "steps", "save_steps": 2, **train})
    return config


def test_kill_9_after_a_checkpoint_then_resume_reproduces_the_losses(workspace: Path, tmp_path: Path) -> None:  # noqa: F811
    """Both ranks SIGKILLed after step 5 (checkpoint-4 complete, its DCP shards from both ranks): resume=auto
    continues the uninterrupted run's losses exactly (bitwise, fp32 on CPU)."""
    from llava_train.run_files import COMPLETE_MARKER
    from llava_train.training.resume import complete_checkpoints

    ref = tmp_path / "reference"
    launch(
        ["-m", "llava_train.train", str(write_config(tmp_path, "ref", drill(workspace, ref)))], tmp_path, 2, "torchrun"
    )
    out = tmp_path / "killed"
    cfg = write_config(tmp_path, "run", drill(workspace, out, resume_from_checkpoint="auto"))
    launch([str(FAULT_RUNNER), "sigkill", "5", "all", str(cfg)], tmp_path, 2, "torchrun", expect_rc=1)
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    ckpt = out / "checkpoint-4"
    shards = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*.distcp"))
    assert shards == [f"{kind}/__{r}_0.distcp" for kind in ("optimizer_0", "pytorch_model_fsdp_0") for r in (0, 1)]
    manifest = json.loads((ckpt / COMPLETE_MARKER).read_text())["files"]
    assert set(shards) <= set(manifest) and "projector.safetensors" in manifest
    assert not (out / "model.safetensors").exists()
    launch(["-m", "llava_train.train", str(cfg)], tmp_path, 2, "torchrun")
    assert logged_losses(out) == logged_losses(ref)
    assert len(logged_losses(ref)) == 6


def test_lora_fsdp2_resume_and_merge_lora(workspace: Path, tmp_path: Path) -> None:  # noqa: F811
    """LoRA under FSDP2 on 2 ranks: resuming from a checkpoint's DCP shards continues the losses, the final folder's
    adapter (gathered from the shards) merges with merge-lora into a plain HF folder holding the final projector."""
    import shutil

    from transformers import AutoModelForImageTextToText

    from llava_train.training.lora_merge import merge_lora

    def lora_config(out: Path, **train: Any) -> dict[str, Any]:
        config = drill(workspace, out, **train)
        config["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
        config["train"]["save_steps"] = 3
        return config

    full = tmp_path / "full"
    launch(
        ["-m", "llava_train.train", str(write_config(tmp_path, "full", lora_config(full)))], tmp_path, 2, "torchrun"
    )
    cut = tmp_path / "cut"
    shutil.copytree(full / "checkpoint-3", cut / "checkpoint-3")  # kill -9 right after the checkpoint
    resumed = write_config(tmp_path, "resume", lora_config(cut, resume_from_checkpoint="auto"))
    launch(["-m", "llava_train.train", str(resumed)], tmp_path, 2, "torchrun")
    full_losses, resumed_losses = logged_losses(full), logged_losses(cut)
    assert len(full_losses) == 6 and resumed_losses == full_losses[3:]

    adapter = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    assert any("lora_A" in k for k in adapter) and any("multi_modal_projector" in k for k in adapter)
    merged = Path(merge_lora(full, tmp_path / "merged"))
    model = AutoModelForImageTextToText.from_pretrained(str(merged))
    assert not any("lora_" in n for n, _ in model.named_parameters())
    projector = model.model.multi_modal_projector.state_dict()
    for name, value in load_file(str(full / "projector.safetensors")).items():
        assert torch.equal(projector[name], value.to(projector[name].dtype)), name


@pytest.mark.parametrize("arch", ["llava_next", "llava_onevision"])
def test_anyres_ranks_with_different_crops_text_only_and_video(arch: str, tmp_path: Path) -> None:
    """LLaVA-NeXT / OneVision under FSDP2: micro-batches with different crop counts, text-only ones and a video
    against images on the other rank make the same collectives (no hang, finite losses, every step logged)."""
    from test_anyres_zero3 import STEPS, config

    from llava_train.config import from_dict
    from llava_train.model.tiny import ensure_tiny_components
    from tiny_models import write_anyres_data

    write_anyres_data(tmp_path / "data", arch)
    out = tmp_path / "out"
    cfg = config(tmp_path, arch, out)
    cfg["train"].pop("deepspeed")
    cfg["train"]["fsdp"] = str(FSDP_YAML)
    ensure_tiny_components(from_dict(cfg).model)
    path = write_config(tmp_path, "finetune", cfg)
    _, output = launch([str(HERE / "train_observer.py"), str(tmp_path / "r"), str(path)], tmp_path, 2, "torchrun")
    assert "engine: FSDP2 (world size 2)" in output and "process group destroyed (run finished)" in output
    r0, r1 = reports(tmp_path / "r")
    assert_fsdp_sharded(r0, r1)
    steps = list(zip(r0["batches"][:STEPS], r1["batches"][:STEPS]))
    assert any(a["crops"] != b["crops"] and a["crops"] and b["crops"] for a, b in steps), steps
    assert any((a["crops"] == 0) != (b["crops"] == 0) for a, b in steps), steps
    if arch == "llava_onevision":
        assert any((a["videos"] > 0) != (b["videos"] > 0) for a, b in steps), steps
    losses = logged_losses(out)
    assert len(losses) == STEPS and all(loss == loss for loss in losses)
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["model_type"] == arch and config_json["architectures"][0].startswith("Llava")


def test_cpu_offload_file_trains_the_same_losses(workspace: Path, tmp_path: Path) -> None:  # noqa: F811
    """configs/fsdp/fsdp2_offload.yaml (CPUOffloadPolicy + activation checkpointing): the losses of fsdp2.yaml. FSDP2's
    offload needs an accelerator: on CPU it is ignored with a warning, so this checks the file and activation
    checkpointing; the offload itself is GPU-only (untested here)."""
    losses = {}
    for name in ("fsdp2", "fsdp2_offload"):
        out = tmp_path / name
        config = drill(workspace, out, save_strategy="no")
        config["train"]["fsdp"] = str(REPO / "configs" / "fsdp" / f"{name}.yaml")
        _, output = launch(
            ["-m", "llava_train.train", str(write_config(tmp_path, name, config))], tmp_path, 2, "torchrun"
        )
        ignored = "train.fsdp: cpu_offload ignored on a machine without an accelerator" in output
        assert ignored is name.endswith("offload")
        losses[name] = logged_losses(out)
    assert len(losses["fsdp2"]) == 6
    assert losses["fsdp2_offload"] == pytest.approx(losses["fsdp2"], rel=1e-6)


def test_regional_compile_composes_with_fsdp2(workspace: Path, tmp_path: Path) -> None:  # noqa: F811
    """`perf.compile` (each layer compiled in place) under FSDP2 on 2 ranks, packed rows of one shape: the eager
    run's losses (FSDP2's hooks run outside the compiled layers; ZeRO-3 refuses compile)."""
    losses = {}
    for flag in (False, True):
        out = tmp_path / f"compile-{flag}"
        config = drill(workspace, out, save_strategy="no", max_steps=3)
        config["data"].update(packing=True, packing_length=256)
        config["perf"] = {"compile": flag, "static_shapes": True}
        cfg = write_config(tmp_path, f"compile-{flag}", config)
        _, output = launch(["-m", "llava_train.train", str(cfg)], tmp_path, 2, "torchrun")
        assert ("perf.compile: 4 layers compiled" in output) is flag
        losses[flag] = logged_losses(out)
    assert len(losses[False]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_accelerate_launch_use_fsdp(workspace: Path, tmp_path: Path) -> None:  # noqa: F811
    """`accelerate launch --use_fsdp --num_processes 2 -m llava_train.train CONFIG` (accelerate's own FSDP env is
    set; our settings file wins): trains sharded on 2 ranks, saves, exits 0."""
    import subprocess as sp

    from test_deepspeed_cpu import _env, _free_port

    out = tmp_path / "pretrain"
    cfg = write_config(tmp_path, "pretrain", fsdp_config(workspace, "pretrain", out))
    port = str(_free_port())
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", port, "-m", "llava_train.train", str(cfg)]  # fmt: skip
    proc = sp.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "engine: FSDP2 (world size 2)" in output and "process group destroyed (run finished)" in output
    losses = logged_losses(out)
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert load_in_plain_transformers(out)["projector_equal"] is True


def test_sigterm_to_one_rank_and_nan_on_one_rank(workspace: Path, tmp_path: Path) -> None:  # noqa: F811
    """Run safety as under DeepSpeed: SIGTERM to rank 1 after step 2 saves checkpoint-3 on both ranks and exits 3,
    resume=auto continues the losses exactly; a NaN loss on rank 1 only (step 3) with nan_policy=skip is skipped
    on both ranks (the guard checks each rank's gradient shards and all-reduces the verdict)."""
    from llava_train.run_files import PREEMPTED_FILE
    from llava_train.training.resume import complete_checkpoints

    ref = tmp_path / "reference"
    ref_cfg = write_config(tmp_path, "ref", drill(workspace, ref, save_strategy="no"))
    launch(["-m", "llava_train.train", str(ref_cfg)], tmp_path, 2, "torchrun")
    out = tmp_path / "preempted"
    cfg = write_config(tmp_path, "run", drill(workspace, out, save_strategy="no", resume_from_checkpoint="auto"))
    # torchrun exits 1 when a rank exits non-zero (deepspeed's launcher passes the 3 on); each rank exited 3.
    _, output = launch([str(FAULT_RUNNER), "sigterm", "2", "1", str(cfg)], tmp_path, 2, "torchrun", expect_rc=1)
    assert output.count("llava-train: preempted: checkpoint-3 saved") == 2
    assert "failed (exitcode: 3)" in output
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-3"] and (out / PREEMPTED_FILE).is_file()
    launch(["-m", "llava_train.train", str(cfg)], tmp_path, 2, "torchrun")
    assert logged_losses(out) == logged_losses(ref)

    nan = tmp_path / "nan"
    nan_cfg = write_config(tmp_path, "nan", drill(workspace, nan, save_strategy="no", nan_policy="skip"))
    _, output = launch([str(FAULT_RUNNER), "nan", "2", "1", str(nan_cfg)], tmp_path, 2, "torchrun")
    assert output.count("skipped step 3 on every rank") == 2, output[-3000:]
    rows = [json.loads(line) for line in (nan / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows if "loss" in r] == [0, 0, 1, 1, 1, 1]


def test_trained_vision_tower_in_bf16(workspace: Path, tmp_path: Path) -> None:  # noqa: F811
    """The tower trains in a bf16 run: its encoder layers are units of their own (the trained layer 0 feeding the
    projector in fp32, the unused tail layer 1 frozen in bf16 behind it), every rank trains, the folder loads."""
    out = tmp_path / "tower"
    config = drill(workspace, out, save_strategy="no", bf16=True, max_steps=3)
    config["model"].update(dtype="bfloat16", train_vision_tower=True, vision_tower_train_from_layer=0)
    _, output = launch(
        ["-m", "llava_train.train", str(write_config(tmp_path, "tower", config))], tmp_path, 2, "torchrun"
    )
    assert "optimizer group vision_tower/decay" in output
    losses = logged_losses(out)
    assert len(losses) == 3 and all(loss == loss for loss in losses)
    assert load_in_plain_transformers(out)["projector_equal"] is True
