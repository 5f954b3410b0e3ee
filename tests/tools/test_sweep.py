"""Sweep files: wandb `command` expansion, override mapping, grid/random trials, and the local runner."""

from __future__ import annotations

import csv
import json
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from llava_train.config import load_config
from llava_train.config_io import sweep_run_output_dir
from llava_train.tools.sweep.run import (
    agent_args_to_overrides,
    expand_command,
    jsonl_key,
    read_final_metric,
    run_local_sweep,
)
from llava_train.tools.sweep.spec import (
    SweepError,
    grid_trials,
    load_sweep,
    parse_sweep,
    plan_trials,
    random_trials,
    trial_name,
)
from tiny_models import write_caption_data

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "configs" / "sweeps" / "lr_x_projector_lr.yaml"
TINY = REPO / "configs" / "sweeps" / "tiny_cpu.yaml"


def test_every_sweep_yaml_parses() -> None:
    files = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))
    assert [f.name for f in files] == ["lr_x_projector_lr.yaml", "tiny_cpu.yaml"]
    for f in files:
        spec = load_sweep(f)
        assert spec.program == "llava_train.train" and spec.method == "grid"


def test_example_command_expands_like_the_wandb_agent() -> None:
    spec = load_sweep(EXAMPLE)
    params = grid_trials(spec)[4]
    assert expand_command(spec, params, interpreter="python") == [
        "python",
        "-m",
        "llava_train.train",
        "configs/llava-1.5-7b/finetune.yaml",
        "--train.learning_rate=2e-05",
        "--optim.projector_lr=0.0001",
        "--train.max_steps=500",
        "--train.eval_strategy=steps",
        "--train.eval_steps=250",
        '--data.eval=[{"path": "data/llava_v1_5_heldout.json", "image_folder": "data"}]',
    ]


def test_agent_args_map_onto_our_config() -> None:
    spec = load_sweep(EXAMPLE)
    argv = expand_command(spec, grid_trials(spec)[4], interpreter="python")
    overrides = agent_args_to_overrides(argv[4:])
    assert overrides[:2] == ["train.learning_rate=2e-05", "optim.projector_lr=0.0001"]
    cfg = load_config(REPO / "configs" / "llava-1.5-7b" / "finetune.yaml", overrides)
    assert cfg.train["learning_rate"] == 2e-05 and cfg.optim.projector_lr == 1e-4
    assert cfg.train["max_steps"] == 500 and cfg.train["eval_strategy"] == "steps"
    assert cfg.data.eval[0].path == "data/llava_v1_5_heldout.json" and cfg.data.eval[0].image_folder == "data"
    # What the real agent passes for a Python value (str(value)) parses the same way.
    assert load_config(None, agent_args_to_overrides(["--train.learning_rate=1e-05"])).train["learning_rate"] == 1e-5
    with pytest.raises(SweepError, match=r"sweep argument '--bf16' must look like --key=value"):
        agent_args_to_overrides(["--bf16"])


def test_macros_no_hyphens_json_envvar_and_deepspeed_launcher() -> None:
    spec = parse_sweep(
        {
            "program": "llava_train.train",
            "method": "grid",
            "metric": {"name": "loss"},
            "parameters": {"train.seed": {"values": [1]}, "model.train_vision_tower": {"value": True}},
            "command": [
                "${env}",
                "${interpreter}",
                "-m",
                "${program}",
                "${envvar:CFG_DIR}/a.yaml",
                "${args_no_hyphens}",
                "${args_json}",
            ],
        }
    )
    params = grid_trials(spec)[0]
    assert expand_command(spec, params, interpreter="py", environ={"CFG_DIR": "configs"}) == [
        "py",
        "-m",
        "llava_train.train",
        "configs/a.yaml",
        "train.seed=1",
        "model.train_vision_tower=true",
        '{"train.seed": 1, "model.train_vision_tower": true}',
    ]
    assert expand_command(spec, params, launcher=["deepspeed", "--num_gpus", "2"], environ={})[:6] == [
        "deepspeed",
        "--num_gpus",
        "2",
        "--module",
        "llava_train.train",
        "CFG_DIR/a.yaml",
    ]
    assert expand_command(spec, params, launcher=["torchrun", "--nproc_per_node", "2"], environ={})[:5] == [
        "torchrun",
        "--nproc_per_node",
        "2",
        "-m",
        "llava_train.train",
    ]


def test_grid_order_and_trial_names() -> None:
    spec = load_sweep(TINY)
    trials = grid_trials(spec)
    assert [(t["train.learning_rate"], t["optim.projector_lr"]) for t in trials] == [
        (1e-3, 1e-3),
        (1e-3, 1e-2),
        (1e-2, 1e-3),
        (1e-2, 1e-2),
    ]
    assert all(t["train.max_steps"] == 4 for t in trials)
    assert trial_name(1, {"train.learning_rate": 1e-3, "optim.projector_lr": 1e-2}) == (
        "trial-001-learning_rate-0.001_projector_lr-0.01"
    )
    assert plan_trials(spec, max_runs=3) == trials[:3]


