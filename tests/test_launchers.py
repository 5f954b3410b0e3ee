"""Tests for the launch scripts and launcher configs: the exact command each prints and runs (stubbed launchers)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


def _run(script: str, args: list[str], env: dict[str, str], bin_dir: Path) -> list[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("NUM_GPUS", "MASTER_PORT", "CONFIG", "MASTER_ADDR")}
    full_env.update(env)
    full_env["PATH"] = f"{bin_dir}{os.pathsep}{full_env['PATH']}"
    full_env["PYTHON"] = sys.executable  # the SLURM scripts read the run folder with the venv's python
    proc = subprocess.run(
        ["bash", str(REPO / script), *args], env=full_env, capture_output=True, text=True, timeout=30, check=True
    )
    return proc.stdout.splitlines()


@pytest.fixture
def stub_bin(tmp_path: Path) -> Path:
    # Each stub prints its name and one argument per line, so quoting is checked exactly.
    for name in ("deepspeed", "srun", "torchrun"):
        _stub(tmp_path, name, f'echo "{name} called"; for a in "$@"; do echo "arg:$a"; done')
    _stub(tmp_path, "scontrol", 'printf "gpu-node-07\\ngpu-node-08\\n"')
    return tmp_path


@pytest.mark.parametrize("name", ["pretrain", "finetune", "finetune_lora"])
def test_single_node_scripts_default_command(name: str, stub_bin: Path) -> None:
    out = _run(f"scripts/{name}.sh", [], {}, stub_bin)
    config = f"configs/llava-1.5-7b/{name}.yaml"
    assert out[0] == f"+ deepspeed --num_gpus 8 --master_port 29500 --module llava_train.train {config}"
    assert out[1:] == [
        "deepspeed called",
        "arg:--num_gpus",
        "arg:8",
        "arg:--master_port",
        "arg:29500",
        "arg:--module",
        "arg:llava_train.train",
        f"arg:{config}",
    ]
    assert (REPO / config).is_file()


def test_variables_and_overrides_pass_through(stub_bin: Path) -> None:
    env = {"NUM_GPUS": "2", "MASTER_PORT": "29611", "CONFIG": "configs/llava-1.5-13b/finetune.yaml"}
    out = _run("scripts/finetune.sh", ["train.per_device_train_batch_size=4", "wandb.name=a b"], env, stub_bin)
    assert out[-3:] == [
        "arg:configs/llava-1.5-13b/finetune.yaml",
        "arg:train.per_device_train_batch_size=4",
        "arg:wandb.name=a b",
    ]
    assert out[2:6] == ["arg:--num_gpus", "arg:2", "arg:--master_port", "arg:29611"]


def test_multinode_reads_master_from_hostfile(stub_bin: Path, tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# nodes\nnode-a slots=8\nnode-b slots=8\n")
    out = _run("scripts/multinode.sh", ["x=1"], {"HOSTFILE": str(hostfile)}, stub_bin)
    assert out[0] == (
        f"+ deepspeed --hostfile {hostfile} --master_addr node-a --master_port 29500 --module llava_train.train "
        "configs/llava-1.5-7b/finetune.yaml x=1"
    )


@pytest.mark.parametrize("name", ["pretrain", "finetune"])
def test_slurm_script_starts_torchrun_per_node_with_rendezvous(name: str, stub_bin: Path) -> None:
    env = {
        "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "4242",
        "SLURM_GPUS_ON_NODE": "8",
    }
    out = _run(f"scripts/slurm/{name}.sbatch", ["train.gradient_accumulation_steps=2"], env, stub_bin)
    config = f"configs/llava-1.5-7b/{name}.yaml"
    assert out[0] == (
        '+ srun bash -c trap "" USR1; exec "$0" "$@" torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d '
        f"--rdzv_endpoint gpu-node-07:29500 --rdzv_id 4242 -m llava_train.train {config} "
        "train.resume_from_checkpoint=auto train.gradient_accumulation_steps=2"
    )
    assert out[1:6] == [
        "srun called",
        "arg:--kill-on-bad-exit=1",
        "arg:bash",
        "arg:-c",
        'arg:trap "" USR1; exec "$0" "$@"',
    ]
    assert out[6] == "arg:torchrun"


def test_slurm_script_requeues_a_preempted_run(stub_bin: Path, tmp_path: Path) -> None:
    """The ranks left the preempted marker in the run folder: the script asks SLURM to requeue the job."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "llava_train_preempted.json").write_text("{}")
    _stub(stub_bin, "scontrol", 'if [ "$1" = requeue ]; then echo "requeue $2"; else printf "node-1\\n"; fi')
    env = {"SLURM_JOB_NODELIST": "node-1", "SLURM_NNODES": "1", "SLURM_JOB_ID": "77", "SLURM_GPUS_ON_NODE": "8"}
    out = _run("scripts/slurm/finetune.sbatch", [f"train.output_dir={run_dir}"], env, stub_bin)
    assert out[-2:] == [f"preempted: a complete checkpoint is in {run_dir}; requeueing job 77", "requeue 77"]


@pytest.mark.parametrize("zero", [2, 3])
def test_accelerate_configs_load_and_point_at_our_json(zero: int) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    path = REPO / "configs" / "accelerate" / f"deepspeed_zero{zero}.yaml"
    config = load_config_from_file(str(path))
    assert (str(config.distributed_type), config.num_processes) == ("DistributedType.DEEPSPEED", 8)
    ds = config.deepspeed_config
    assert ds["deepspeed_config_file"] == f"configs/deepspeed/zero{zero}.json"
    assert (REPO / ds["deepspeed_config_file"]).is_file()
    assert ds["zero3_init_flag"] is (zero == 3)
    # accelerate refuses precision/accumulation keys beside a deepspeed_config_file.
    assert "mixed_precision" not in yaml.safe_load(path.read_text())


def test_hostfile_example_lines() -> None:
    lines = [ln for ln in (REPO / "configs" / "hostfile.example").read_text().splitlines() if not ln.startswith("#")]
    assert lines == ["node-001 slots=8", "node-002 slots=8"]
