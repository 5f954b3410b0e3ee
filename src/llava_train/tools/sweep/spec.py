"""Sweeps in wandb's YAML format: parse and validate the file, and plan grid/random trials.

The same file drives `wandb sweep FILE` + `wandb agent` (the agent runs `command`, replacing
`${args}` with `--key=value` flags that `llava_train.train` reads as dotted overrides) and
`llava-train sweep FILE` (`tools.sweep.run`: each trial a subprocess, a summary table at the end).
Must not import torch: the runner only starts processes.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llava_train.config_io import safe_load_no_alias

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
        data = safe_load_no_alias(p.read_text(), str(p))
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
