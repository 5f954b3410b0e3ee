"""A plain `pip install .` (not editable): the package carries everything its commands read (the demo's YAMLs)."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from tiny_models import write_caption_data

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)


def test_wheel_install_runs_the_demo_help_and_the_data_commands(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, REPO])
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("llava_train-*.whl")
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", venv]).returncode == 0
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    # The dependencies come from this environment: a .pth line adds its site-packages to sys.path without
    # running that folder's own .pth files, so its editable llava_train is not importable in the new venv.
    (site / "deps_from_dev_env.pth").write_text(sysconfig.get_path("purelib") + "\n")
    installed = _run([venv / "bin" / "pip", "install", "--no-deps", "--no-index", "-q", wheel])
    assert installed.returncode == 0, installed.stderr[-3000:]
    where = _run([venv / "bin" / "python", "-c", "import llava_train; print(llava_train.__file__)"])
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    demo = _run([venv / "bin" / "llava-train", "demo", "--help"])
    assert demo.returncode == 0 and "--workdir" in demo.stdout, demo.stderr[-2000:]
    configs = _run(
        [
            venv / "bin" / "python",
            "-c",
            "from llava_train.tools.demo.run import stage_config; "
            "print(stage_config('finetune', __import__('pathlib').Path('w')).data.template)",
        ]
    )
    # The last line: importing transformers' Trainer prints "[INFO] Running in WANDB offline mode" under WANDB_MODE.
    assert configs.stdout.strip().splitlines()[-1] == "vicuna_v1", configs.stdout + configs.stderr[-2000:]

    source = write_caption_data(tmp_path / "data", n=4)
    cfg = {
        "stage": "pretrain",
        "model": {"language_model": str(tmp_path / "lm"), "vision_tower": str(tmp_path / "vision"), "preset": "tiny"},
        "data": {"train": [source], "model_max_length": 64},
        "train": {"output_dir": str(tmp_path / "run")},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    validated = _run([venv / "bin" / "llava-train", "data", "validate", path, "--workers", "1"], cwd=tmp_path)
    assert validated.returncode == 0 and "no bad rows in 4 rows" in validated.stdout, validated.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["template"] == "plain"  # the stage's own template
    inspected = _run([venv / "bin" / "llava-train", "data", "inspect", path, "--color", "never"], cwd=tmp_path)
    assert inspected.returncode == 0 and "<image x16>" in inspected.stdout, inspected.stderr[-3000:]
