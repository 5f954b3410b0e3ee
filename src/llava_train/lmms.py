"""lmms-eval as a client (design principle 11): the command that evaluates one HF-native folder in a separate
process, that process's environment, its results JSON, and the record each evaluated folder keeps.

No torch import: the training callback (`training.lmms_callback`) and `llava-train lmms-eval` share it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_train.run_files import LMMS_PENDING_FILE, LMMS_RESULT_FILE

# Written next to an evaluated folder's `hf/` (in `checkpoint-N/`): the scores, or the error, of its evaluation.
# Written when a checkpoint is queued, removed when its record exists: rotation keeps such a folder, and a
# resumed run re-launches its eval (the process evaluating it died with the run).
# lmms-eval's own output folder (`--output_path`: results JSON, per-sample answers) inside the evaluated folder.
METRIC_PREFIX = "lmms_eval"
# What torchrun / deepspeed / accelerate / MPI launchers set: left in place, lmms-eval's Accelerator would try to
# join the training job's process group (and wait forever for ranks that never come).
DIST_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CROSS_RANK",
    "CROSS_SIZE",
    "LOCAL_SIZE",
)
DIST_PREFIXES = ("TORCHELASTIC_", "ACCELERATE_", "OMPI_COMM_WORLD_", "PMI_", "MV2_COMM_WORLD_")
# Runs first in the eval process, then execs lmms-eval: on Linux it asks for SIGTERM when the training process
# dies (a kill -9 would otherwise leave lmms-eval holding its GPU while the resumed run starts another), and exits
# at once when that process is already gone. Not `preexec_fn`: unsafe in a process with threads.
DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit('the training process is gone')\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class LmmsEvalError(RuntimeError):
    """An evaluation produced no scores (lmms-eval failed, timed out, or left a task out of its results)."""


@dataclass(frozen=True)
class LmmsRequest:
    """One lmms-eval invocation's settings (`eval:` of the run config, or the offline command's flags).

    tasks: lmms-eval task names. include_path: folder of extra task YAMLs. limit: documents per task.
    model_args: extra `llava_hf` model args (`key=value,...`). python: interpreter with lmms-eval.
    devices: CUDA_VISIBLE_DEVICES of the process (None = inherited). cuda: the eval process may use CUDA;
    False adds `device=cpu,device_map=cpu` (lmms-eval's llava_hf defaults to cuda).
    """

    tasks: tuple[str, ...]
    include_path: str | None = None
    limit: int | None = None
    model_args: str = ""
    python: str | None = None
    devices: str | None = None
    cuda: bool = False

    @classmethod
    def from_config(cls, cfg: Any, cuda: bool) -> LmmsRequest:
        """From a RunConfig's `eval:` section (an `EvalConfig`)."""
        e = cfg.eval
        return cls(
            tuple(e.lmms_tasks),
            e.lmms_include_path,
            e.lmms_limit,
            e.lmms_model_args,
            e.lmms_python,
            e.lmms_devices,
            cuda,
        )


def model_args(folder: str | os.PathLike, request: LmmsRequest) -> str:
    """`--model_args` for lmms-eval's `llava_hf`: the folder, CPU placement without CUDA, then the user's args."""
    parts = [f"pretrained={Path(folder).resolve()}"]
    if not request.cuda and "device" not in request.model_args:
        parts.append("device=cpu,device_map=cpu")
    if request.model_args:
        parts.append(request.model_args)
    return ",".join(parts)


def build_command(folder: str | os.PathLike, request: LmmsRequest, output_dir: str | os.PathLike) -> list[str]:
    """`python -m lmms_eval ...` evaluating the HF-native `folder` with `llava_hf`, batch size 1, samples logged."""
    cmd = [request.python or sys.executable, "-m", "lmms_eval", "--model", "llava_hf"]
    cmd += ["--model_args", model_args(folder, request), "--tasks", ",".join(request.tasks)]
    cmd += ["--batch_size", "1", "--output_path", str(output_dir), "--log_samples"]
    if request.include_path:
        cmd += ["--include_path", str(Path(request.include_path).resolve())]
    if request.limit is not None:
        cmd += ["--limit", str(request.limit)]
    return cmd


def eval_env(base: Mapping[str, str], devices: str | None) -> dict[str, str]:
    """The eval process's environment: `base` without the launcher's distributed variables, offline hub access
    kept as the user set it, and CUDA_VISIBLE_DEVICES when `devices` is given."""
    env = {k: v for k, v in base.items() if k not in DIST_VARS and not k.startswith(DIST_PREFIXES)}
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def read_results(
    output_dir: str | os.PathLike, tasks: tuple[str, ...] | list[str], since: float = 0.0
) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from the newest `*_results.json` under lmms-eval's `--output_path` (written at or
    after `since`, a time.time(): an older file is an earlier run's, e.g. one a killed training run left).

    lmms-eval writes `results[task]["<metric>,<filter>"]` (filter `none` unless the task sets one) beside
    `<metric>_stderr,<filter>` and an `alias`; it exits 0 even when a task fails, so a task missing here is an
    error. Metric names keep a filter other than `none` (`acc,flexible` -> `acc/flexible`).
    """
    found = sorted(Path(output_dir).rglob("*_results.json"), key=lambda p: p.stat().st_mtime)
    found = [p for p in found if p.stat().st_mtime >= since]
    if not found:
        raise LmmsEvalError(f"lmms-eval wrote no *_results.json under {output_dir}")
    results = json.loads(found[-1].read_text()).get("results", {})
    out: dict[str, dict[str, float]] = {}
    for task in tasks:
        if task not in results:
            raise LmmsEvalError(f"task {task} is not in lmms-eval's results ({found[-1]}): it failed or is unknown")
        scores: dict[str, float] = {}
        for key, value in results[task].items():
            metric, _, filt = key.partition(",")
            if not filt or "_stderr" in metric or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            scores[metric if filt == "none" else f"{metric}/{filt}"] = float(value)
        out[task] = scores
    return out


def flat_metrics(scores: Mapping[str, Mapping[str, float]]) -> dict[str, float | None]:
    """`lmms_eval/<task>/<metric>` -> value (non-finite as None, as metrics.jsonl writes it)."""
    return {
        f"{METRIC_PREFIX}/{task}/{metric}": value if math.isfinite(value) else None
        for task, metrics in scores.items()
        for metric, value in metrics.items()
    }


def evaluate_folder(
    folder: str | os.PathLike,
    request: LmmsRequest,
    output_dir: str | os.PathLike,
    timeout: float | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    env: Mapping[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    """Run lmms-eval on `folder` and return its scores; its log goes to `<output_dir>/lmms_eval.log`.

    Raises LmmsEvalError when it exits non-zero, runs past `timeout` seconds or `should_stop()` turns true
    (the process is killed then), or its results JSON lacks a task.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cmd = build_command(folder, request, out)
    cmd = [cmd[0], "-c", DIE_WITH_PARENT, str(os.getpid()), *cmd]
    log_path = out / "lmms_eval.log"
    start, started_at = time.monotonic(), time.time() - 1.0  # 1 s: coarse file-system timestamps
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=eval_env(os.environ if env is None else env, request.devices),
        )
        while proc.poll() is None:
            if should_stop() or (timeout is not None and time.monotonic() - start > timeout):
                proc.kill()
                proc.wait()
                raise LmmsEvalError(f"lmms-eval on {folder} was stopped after {time.monotonic() - start:.0f} s")
            time.sleep(0.2)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise LmmsEvalError(f"lmms-eval exited {proc.returncode} on {folder}; {log_path} ends: {' | '.join(tail)}")
    return read_results(out, request.tasks, since=started_at)


def write_record(
    folder: str | os.PathLike, step: int | None, scores: Mapping[str, Any] | None, error: str | None
) -> Path:
    """Write `<folder>/lmms_eval.json` (atomically) and drop the pending mark: the folder is evaluated."""
    folder = Path(folder)
    record = {"step": step, "scores": dict(scores or {}), "error": error}
    tmp = folder / f".{LMMS_RESULT_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, folder / LMMS_RESULT_FILE)
    (folder / LMMS_PENDING_FILE).unlink(missing_ok=True)
    return folder / LMMS_RESULT_FILE


def read_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The folder's `lmms_eval.json` (None when it was never evaluated)."""
    path = Path(folder) / LMMS_RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def is_pending(folder: str | os.PathLike) -> bool:
    """Whether the folder was queued for evaluation and has no record yet (rotation must keep it)."""
    return (Path(folder) / LMMS_PENDING_FILE).is_file() and not (Path(folder) / LMMS_RESULT_FILE).is_file()
