"""The `eval:` section of a run config: benchmark scores of every checkpoint through lmms-eval (a separate process).

Like `config.py`, this module must not import torch or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llava_train.config_io import ConfigError

# How an eval is launched. Only a subprocess per checkpoint exists; lmms-eval's HTTP server and an sbatch job per
# checkpoint are not offered (any other value is a config error listing this one).
LMMS_BACKENDS = ("subprocess",)


@dataclass
class EvalConfig:
    """lmms-eval on every checkpoint while training runs (README "Benchmark curves during training").

    lmms_tasks: lmms-eval task names run on every checkpoint's `hf/` export (which they turn on); empty = off.
        Scores are logged as `lmms_eval/<task>/<metric>` against the checkpoint's step (metrics.jsonl, wandb)
        and written to `checkpoint-N/lmms_eval.json`. Stage-1 (`pretrain`) runs are not evaluated: their
        checkpoints are projector-only and their model answers in the `plain` template.
    lmms_include_path: folder of extra task YAMLs (lmms-eval's `--include_path`), e.g. the demo's
        `<workdir>/lmms_tasks` holding `llava_train_demo`.
    lmms_limit: evaluate only the first N documents of each task (`--limit`); null = all.
    lmms_model_args: extra `--model_args` of lmms-eval's `llava_hf` model as `key=value,...` (`pretrained` is
        the export; `device=cpu,device_map=cpu` is added when this machine has no CUDA).
    lmms_python: interpreter of the environment that has lmms-eval (`make lmms-eval-env` builds
        `.venv-lmms/bin/python`); null = the interpreter running training.
    lmms_backend: `subprocess` (the only backend): one `python -m lmms_eval` per checkpoint, started by rank 0
        with the launcher's distributed variables cleared, results harvested on a background thread.
    lmms_devices: CUDA_VISIBLE_DEVICES of the eval process (e.g. "7": a GPU training does not use; "" = CPU);
        null = inherited from the training process.
    lmms_eval_step0: also evaluate the starting model (exported to `<run>/step-0/hf`) before the first step.
    lmms_wait_timeout: seconds the end of training waits for pending evals; those still running are stopped and
        stay pending (a resumed run, or `llava-train lmms-eval RUN`, evaluates them).
    """

    lmms_tasks: list[str] = field(default_factory=list)
    lmms_include_path: str | None = None
    lmms_limit: int | None = None
    lmms_model_args: str = ""
    lmms_python: str | None = None
    lmms_backend: str = "subprocess"
    lmms_devices: str | None = None
    lmms_eval_step0: bool = False
    lmms_wait_timeout: float = 3600.0

    def __post_init__(self) -> None:
        # `eval.lmms_tasks=mme,pope` on the command line is lmms-eval's own comma-separated form.
        if isinstance(self.lmms_tasks, str):
            self.lmms_tasks = [self.lmms_tasks]
        bad = [t for t in self.lmms_tasks if not isinstance(t, str) or not t.strip(", ")]
        if bad:
            raise ConfigError(f"eval.lmms_tasks must be lmms-eval task names, got {bad!r}")
        self.lmms_tasks = [name.strip() for t in self.lmms_tasks for name in t.split(",") if name.strip()]
        if self.lmms_backend not in LMMS_BACKENDS:
            raise ConfigError(
                f"eval.lmms_backend={self.lmms_backend!r} is not valid; choose one of: {', '.join(LMMS_BACKENDS)}"
            )
        if self.lmms_limit is not None and self.lmms_limit <= 0:
            raise ConfigError(f"eval.lmms_limit must be > 0, got {self.lmms_limit}")
        if self.lmms_wait_timeout < 0:
            raise ConfigError(f"eval.lmms_wait_timeout must be >= 0, got {self.lmms_wait_timeout}")
        if "pretrained=" in self.lmms_model_args:
            raise ConfigError("eval.lmms_model_args must not set pretrained= (it is each checkpoint's hf/ export)")

    @property
    def enabled(self) -> bool:
        """Whether checkpoints are evaluated (any task named)."""
        return bool(self.lmms_tasks)
