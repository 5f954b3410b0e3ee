"""2-rank DeepSpeed on CPU (gloo) under the real `deepspeed` launcher: ZeRO-2/3 mechanics and both LLaVA stages.

Slow (each launch imports the stack in two processes; the first one compiles DeepSpeed's shm comm
op into TORCH_EXTENSIONS_DIR, ~40 s). Every subprocess has a timeout, so a hang fails instead of
blocking CI: the mixed text-only/image runs are the hang checks.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DS_DIR = REPO / "configs" / "deepspeed"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
LAUNCH_TIMEOUT = 900
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 40)}


def _free_port() -> int:
    """A free port below Linux's ephemeral range (32768-60999).

    A port from bind(0) is ephemeral: between this check and rank 0 binding it seconds later (after
    importing torch), any outgoing connection (gloo's own pairs included) may be given the same port.
    Ports below the range are never handed out implicitly.
    """
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env["DS_ACCELERATOR"] = "cpu"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["OMP_NUM_THREADS"] = "1"
    env["WANDB_MODE"] = "disabled"
    return env


def launcher_command(launcher: str, num_ranks: int = 2) -> list[str]:
    """The launcher prefix: `deepspeed` (what users run), `torchrun`, or `accelerate launch --use_deepspeed`."""
    port = str(_free_port())
    if launcher == "deepspeed":
        return [str(DEEPSPEED), "--num_gpus", str(num_ranks), "--master_port", port]
    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(num_ranks),
            "--master_port",
            port,
        ]
    if launcher == "accelerate":
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--use_deepspeed",
            "--num_processes",
            str(num_ranks),
            "--num_machines",
            "1",
            "--main_process_port",
            port,
        ]
    raise KeyError(f"unknown launcher {launcher!r}; valid launchers: deepspeed, torchrun, accelerate")


def launch(
    args: list[str], cwd: Path, num_ranks: int = 2, launcher: str = "deepspeed", expect_rc: int = 0
) -> tuple[float, str]:
    """`<launcher> ARGS` with 2 ranks; returns (wall seconds, output); fails with the output's tail unless the
    launcher's exit code is `expect_rc` (0: every rank finished)."""
    cmd = [*launcher_command(launcher, num_ranks), *args]
    start = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"timed out after {LAUNCH_TIMEOUT}s (hang?): {' '.join(cmd)}\n{out[-4000:]}")
    wall = time.monotonic() - start
    output = proc.stdout + proc.stderr
    leaked = _shm_segments(cmd)
    for segment in leaked:
        segment.unlink(missing_ok=True)  # a rank the test killed cannot clean up after itself
    assert proc.returncode == expect_rc, f"{' '.join(cmd)}: exit code {proc.returncode}:\n{output[-6000:]}"
    if launcher == "deepspeed" and expect_rc == 0 and "llava_train" in " ".join(args):
        # DeepSpeed's CPU backend leaves a 69 MB /dev/shm segment per rank; the product's teardown removes it.
        assert not leaked, f"leaked /dev/shm segments {leaked}"
    print(f"[{wall:.0f}s] {' '.join(cmd)}")
    return wall, output


def _shm_segments(cmd: list[str]) -> list[Path]:
    """DeepSpeed CPU workspaces of a launch (named after its master port) still in /dev/shm."""
    flag = next((f for f in ("--master_port", "--main_process_port") if f in cmd), None)
    if flag is None:
        return []
    port = cmd[cmd.index(flag) + 1]
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def reports(folder: Path, num_ranks: int = 2) -> list[dict[str, Any]]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(num_ranks)]


# ---------------------------------------------------------------------------------------------
# Mechanics: tiny Llama + HF Trainer + prepare_distributed (no llava_train model code involved).


