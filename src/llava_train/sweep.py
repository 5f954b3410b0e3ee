"""Sweeps in wandb's YAML format: parse, expand the agent `command`, and run grid/random sweeps locally.

The same file drives `wandb sweep FILE` + `wandb agent` (the agent runs `command`, replacing
`${args}` with `--key=value` flags that `llava_train.train` reads as dotted overrides) and
`llava-train sweep FILE` (this module: each trial a subprocess, a summary table at the end).
Must not import torch: the runner only starts processes.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llava_train.utils.logging import get_logger

log = get_logger(__name__)

METHODS = ("grid", "random", "bayes")
LOCAL_METHODS = ("grid", "random")
GOALS = ("minimize", "maximize")
# Top-level keys of wandb's sweep schema that this module reads or tolerates.
SWEEP_KEYS = (
    "program",
    "method",
    "metric",
    "parameters",
    "command",
    "name",
    "description",
    "project",
    "entity",
    "early_terminate",
    "run_cap",
)
PARAMETER_KEYS = ("value", "values", "probabilities", "distribution", "min", "max", "mu", "sigma", "q")
MACROS = ("env", "interpreter", "program", "args", "args_no_hyphens", "args_json")
METRICS_FILENAME = "metrics.jsonl"
TRIAL_LOG = "sweep_trial.log"
_ENVVAR = re.compile(r"\$\{envvar:([A-Z0-9_]*)\}")


class SweepError(ValueError):
    """A sweep file problem the user must fix; the message names the key."""


def _uniform(rng: random.Random, p: Mapping[str, Any]) -> float:
    return rng.uniform(float(p["min"]), float(p["max"]))


def _q(value: float, p: Mapping[str, Any]) -> float:
    q = float(p.get("q", 1.0))
    return round(value / q) * q


# wandb's distributions: min/max are values for *_values, natural-log exponents for log_uniform.
DISTRIBUTIONS = {
    "constant": lambda rng, p: p["value"],
    "categorical": lambda rng, p: rng.choices(p["values"], weights=p.get("probabilities"))[0],
    "uniform": _uniform,
    "int_uniform": lambda rng, p: rng.randint(int(p["min"]), int(p["max"])),
    "q_uniform": lambda rng, p: _q(_uniform(rng, p), p),
    "log_uniform": lambda rng, p: math.exp(_uniform(rng, p)),
    "log_uniform_values": lambda rng, p: math.exp(rng.uniform(math.log(float(p["min"])), math.log(float(p["max"])))),
    "q_log_uniform_values": lambda rng, p: _q(
        math.exp(rng.uniform(math.log(float(p["min"])), math.log(float(p["max"])))), p
    ),
    "normal": lambda rng, p: rng.gauss(float(p.get("mu", 0.0)), float(p.get("sigma", 1.0))),
    "log_normal": lambda rng, p: math.exp(rng.gauss(float(p.get("mu", 0.0)), float(p.get("sigma", 1.0)))),
}


@dataclass(frozen=True)
class SweepSpec:
    """A parsed wandb sweep file.

    program: what `${program}` expands to (for us the module `llava_train.train`, run with `-m`).
    method: grid, random or bayes (bayes needs the wandb service).
    metric: {"name": ..., "goal": minimize|maximize}; wandb names (`eval/loss`, `train/loss`) or
        our JSONL keys (`eval_loss`, `loss`).
    parameters: parameter name (a dotted config key) -> wandb parameter spec.
    command: the agent command template with `${env}`, `${interpreter}`, `${program}`, `${args}`...
    name: sweep name (default: the file's stem).
    run_cap: the most trials (wandb's own key; `--max-runs` overrides it locally).
    """

    program: str
    method: str
    metric: dict[str, str]
    parameters: dict[str, dict[str, Any]]
    command: list[str]
    name: str
    run_cap: int | None = None


def parameter_kind(name: str, spec: Mapping[str, Any]) -> str:
    """The distribution of a parameter spec, inferred as wandb does when `distribution` is absent."""
    if not isinstance(spec, Mapping):
        raise SweepError(f"parameters.{name} must be a mapping like {{values: [...]}}, got {spec!r}")
    unknown = sorted(set(spec) - set(PARAMETER_KEYS))
    if unknown:
        raise SweepError(
            f"parameters.{name}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(PARAMETER_KEYS)}"
        )
    if "distribution" in spec:
        kind = spec["distribution"]
        if kind not in DISTRIBUTIONS:
            raise SweepError(
                f"parameters.{name}.distribution={kind!r} is not valid; choose one of: {', '.join(DISTRIBUTIONS)}"
            )
        return kind
    if "value" in spec:
        return "constant"
    if "values" in spec:
        return "categorical"
    if "min" in spec and "max" in spec:
        both_int = all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("min", "max"))
        return "int_uniform" if both_int else "uniform"
    raise SweepError(f"parameters.{name} needs `value`, `values`, or `min`/`max` (with an optional `distribution`)")


def parse_sweep(data: Mapping[str, Any], name: str = "sweep") -> SweepSpec:
    """Validate a sweep dict (as read from YAML) into a SweepSpec."""
    if not isinstance(data, Mapping):
        raise SweepError("a sweep file must hold a mapping at the top level")
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(f"unknown sweep key(s) {', '.join(unknown)}; valid keys: {', '.join(SWEEP_KEYS)}")
    method = data.get("method")
    if method not in METHODS:
        raise SweepError(f"method={method!r} is not valid; choose one of: {', '.join(METHODS)}")
    metric = dict(data.get("metric") or {})
    if "name" not in metric:
        raise SweepError("metric.name is required (e.g. metric: {name: eval/loss, goal: minimize})")
    metric.setdefault("goal", "minimize")
    if metric["goal"] not in GOALS:
        raise SweepError(f"metric.goal={metric['goal']!r} is not valid; choose one of: {', '.join(GOALS)}")
    params = data.get("parameters")
    if not isinstance(params, Mapping) or not params:
        raise SweepError("parameters must be a non-empty mapping of config keys to parameter specs")
    for key, spec in params.items():
        parameter_kind(key, spec)
    command = [str(c) for c in (data.get("command") or ["${env}", "${interpreter}", "${program}", "${args}"])]
    if not any(c in ("${args}", "${args_no_hyphens}") for c in command):
        raise SweepError(
            "command must contain ${args} (or ${args_no_hyphens}): that is where the trial's overrides go"
        )
    if "program" not in data:
        raise SweepError("program is required (e.g. program: llava_train.train, run with `-m ${program}`)")
    run_cap = data.get("run_cap")
    return SweepSpec(
        program=str(data["program"]),
        method=method,
        metric=metric,
        parameters={k: dict(v) for k, v in params.items()},
        command=command,
        name=str(data.get("name") or name),
        run_cap=int(run_cap) if run_cap is not None else None,
    )


def load_sweep(path: str | os.PathLike) -> SweepSpec:
    """Read and validate a sweep YAML file."""
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"sweep file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"sweep file {p} is not valid YAML: {e}") from e
    return parse_sweep(data, name=p.stem)


def format_value(value: Any) -> str:
    """A parameter value as our override parser reads it back (YAML: null, true/false, [..])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


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
        body = arg[2:] if arg.startswith("--") else arg
        if "=" not in body or not body.split("=", 1)[0]:
            raise SweepError(f"sweep argument {arg!r} must look like --key=value (e.g. --train.learning_rate=1e-4)")
        out.append(body)
    return out


def grid_trials(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every combination of the parameters' values, first parameter varying slowest (file order)."""
    axes = []
    for key, p in spec.parameters.items():
        kind = parameter_kind(key, p)
        if kind not in ("constant", "categorical"):
            raise SweepError(f"grid search needs discrete parameters; parameters.{key} has distribution {kind}")
        axes.append([p["value"]] if kind == "constant" else list(p["values"]))
    return [dict(zip(spec.parameters, combo)) for combo in itertools.product(*axes)]


def random_trials(spec: SweepSpec, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` independent draws from the parameters' distributions (reproducible for a seed)."""
    rng = random.Random(seed)
    return [{k: DISTRIBUTIONS[parameter_kind(k, p)](rng, p) for k, p in spec.parameters.items()} for _ in range(n)]


def plan_trials(spec: SweepSpec, max_runs: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The trials a local sweep runs: the grid (cut to max_runs) or max_runs / run_cap random draws."""
    if spec.method not in LOCAL_METHODS:
        raise SweepError(
            f"method {spec.method!r} needs the wandb sweep service (`wandb sweep` + `wandb agent`); "
            f"the local runner supports: {', '.join(LOCAL_METHODS)}"
        )
    cap = max_runs if max_runs is not None else spec.run_cap
    if spec.method == "grid":
        trials = grid_trials(spec)
        return trials if cap is None else trials[:cap]
    if cap is None:
        raise SweepError("a random sweep needs a number of runs: set `run_cap` in the file or pass --max-runs")
    return random_trials(spec, cap, seed)


def _short(value: Any) -> str:
    text = f"{value:.3g}" if isinstance(value, float) else format_value(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "", text)


def varying_keys(spec: SweepSpec) -> list[str]:
    """Parameters that differ between trials (everything but `value:` constants), in file order."""
    return [k for k, p in spec.parameters.items() if parameter_kind(k, p) != "constant"]


def trial_name(index: int, params: Mapping[str, Any], max_len: int = 80) -> str:
    """`trial-000-learning_rate-0.0001_projector_lr-0.001`: index, then last key part and value per parameter.

    Pass only the varying parameters (see `varying_keys`); the name is cut to max_len characters.
    """
    parts = [f"{k.split('.')[-1]}-{_short(v)}" for k, v in params.items()]
    return f"trial-{index:03d}-{'_'.join(parts)}"[:max_len]


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


def sweep_run_output_dir(output_dir: str, environ: Mapping[str, str] | None = None) -> str:
    """The run folder to use under a wandb agent: `<output_dir>/<WANDB_RUN_ID>` when WANDB_SWEEP_ID is set.

    Every agent trial runs the same command, so without this all trials would share one folder
    (wandb's `${envvar:...}` macros are expanded once per agent, not per run).
    """
    env = os.environ if environ is None else environ
    if env.get("WANDB_SWEEP_ID") and env.get("WANDB_RUN_ID"):
        return str(Path(output_dir) / env["WANDB_RUN_ID"])
    return output_dir


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
        args = {**params, **dict(o.split("=", 1) for o in extra), "train.output_dir": str(run_dir)}
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


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of `llava-train sweep` (the CLI adds them to its subparser)."""
    p = parser or argparse.ArgumentParser(prog="llava-train sweep", description=run_local_sweep.__doc__)
    p.add_argument("sweep", help="wandb sweep YAML (method grid or random)")
    p.add_argument("--dry-run", action="store_true", help="print the trial commands, run nothing")
    p.add_argument("--max-runs", type=int, default=None, help="at most N trials (random: exactly N)")
    p.add_argument("--launcher", default=None, help='run each trial through a launcher, e.g. "deepspeed --num_gpus 2"')
    p.add_argument("--sweep-dir", default=None, help="folder for trial run folders and the summary")
    p.add_argument("--seed", type=int, default=0, help="seed of the random method")
    p.add_argument("overrides", nargs="*", help="key=value overrides added to every trial")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`llava-train sweep SWEEP.yaml [--dry-run] [--max-runs N] [--launcher CMD] [key=value ...]`."""
    ns = build_parser().parse_args(argv)
    try:
        summary = run_local_sweep(
            ns.sweep,
            dry_run=ns.dry_run,
            max_runs=ns.max_runs,
            launcher=shlex.split(ns.launcher) if ns.launcher else None,
            sweep_dir=ns.sweep_dir,
            seed=ns.seed,
            extra_overrides=ns.overrides,
        )
    except SweepError as e:
        log.error("%s", e)
        return 2
    if ns.dry_run:
        for trial in summary.trials:
            print(shlex.join(trial.command))
        return 0
    if summary.md_path:
        print(Path(summary.md_path).read_text())
    return 0 if all(t.status == "ok" for t in summary.trials) else 1


if __name__ == "__main__":
    sys.exit(main())
