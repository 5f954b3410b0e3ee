"""Running a sweep locally: the agent's command for each trial, one subprocess per trial, the summary table."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_train.config_io import ConfigError, split_override
from llava_train.run_files import METRICS_FILENAME
from llava_train.tools.sweep.spec import (
    MACROS,
    SweepError,
    SweepSpec,
    format_value,
    load_sweep,
    plan_trials,
    trial_name,
    varying_keys,
)
from llava_train.utils.logging import get_logger

log = get_logger(__name__)

TRIAL_LOG = "sweep_trial.log"
_ENVVAR = re.compile(r"\$\{envvar:([A-Z0-9_]*)\}")


def expand_command(
    spec: SweepSpec,
    params: Mapping[str, Any],
    interpreter: str = "python",
    launcher: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """The argv the wandb agent would run for `params`, optionally through a launcher.

    Whole-token macros: `${env}` (dropped: we pass the environment directly), `${interpreter}`,
    `${program}`, `${args}` (`--key=value`), `${args_no_hyphens}` (`key=value`), `${args_json}`;
    `${envvar:NAME}` inside a token is replaced by the variable. With a launcher (e.g.
    `["deepspeed", "--num_gpus", "2"]` or `["torchrun", "--nproc_per_node", "2"]`), `${interpreter}`
    is replaced by the launcher; deepspeed spells `-m` as `--module`.
    """
    env = os.environ if environ is None else environ
    flags = [f"{k}={format_value(v)}" for k, v in params.items()]
    launch = list(launcher or [])
    macros: dict[str, list[str]] = {
        "env": [],
        "interpreter": launch or [interpreter],
        "program": [spec.program],
        "args": ["--" + f for f in flags],
        "args_no_hyphens": flags,
        "args_json": [json.dumps(dict(params))],
    }
    out: list[str] = []
    for token in spec.command:
        if token.startswith("${") and token.endswith("}") and not token.startswith("${envvar:"):
            name = token[2:-1]
            if name not in macros:
                raise SweepError(
                    f"command macro {token} is not supported; valid macros: "
                    f"{', '.join('${' + m + '}' for m in MACROS)}"
                )
            out += macros[name]
        else:
            out.append(_ENVVAR.sub(lambda m: env.get(m.group(1), m.group(1)), token))
    if launch and Path(launch[0]).name == "deepspeed":
        out = ["--module" if t == "-m" else t for t in out]
    return out


def agent_args_to_overrides(argv: Sequence[str]) -> list[str]:
    """Map agent flags (`--train.learning_rate=0.0001`) onto our dotted overrides (`train.learning_rate=0.0001`).

    Parameter names are config keys, so the mapping is the identity on the key; `key=value` without
    hyphens passes through. A flag without `=` is an error (wandb always passes `--key=value`).
    """
    out = []
    for arg in argv:
        try:
            key, raw = split_override(arg)
        except ConfigError as e:
            raise SweepError(
                f"sweep argument {arg!r} must look like --key=value (e.g. --train.learning_rate=1e-4)"
            ) from e
        out.append(f"{key}={raw}")
    return out


def jsonl_key(metric_name: str) -> str:
    """Our metrics.jsonl key for a metric named as wandb shows it (HF's WandbCallback adds train/ eval/ prefixes)."""
    for prefix, repl in (("train/", ""), ("eval/", "eval_"), ("test/", "test_")):
        if metric_name.startswith(prefix):
            return repl + metric_name[len(prefix) :]
    return metric_name


def read_final_metric(run_dir: str | os.PathLike, metric_name: str) -> float | None:
    """The last logged value of the metric in `<run_dir>/metrics.jsonl` (None if absent)."""
    path = Path(run_dir) / METRICS_FILENAME
    if not path.is_file():
        return None
    keys = (metric_name, jsonl_key(metric_name))
    value = None
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        for key in keys:
            if record.get(key) is not None:
                value = float(record[key])
                break
    return value


@dataclass
class Trial:
    """One trial of a local sweep: its parameters, folder, command and outcome."""

    name: str
    params: dict[str, Any]
    run_dir: str
    command: list[str]
    status: str = "planned"
    metric: float | None = None
    returncode: int | None = None


@dataclass
class SweepSummary:
    """What `run_local_sweep` did: the trials and the summary files (None on a dry run)."""

    spec: SweepSpec
    sweep_dir: str
    trials: list[Trial] = field(default_factory=list)
    csv_path: str | None = None
    md_path: str | None = None

    def best(self) -> Trial | None:
        """The finished trial with the best metric for the sweep's goal."""
        done = [t for t in self.trials if t.metric is not None and math.isfinite(t.metric)]
        if not done:
            return None
        sign = 1 if self.spec.metric["goal"] == "minimize" else -1
        return min(done, key=lambda t: sign * t.metric)


def _metric_text(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def write_summary(summary: SweepSummary) -> tuple[Path, Path]:
    """Write `summary.csv` and `summary.md` (trial, status, varying parameters, final metric, run folder)."""
    out = Path(summary.sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = varying_keys(summary.spec)
    constants = {k: p["value"] for k, p in summary.spec.parameters.items() if k not in keys}
    metric = summary.spec.metric["name"]
    header = ["trial", "status", *keys, metric, "run_dir"]
    rows = [
        [t.name, t.status, *[format_value(t.params[k]) for k in keys], _metric_text(t.metric), t.run_dir]
        for t in summary.trials
    ]
    csv_path = out / "summary.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    best = summary.best()
    lines = [
        f"# Sweep {summary.spec.name}",
        "",
        f"method: {summary.spec.method}; metric: {metric} ({summary.spec.metric['goal']}); "
        f"best: {best.name if best else 'none'}",
        "",
        *([f"fixed: {', '.join(f'{k}={format_value(v)}' for k, v in constants.items())}", ""] if constants else []),
        "| " + " | ".join(header[:-1]) + " |",
        "|" + "---|" * (len(header) - 1),
        *["| " + " | ".join(r[:-1]) + " |" for r in rows],
        "",
    ]
    md_path = out / "summary.md"
    md_path.write_text("\n".join(lines))
    return csv_path, md_path


def run_local_sweep(
    path: str | os.PathLike,
    dry_run: bool = False,
    max_runs: int | None = None,
    launcher: list[str] | None = None,
    sweep_dir: str | os.PathLike | None = None,
    seed: int = 0,
    extra_overrides: Sequence[str] = (),
    interpreter: str = sys.executable,
    env: Mapping[str, str] | None = None,
) -> SweepSummary:
    """Run a grid or random sweep file locally, one subprocess per trial, and write the summary.

    Each trial runs the file's `command` with its parameters plus `extra_overrides` and
    `train.output_dir=<sweep_dir>/<trial name>` as `${args}` (so `python -m llava_train.train CONFIG
    --k=v ... --train.output_dir=...`), optionally through `launcher`. Its output goes to
    `<run folder>/sweep_trial.log`; the final metric is read from `<run folder>/metrics.jsonl`.
    A failing trial is recorded and the sweep goes on. `summary.csv` and `summary.md` are written to
    the sweep folder (default `runs/sweeps/<sweep name>`) after every trial.

    dry_run: plan and log the commands only (nothing is run or written).
    """
    spec = load_sweep(path)
    root = Path(sweep_dir) if sweep_dir is not None else Path("runs") / "sweeps" / spec.name
    summary = SweepSummary(spec=spec, sweep_dir=str(root))
    extra = agent_args_to_overrides(list(extra_overrides))
    varying = varying_keys(spec)
    for i, params in enumerate(plan_trials(spec, max_runs, seed)):
        name = trial_name(i, {k: params[k] for k in varying})
        run_dir = root / name
        args = {**params, **dict(split_override(o) for o in extra), "train.output_dir": str(run_dir)}
        command = expand_command(spec, args, interpreter=interpreter, launcher=launcher, environ=env)
        summary.trials.append(Trial(name=name, params=dict(params), run_dir=str(run_dir), command=command))
    for trial in summary.trials:
        log.info("sweep %s: %s", trial.name, shlex.join(trial.command))
    if dry_run:
        for trial in summary.trials:
            trial.status = "dry-run"
        return summary
    for trial in summary.trials:
        Path(trial.run_dir).mkdir(parents=True, exist_ok=True)
        with (Path(trial.run_dir) / TRIAL_LOG).open("w") as out:
            proc = subprocess.run(
                trial.command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(os.environ if env is None else env),
                check=False,
            )
        trial.returncode = proc.returncode
        trial.metric = read_final_metric(trial.run_dir, spec.metric["name"])
        if proc.returncode != 0:
            trial.status = f"failed (exit {proc.returncode})"
        else:
            trial.status = "ok" if trial.metric is not None else "no metric"
        log.info("sweep %s: %s, %s = %s", trial.name, trial.status, spec.metric["name"], _metric_text(trial.metric))
        csv_path, md_path = write_summary(summary)
        summary.csv_path, summary.md_path = str(csv_path), str(md_path)
    return summary