@pytest.mark.parametrize(
    ("launcher", "zero"),
    [("deepspeed", "zero2"), ("deepspeed", "zero3"), ("torchrun", "zero3"), ("accelerate", "zero3")],
)
def test_hf_trainer_mechanics(launcher: str, zero: str, tmp_path: Path) -> None:
    worker = [str(HERE / "cpu_zero_worker.py"), str(tmp_path), str(DS_DIR / f"{zero}.json")]
    launch(worker, cwd=tmp_path, launcher=launcher)
    r0, r1 = reports(tmp_path)
    stage = int(zero[-1])
    for r in (r0, r1):
        assert (r["world_size"], r["args_world_size"], r["train_batch_size"], r["zero_stage"]) == (2, 2, 4, stage)
        assert r["zero3_enabled"] is (stage == 3)
        assert r["head_equal"] is True
    # 4 steps x 2 samples per rank: every sample once, no sample on both ranks.
    assert len(r0["seen"]) == len(r1["seen"]) == 8
    assert sorted(r0["seen"] + r1["seen"]) == list(range(16))
    for name, (local, full) in r0["shards"].items():
        assert r1["shards"][name] == [local, full]
        assert local == ((full + 1) // 2 if stage == 3 else full), name
    assert r0["losses"] == r1["losses"]


# ---------------------------------------------------------------------------------------------
# The real entry point: `llava_train.train` on the tiny preset, both stages, 2 ranks.

N_IMAGE_ROWS = 24
N_TEXT_ROWS = 8
PROJECTOR_LR = 1e-3
LR = 1e-2


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny data (solid-colour images; stage 2 mixes in text-only rows) and the tiny preset's model folders."""
    from PIL import Image

    from llava_train.config import from_dict
    from llava_train.model.tiny import ensure_tiny_components

    root = tmp_path_factory.mktemp("ds_cpu")
    images = root / "images"
    images.mkdir()
    names = list(COLOURS)
    pretrain, finetune = [], []
    for i in range(N_IMAGE_ROWS):
        colour = names[i % len(names)]
        Image.new("RGB", (40, 32), COLOURS[colour]).save(images / f"{i}.png")
        pretrain.append(
            {
                "id": f"p{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe."},
                    {"from": "gpt", "value": f"a {colour} image"},
                ],
            }
        )
        finetune.append(
            {
                "id": f"f{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is it?"},
                    {"from": "gpt", "value": colour},
                ],
            }
        )
    for i in range(N_TEXT_ROWS):
        colour = names[i % len(names)]
        finetune.append(
            {
                "id": f"t{i}",
                "conversations": [{"from": "human", "value": f"Say {colour}."}, {"from": "gpt", "value": colour}],
            }
        )
    (root / "pretrain.json").write_text(json.dumps(pretrain))
    (root / "finetune.json").write_text(json.dumps(finetune))
    # Written once here instead of by both ranks of the first launch.
    ensure_tiny_components(from_dict(tiny_config(root, "pretrain", "zero2", root / "unused")).model)
    return root


def tiny_config(root: Path, stage: str, zero: str, out: Path, init_from: Path | None = None) -> dict[str, Any]:
    """Stage config for the tiny preset: 6 optimizer steps, 2 samples per rank (stage 1) or 1 (stage 2).

    Stage 2 uses one sample per rank and no modality grouping, so some steps pair a text-only
    micro-batch on one rank with an image micro-batch on the other (the hang case).
    """
    finetune = stage == "finetune"
    config: dict[str, Any] = {
        "stage": stage,
        "model": {
            "language_model": str(root / "models" / "lm"),
            "vision_tower": str(root / "models" / "vision"),
            "preset": "tiny",
            "dtype": "float32",
        },
        "data": {
            "train": [{"path": str(root / f"{stage}.json"), "image_folder": str(root / "images")}],
            "template": "vicuna_v1" if finetune else "plain",
            "model_max_length": 256,
        },
        "train": {
            "output_dir": str(out),
            "deepspeed": str(DS_DIR / f"{zero}.json"),
            "max_steps": 6,
            "per_device_train_batch_size": 1 if finetune else 2,
            "learning_rate": LR,
            "lr_scheduler_type": "constant",
            "logging_steps": 1,
            "save_strategy": "no",
            "seed": 0,
            "dataloader_num_workers": 0,
            "report_to": [],
            "disable_tqdm": True,
        },
    }
    if finetune:
        config["model"]["init_from"] = str(init_from)
        config["optim"] = {"projector_lr": PROJECTOR_LR}
    return config