def random_spec(**extra: object) -> dict:
    return {
        "program": "p",
        "method": "random",
        "metric": {"name": "loss"},
        "command": ["${program}", "${args}"],
        "parameters": {
            "lr": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-3},
            "bs": {"values": [8, 16]},
            "steps": {"min": 1, "max": 3},
            "wd": {"min": 0.0, "max": 0.1},
        },
        **extra,
    }


def test_random_trials_are_seeded_and_in_range() -> None:
    spec = parse_sweep(random_spec())
    first = random_trials(spec, 20, seed=3)
    assert first == random_trials(spec, 20, seed=3) and first != random_trials(spec, 20, seed=4)
    for t in first:
        assert 1e-5 <= t["lr"] <= 1e-3 and t["bs"] in (8, 16) and t["steps"] in (1, 2, 3) and 0.0 <= t["wd"] <= 0.1
        assert isinstance(t["steps"], int)
    assert len({t["bs"] for t in first}) == 2 and len({t["steps"] for t in first}) == 3
    with pytest.raises(SweepError, match="a random sweep needs a number of runs"):
        plan_trials(spec)
    assert len(plan_trials(parse_sweep(random_spec(run_cap=5)))) == 5


def test_sweep_file_errors_list_valid_choices() -> None:
    with pytest.raises(SweepError, match=r"method='hyperband' is not valid; choose one of: grid, random, bayes"):
        parse_sweep({**random_spec(), "method": "hyperband"})
    with pytest.raises(SweepError, match=r"parameters.lr.distribution='beta' is not valid; choose one of: constant, "):
        parse_sweep({**random_spec(), "parameters": {"lr": {"distribution": "beta"}}})
    with pytest.raises(SweepError, match=r"unknown sweep key\(s\) config; valid keys: program, method, "):
        parse_sweep({**random_spec(), "config": "x.yaml"})
    with pytest.raises(SweepError, match=r"command must contain \$\{args\}"):
        parse_sweep({**random_spec(), "command": ["${program}"]})
    with pytest.raises(SweepError, match="needs the wandb sweep service"):
        plan_trials(parse_sweep({**random_spec(), "method": "bayes"}))
    with pytest.raises(SweepError, match="grid search needs discrete parameters; parameters.lr has distribution"):
        grid_trials(parse_sweep({**random_spec(), "method": "grid"}))


def test_metric_names_and_final_metric(tmp_path: Path) -> None:
    assert [jsonl_key(n) for n in ("eval/loss", "train/loss", "loss", "test/acc")] == [
        "eval_loss",
        "loss",
        "loss",
        "test_acc",
    ]
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 2, "loss": 2.0}\n{"step": 2, "eval_loss": 3.0}\n{"step": 4, "loss": 1.5}\n'
        '{"step": 4, "train_loss": 1.7, "train_runtime": 3.0}\n'
    )
    assert read_final_metric(tmp_path, "train/loss") == 1.5
    assert read_final_metric(tmp_path, "eval/loss") == 3.0
    assert read_final_metric(tmp_path, "train_loss") == 1.7
    assert read_final_metric(tmp_path / "missing", "loss") is None


def test_agent_run_folder_per_run() -> None:
    assert sweep_run_output_dir("runs/x", {"WANDB_SWEEP_ID": "s1", "WANDB_RUN_ID": "abc"}) == "runs/x/abc"
    assert sweep_run_output_dir("runs/x", {"WANDB_RUN_ID": "abc"}) == "runs/x"


FAKE_PROGRAM = '''\
"""Stands in for llava_train.train: writes metrics.jsonl with loss = 1000 * lr + 10 * projector_lr."""
import json, sys
from pathlib import Path

args = dict(a[2:].split("=", 1) for a in sys.argv[2:])
assert sys.argv[1] == "base.yaml", sys.argv
lr, plr = float(args["train.learning_rate"]), float(args["optim.projector_lr"])
if args.get("fail_when") == str(lr):
    sys.exit(3)
out = Path(args["train.output_dir"])
out.mkdir(parents=True, exist_ok=True)
with (out / "metrics.jsonl").open("w") as f:
    f.write(json.dumps({"step": 2, "loss": 9.0}) + "\\n")
    f.write(json.dumps({"step": 4, "loss": 1000 * lr + 10 * plr}) + "\\n")
'''