def write_config(root: Path, name: str, config: dict[str, Any]) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def logged_losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def assert_sharded(r0: dict[str, Any], r1: dict[str, Any], per_rank: int) -> None:
    """Each rank trained on its own samples: no id on both ranks, `per_rank` per rank per step."""
    ids0 = [i for b in r0["batches"][:6] for i in b["ids"]]
    ids1 = [i for b in r1["batches"][:6] for i in b["ids"]]
    assert len(ids0) == len(ids1) == 6 * per_rank
    assert not set(ids0) & set(ids1)


def assert_partitioned(r0: dict[str, Any], r1: dict[str, Any], zero: str) -> None:
    """Under ZeRO-3 each rank holds half of every parameter (rounded up); otherwise the whole of it."""
    zero3 = zero.startswith("zero3")
    assert r0["shards_training"] == r1["shards_training"]
    for name, (local, full) in r0["shards_training"].items():
        assert local == ((full + 1) // 2 if zero3 else full), name
    # Built under zero.Init, the model is partitioned before the engine exists, except embeddings that
    # `resize_token_embeddings` (adding <image> to a base LM) replaced: transformers builds those
    # whole and DeepSpeed partitions them when the engine starts (checked above).
    resized = {"model.language_model.embed_tokens.weight", "lm_head.weight"}
    for name, (local, full) in r0["shards_built"].items():
        if not zero3:
            assert local == full, name
        elif name in resized:
            assert local in ((full + 1) // 2, full), name
        else:
            assert local == (full + 1) // 2, name


def assert_loads_in_transformers(out: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(out))
    saved = load_file(str(out / "projector.safetensors"))
    projector = dict(model.model.multi_modal_projector.named_parameters())
    assert sorted(saved) == sorted(projector)
    for name, value in saved.items():
        assert torch.equal(projector[name].detach(), value.to(projector[name].dtype)), name


CHUNK = 2  # perf.loss_chunk_size: ranks with 2 and 3 trained tokens need 1 and 2 lm_head chunks


def chunks(trained: int) -> int:
    return max(1, -(-trained // CHUNK))


def assert_straddles(r0: dict[str, Any], r1: dict[str, Any]) -> None:
    """Some step's micro-batches need different numbers of loss chunks on the two ranks (the old hang case)."""
    steps = list(zip(r0["batches"][:6], r1["batches"][:6]))
    assert any(chunks(a["trained"]) != chunks(b["trained"]) for a, b in steps), steps


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_both_stages_two_ranks(zero: str, workspace: Path, tmp_path: Path) -> None:
    """Both stages on 2 ranks whose data differ (text-only vs image micro-batches, trained-token counts on either
    side of a small loss chunk): the chunked trained-positions loss gives the losses of HF's full loss."""
    pre_out, ft_out = tmp_path / "pretrain", tmp_path / "finetune"
    chunked = {"perf": {"loss_on_trained_only": True, "loss_chunk_size": CHUNK}}
    pre_cfg = write_config(tmp_path, "pretrain", tiny_config(workspace, "pretrain", zero, pre_out) | chunked)
    # launch() asserts the launcher's exit code is 0: both ranks ended cleanly (no teardown abort, rc 250).
    pre_wall, pre_log = launch([str(HERE / "train_observer.py"), str(tmp_path / "r_pre"), str(pre_cfg)], cwd=tmp_path)
    assert "process group destroyed (run finished)" in pre_log
    p0, p1 = reports(tmp_path / "r_pre")
    assert (p0["world_size"], p1["world_size"]) == (2, 2)
    assert (p0["scans"], p1["scans"]) == (1, 0)  # rank 0 scanned, rank 1 read its cache
    assert_sharded(p0, p1, per_rank=2)
    assert_partitioned(p0, p1, zero)
    assert_straddles(p0, p1)
    assert p0["group_lrs"] == {"projector/decay": LR, "projector/no_decay": LR}
    pre_losses = logged_losses(pre_out)
    assert len(pre_losses) == 6 and pre_losses[-1] < pre_losses[0]

    ft_config = tiny_config(workspace, "finetune", zero, ft_out, init_from=pre_out) | chunked
    ft_cfg = write_config(tmp_path, "finetune", ft_config)
    ft_wall, ft_log = launch([str(HERE / "train_observer.py"), str(tmp_path / "r_ft"), str(ft_cfg)], cwd=tmp_path)
    assert "process group destroyed (run finished)" in ft_log
    f0, f1 = reports(tmp_path / "r_ft")
    assert (f0["scans"], f1["scans"]) == (1, 0)
    assert f0["projector_equals_init"] is True and f1["projector_equals_init"] is True
    assert_sharded(f0, f1, per_rank=1)
    assert_partitioned(f0, f1, zero)
    assert_straddles(f0, f1)
    # A step where one rank has a text-only micro-batch and the other an image: it completed.
    steps = list(zip(f0["batches"][:6], f1["batches"][:6]))
    assert any((a["images"] == 0) != (b["images"] == 0) for a, b in steps), steps
    expected = {
        "language_model/decay": LR,
        "language_model/no_decay": LR,
        "projector/decay": PROJECTOR_LR,
        "projector/no_decay": PROJECTOR_LR,
    }
    assert f0["group_lrs"] == f1["group_lrs"] == expected
    ft_losses = logged_losses(ft_out)
    assert len(ft_losses) == 6 and ft_losses[-1] < ft_losses[0]
    assert_loads_in_transformers(ft_out)

    # The same two runs with HF's loss (lm_head on every position, one call): the same losses. fp32 on CPU;
    # the two losses sum the same per-token terms in another order, so they agree to ~1e-6 relative.
    off = {"perf": {"loss_on_trained_only": False}}
    for stage, losses, init in (("pretrain", pre_losses, None), ("finetune", ft_losses, pre_out)):
        out = tmp_path / f"{stage}_hf_loss"
        cfg = write_config(tmp_path, f"{stage}_hf", tiny_config(workspace, stage, zero, out, init_from=init) | off)
        launch(["--module", "llava_train.train", str(cfg)], cwd=tmp_path)
        assert logged_losses(out) == pytest.approx(losses, rel=1e-5), stage
    print(f"{zero}: pretrain {pre_wall:.0f}s, finetune {ft_wall:.0f}s")


MODULE_FLAG = {"deepspeed": "--module", "torchrun": "-m", "accelerate": "-m"}


@pytest.mark.parametrize(
    ("launcher", "zero"), [("deepspeed", "zero3_offload"), ("torchrun", "zero2"), ("accelerate", "zero3")]
)
def test_module_entry_point_every_launcher(launcher: str, zero: str, workspace: Path, tmp_path: Path) -> None:
    """What users type, e.g. `deepspeed --num_gpus 2 --module llava_train.train CONFIG`: trains, saves, exits 0."""
    out = tmp_path / "pretrain"
    cfg = write_config(tmp_path, "pretrain", tiny_config(workspace, "pretrain", zero, out))
    wall, output = launch([MODULE_FLAG[launcher], "llava_train.train", str(cfg)], cwd=tmp_path, launcher=launcher)
    assert "training arguments ready (world size 2, deepspeed True)" in output
    assert "process group destroyed (run finished)" in output
    losses = logged_losses(out)
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert_loads_in_transformers(out)
    print(f"{zero} pretrain via {launcher}: {wall:.0f}s")


def test_data_error_exits_2_on_every_rank(workspace: Path, tmp_path: Path) -> None:
    """A user error ends every rank with exit code 2 and one line naming it (no traceback, no hang)."""
    config = tiny_config(workspace, "pretrain", "zero3", tmp_path / "out")
    config["data"]["train"][0]["path"] = str(tmp_path / "missing.json")
    cfg = write_config(tmp_path, "pretrain", config)
    _, output = launch(["--module", "llava_train.train", str(cfg)], cwd=tmp_path, expect_rc=2)
    assert f"llava-train: error: data.train[0].path: data source not found: {tmp_path / 'missing.json'}" in output
    assert "Traceback" not in output


def test_lora_zero3_checkpoints_resume_and_merge(workspace: Path, tmp_path: Path) -> None:
    """LoRA under ZeRO-3 on 2 ranks: every adapter checkpoint carries the projector exactly as the gathered model
    holds it, resuming from a checkpoint continues the loss sequence, and merge-lora gives a plain HF folder."""
    import shutil

    from safetensors.torch import load_file

    def lora_config(out: Path, **train: Any) -> dict[str, Any]:
        config = tiny_config(workspace, "finetune", "zero3", out, init_from=None)
        config["model"].pop("init_from")
        config["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
        config["train"].update(save_strategy="steps", save_steps=3, **train)
        return config

    full = tmp_path / "full"
    launch(["--module", "llava_train.train", str(write_config(tmp_path, "full", lora_config(full)))], cwd=tmp_path)
    for step in (3, 6):
        ckpt = full / f"checkpoint-{step}"
        adapter = load_file(str(ckpt / "adapter_model.safetensors"))
        gathered_projector = load_file(str(ckpt / "projector.safetensors"))
        in_adapter = {
            k.split("multi_modal_projector.")[-1].removeprefix("modules_to_save.default."): v
            for k, v in adapter.items()
            if "multi_modal_projector" in k
        }
        assert sorted(in_adapter) == sorted(gathered_projector), step
        for name, value in gathered_projector.items():
            assert in_adapter[name].numpy().tobytes() == value.numpy().tobytes(), (step, name)
    cut = tmp_path / "cut"
    shutil.copytree(full / "checkpoint-3", cut / "checkpoint-3")
    resumed = lora_config(cut, resume_from_checkpoint="auto")
    launch(["--module", "llava_train.train", str(write_config(tmp_path, "resume", resumed))], cwd=tmp_path)
    full_losses, resumed_losses = logged_losses(full), logged_losses(cut)
    assert len(full_losses) == 6 and len(resumed_losses) == 3
    assert resumed_losses == pytest.approx(full_losses[3:], rel=1e-5)

    from transformers import AutoModelForImageTextToText

    from llava_train.training.lora_merge import merge_lora

    merged = Path(merge_lora(full, tmp_path / "merged"))
    model = AutoModelForImageTextToText.from_pretrained(str(merged))
    assert not any("lora_" in n for n, _ in model.named_parameters())
    final_projector = load_file(str(full / "projector.safetensors"))
    for name, value in final_projector.items():
        assert torch_equal(model.model.multi_modal_projector.state_dict()[name], value), name


def torch_equal(a: Any, b: Any) -> bool:
    import torch

    return bool(torch.equal(a, b.to(a.dtype)))


# ---------------------------------------------------------------------------------------------
# Run-safety drills on 2 ranks (tests/fault_runner.py injects the fault; the product code is unchanged).

FAULT_RUNNER = REPO / "tests" / "fault_runner.py"


def drill_config(workspace: Path, zero: str, out: Path, **train: Any) -> dict[str, Any]:
    """Stage 2 from the base models, 6 steps, 1 sample per rank (text-only and image micro-batches mixed)."""
    config = tiny_config(workspace, "finetune", zero, out, init_from=None)
    config["model"].pop("init_from")
    config["train"].update(train)
    return config


def test_sigterm_to_one_rank_saves_on_both_exits_3_and_resumes_exactly(workspace: Path, tmp_path: Path) -> None:
    """SIGTERM reaches rank 1 only (after step 2): both ranks save checkpoint-3 and exit 3; resume=auto continues
    the uninterrupted 2-rank ZeRO-3 run's losses exactly."""
    from llava_train.run_files import PREEMPTED_FILE
    from llava_train.training.resume import complete_checkpoints

    ref = tmp_path / "reference"
    launch(
        ["--module", "llava_train.train", str(write_config(tmp_path, "ref", drill_config(workspace, "zero3", ref)))],
        cwd=tmp_path,
    )
    out = tmp_path / "preempted"
    cfg = write_config(tmp_path, "run", drill_config(workspace, "zero3", out, resume_from_checkpoint="auto"))
    _, output = launch([str(FAULT_RUNNER), "sigterm", "2", "1", str(cfg)], cwd=tmp_path, expect_rc=3)
    assert "SIGTERM received" in output and "llava-train: preempted: checkpoint-3 saved" in output
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-3"]
    shards = sorted(p.name for p in (out / "checkpoint-3").rglob("*_optim_states.pt"))
    assert len(shards) == 2, shards  # both ranks' ZeRO-3 partitions are in the checkpoint
    assert (out / PREEMPTED_FILE).is_file() and not (out / "model.safetensors").exists()
    launch(["--module", "llava_train.train", str(cfg)], cwd=tmp_path)
    assert logged_losses(out) == pytest.approx(logged_losses(ref), rel=1e-5)
    assert not (out / PREEMPTED_FILE).exists()


def test_nan_on_one_rank_is_skipped_on_both(workspace: Path, tmp_path: Path) -> None:
    """A NaN loss on rank 1 only (step 3) under ZeRO-2 with nan_policy=skip: both ranks skip that step."""
    out = tmp_path / "nan"
    cfg = write_config(tmp_path, "nan", drill_config(workspace, "zero2", out, nan_policy="skip"))
    _, output = launch([str(FAULT_RUNNER), "nan", "2", "1", str(cfg)], cwd=tmp_path)
    assert output.count("skipped step 3 on every rank") == 2, output[-3000:]  # rank 0 and rank 1 both say so
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows if "loss" in r] == [0, 0, 1, 1, 1, 1]
    assert_loads_in_transformers(out)


def test_zero2_resume_continues_the_loss_sequence_exactly(workspace: Path, tmp_path: Path) -> None:
    import shutil

    full = tmp_path / "full"
    cfg = drill_config(workspace, "zero2", full, save_strategy="steps", save_steps=3)
    launch(["--module", "llava_train.train", str(write_config(tmp_path, "full", cfg))], cwd=tmp_path)
    cut = tmp_path / "cut"
    shutil.copytree(full / "checkpoint-3", cut / "checkpoint-3")  # kill -9 right after the checkpoint
    resumed = drill_config(workspace, "zero2", cut, save_strategy="steps", save_steps=3, resume_from_checkpoint="auto")
    launch(["--module", "llava_train.train", str(write_config(tmp_path, "cut", resumed))], cwd=tmp_path)
    assert logged_losses(cut) == pytest.approx(logged_losses(full)[3:], rel=1e-5)


DEAD_RANK_BOUND_S = 60


def test_a_dead_rank_ends_the_survivor_within_the_bound(workspace: Path, tmp_path: Path) -> None:
    """No launcher to clean up: rank 1 is SIGKILLed after step 2 and rank 0, waiting in the next collective,
    exits non-zero by itself (gloo sees the closed connection) within DEAD_RANK_BOUND_S seconds."""
    cfg = write_config(tmp_path, "dead", drill_config(workspace, "zero2", tmp_path / "dead"))
    port = str(_free_port())
    procs = []
    for r in (0, 1):
        env = {**_env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "PYTHONPATH": str(REPO / "tests")}  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, str(FAULT_RUNNER), "sigkill", "2", "1", str(cfg)],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
        )
    survivor, victim = procs
    try:
        assert victim.wait(timeout=LAUNCH_TIMEOUT) == -9
        died = time.monotonic()
        try:
            code = survivor.wait(timeout=DEAD_RANK_BOUND_S)
        except subprocess.TimeoutExpired:
            survivor.kill()
            pytest.fail(f"rank 0 still running {DEAD_RANK_BOUND_S}s after rank 1 died")
    finally:
        for segment in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            segment.unlink(missing_ok=True)  # the SIGKILLed rank's workspace: it cannot remove it itself
    waited = time.monotonic() - died
    output = survivor.stdout.read()
    assert code != 0, output[-3000:]
    print(f"survivor exited {code} {waited:.1f}s after its peer died")