def write_fake_sweep(tmp_path: Path, extra_params: dict | None = None) -> Path:
    (tmp_path / "fake_train.py").write_text(FAKE_PROGRAM)
    sweep = {
        "program": str(tmp_path / "fake_train.py"),
        "method": "grid",
        "metric": {"name": "train/loss", "goal": "minimize"},
        "parameters": {
            "train.learning_rate": {"values": [1e-3, 2e-3]},
            "optim.projector_lr": {"values": [0.1, 0.2]},
            **(extra_params or {}),
        },
        "command": ["${env}", "${interpreter}", "${program}", "base.yaml", "${args}"],
    }
    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def test_local_runner_on_fake_program_writes_summary(tmp_path: Path) -> None:
    path = write_fake_sweep(tmp_path, {"fail_when": {"value": "0.002"}})
    sweep_dir = tmp_path / "sweep"
    summary = run_local_sweep(path, sweep_dir=sweep_dir, extra_overrides=["train.seed=7"])
    names = [
        "trial-000-learning_rate-0.001_projector_lr-0.1",
        "trial-001-learning_rate-0.001_projector_lr-0.2",
        "trial-002-learning_rate-0.002_projector_lr-0.1",
        "trial-003-learning_rate-0.002_projector_lr-0.2",
    ]
    assert [t.name for t in summary.trials] == names
    assert [t.status for t in summary.trials] == ["ok", "ok", "failed (exit 3)", "failed (exit 3)"]
    assert [t.metric for t in summary.trials] == [pytest.approx(2.0), pytest.approx(3.0), None, None]
    assert summary.best().name == names[0]
    assert summary.trials[0].command[-1] == f"--train.output_dir={sweep_dir / names[0]}"
    assert "--train.seed=7" in summary.trials[0].command
    with open(sweep_dir / "summary.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["trial", "status", "train.learning_rate", "optim.projector_lr", "train/loss", "run_dir"]
    assert rows[1] == [names[0], "ok", "0.001", "0.1", "2", str(sweep_dir / names[0])]
    assert rows[3] == [names[2], "failed (exit 3)", "0.002", "0.1", "", str(sweep_dir / names[2])]
    assert (sweep_dir / "summary.md").read_text() == textwrap.dedent(f"""\
        # Sweep fake

        method: grid; metric: train/loss (minimize); best: {names[0]}

        fixed: fail_when=0.002

        | trial | status | train.learning_rate | optim.projector_lr | train/loss |
        |---|---|---|---|---|
        | {names[0]} | ok | 0.001 | 0.1 | 2 |
        | {names[1]} | ok | 0.001 | 0.2 | 3 |
        | {names[2]} | failed (exit 3) | 0.002 | 0.1 |  |
        | {names[3]} | failed (exit 3) | 0.002 | 0.2 |  |
        """)
    assert (sweep_dir / names[2] / "sweep_trial.log").is_file()


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    summary = run_local_sweep(write_fake_sweep(tmp_path), dry_run=True, max_runs=2, sweep_dir=tmp_path / "s")
    assert [t.status for t in summary.trials] == ["dry-run", "dry-run"]
    assert summary.trials[0].command[:3] == [sys.executable, str(tmp_path / "fake_train.py"), "base.yaml"]
    assert not (tmp_path / "s").exists() and summary.csv_path is None


@pytest.mark.slow
def test_tiny_cpu_sweep_end_to_end(tmp_path: Path) -> None:
    """configs/sweeps/tiny_cpu.yaml: a 2 x 2 grid of real tiny stage-1 runs through `python -m llava_train.train`."""
    source = write_caption_data(tmp_path / "data")
    overrides = [
        f"model.language_model={tmp_path / 'models' / 'lm'}",
        f"model.vision_tower={tmp_path / 'models' / 'vision'}",
        f"data.train=[{json.dumps(source)}]",
    ]
    # The sweep file names the config relative to the repository; run it from anywhere.
    sweep_path = tmp_path / "tiny_cpu.yaml"
    sweep_path.write_text(
        TINY.read_text().replace("configs/demo/pretrain.yaml", str(REPO / "configs" / "demo" / "pretrain.yaml"))
    )
    summary = run_local_sweep(sweep_path, sweep_dir=tmp_path / "sweep", extra_overrides=overrides)
    failed = [Path(t.run_dir, "sweep_trial.log").read_text()[-3000:] for t in summary.trials if t.status != "ok"]
    assert [t.status for t in summary.trials] == ["ok"] * 4, failed
    assert all(t.metric is not None and t.metric > 0 for t in summary.trials)
    for t in summary.trials:
        records = [json.loads(line) for line in Path(t.run_dir, "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "loss" in r] == [2, 4]
    with open(tmp_path / "sweep" / "summary.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 5 and rows[0][:4] == ["trial", "status", "train.learning_rate", "optim.projector_lr"]
    print((tmp_path / "sweep" / "summary.md").read_text())
