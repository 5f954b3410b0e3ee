"""Training entry point: `python -m llava_train.train CONFIG.yaml [key=value ...]` (what deepspeed/torchrun launch).

The training stack is imported at the top: this module is what a launched rank runs. `llava-train --help` stays
fast because `cli.py` imports this module only inside the `train` command.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainingArguments, set_seed

from llava_train.components import Components, load_components
from llava_train.config import RunConfig, dump_config, load_config
from llava_train.config_fsdp import load_fsdp_settings
from llava_train.config_io import ConfigError, sweep_run_output_dir
from llava_train.data.dataset import build_dataset
from llava_train.data.scan_cache import data_cache_dir
from llava_train.errors import (
    EXIT_ERROR,
    EXIT_NONFINITE,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_USER_ERROR,
    CheckpointWriteError,
    user_errors,
)
from llava_train.preflight import check_paths
from llava_train.run_files import CONFIG_FILENAME, DATA_SUMMARY_FILENAME, PREEMPTED_FILE
from llava_train.stages import get_stage
from llava_train.training.assembly import assemble_trainer, prepare_model
from llava_train.training.checkpoint import LoraNewlineResumeCallback
from llava_train.training.checkpoint import save_final as write_final
from llava_train.training.fsdp import activate_fsdp, fsdp_training_kwargs
from llava_train.training.precision import PrecisionPolicy, resolve_precision
from llava_train.training.resume import newest_complete_checkpoint
from llava_train.training.resume import resolve_resume as newest_resume
from llava_train.training.safety import NonFiniteStepError, SafetyCallback
from llava_train.training.wandb_logging import wandb_env
from llava_train.utils.attention import sdpa_backends
from llava_train.utils.distributed import (
    exit_after_teardown,
    full_numel,
    has_accelerator,
    prepare_distributed,
    shutdown_distributed,
    uses_deepspeed,
)
from llava_train.utils.logging import get_logger, is_main_process

log = get_logger(__name__)


# `train.` keys that llava-train reads itself (documented in RunConfig), never passed to TrainingArguments.
LLAVA_TRAIN_KEYS = ("resume_from_checkpoint", "nan_policy", "max_skipped_steps", "export_hf", "fsdp")


@dataclass
class TrainResult:
    """What a run produced; `preempted`: stopped by SIGTERM/SIGUSR1 after saving a checkpoint (no final save)."""

    output_dir: str
    global_step: int
    log_history: list[dict[str, Any]]
    preempted: bool = False


def run(cfg: RunConfig) -> TrainResult:
    """Run one stage. Reads as the table of contents of a training run."""
    check_paths(cfg)  # a missing data path or model folder is a one-line error before anything loads
    out = prepare_run_dir(cfg)
    args = build_training_arguments(cfg)  # before the model: under ZeRO-3 it enables zero.Init
    policy = precision_policy(cfg, args)  # a precision set-up that cannot train right stops here, before any load
    setup_fsdp(cfg, args, policy)  # train.fsdp: accelerate's FSDP2 with the policy's MixedPrecisionPolicy
    seed_everything(args)
    parts = build_components(cfg)
    model = prepare_model(parts.model, cfg, policy)  # LoRA, the stage's trainable set, fp32 masters, compile
    train_ds, eval_ds = build_data(cfg, parts, args)
    trainer = build_trainer(cfg, args, model, parts, train_ds, eval_ds)
    resume = resolve_resume(cfg, out)
    log.info("training: %d samples, resume from %s", len(train_ds), resume or "scratch")
    if resume and cfg.lora.enabled and cfg.model.arch != "llava":
        trainer.add_callback(LoraNewlineResumeCallback(model, resume))
    preempted = train_steps(cfg, trainer, resume)
    if not preempted:
        write_final(cfg, trainer, parts.processor)
    return TrainResult(str(out), int(trainer.state.global_step), list(trainer.state.log_history), preempted)


@dataclass
class Teardown:
    """Set by `execute` when it destroyed this process's process groups: `main` then ends the process itself."""

    groups_destroyed: bool = False


def execute(cfg: RunConfig, teardown: Teardown | None = None) -> TrainResult:
    """`run(cfg)` as the last thing a launched process does: then its process groups are torn down.

    Every rank of a distributed run ends through `utils.distributed.shutdown_distributed` (a barrier
    after success, then every process group destroyed), so a finished run exits 0 instead of racing
    gloo/NCCL teardown at interpreter exit. In-process callers that train several stages in one
    process (tests, the demo) call `run` instead.
    """
    ok = False
    try:
        result = run(cfg)
        ok = True
        return result
    finally:
        if shutdown_distributed(ok):
            if teardown is not None:
                teardown.groups_destroyed = True
            log.info("process group destroyed (%s)", "run finished" if ok else "run failed")


# -- steps ------------------------------------------------------------------------------------


def prepare_run_dir(cfg: RunConfig) -> Path:
    """Create the run folder and write the resolved config there."""
    out = Path(cfg.output_dir)
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / CONFIG_FILENAME)
        (out / PREEMPTED_FILE).unlink(missing_ok=True)  # this run picks up where a preempted one stopped
    log.info("run folder %s (stage %s)", out, cfg.stage)
    return out


def build_training_arguments(cfg: RunConfig) -> TrainingArguments:
    """TrainingArguments from `train:` untouched, plus what our runs need (distributed set-up, wandb env)."""
    # llava-train's own `train.` keys are not TrainingArguments fields; save_total_limit is applied by
    # our checkpoint callback, after a new checkpoint is complete (HF deleted the old one first).
    kwargs = {k: v for k, v in cfg.train.items() if k not in LLAVA_TRAIN_KEYS}
    kwargs["save_total_limit"] = None
    # Our collator consumes dataset columns the model does not take (ids, num_images); keep them.
    kwargs.setdefault("remove_unused_columns", False)
    kwargs.setdefault("report_to", [])
    wandb_env(cfg)
    fsdp = cfg.train.get("fsdp")
    if fsdp:
        kwargs = fsdp_training_kwargs(load_fsdp_settings(fsdp), kwargs)
    kwargs = prepare_distributed(kwargs, fsdp=bool(fsdp))
    try:
        args = TrainingArguments(**kwargs)
    except TypeError as e:
        raise ConfigError(f"train: {e}") from e
    log.info("training arguments ready (world size %d, deepspeed %s)", args.world_size, bool(args.deepspeed))
    return args


def precision_policy(cfg: RunConfig, args: TrainingArguments) -> PrecisionPolicy:
    """Frozen parameters in `model.dtype`, trainable ones in fp32 masters (ours, or DeepSpeed's under DeepSpeed)."""
    ds = args.deepspeed
    return resolve_precision(cfg, ds, uses_deepspeed({"deepspeed": ds}), on_cpu=not has_accelerator())


def setup_fsdp(cfg: RunConfig, args: TrainingArguments, policy: PrecisionPolicy) -> None:
    """Under `train.fsdp`, make accelerate's state an FSDP2 one (before the Trainer exists); a no-op otherwise."""
    if cfg.train.get("fsdp"):
        activate_fsdp(load_fsdp_settings(cfg.train["fsdp"]), policy, args)
        log.info("engine: FSDP2 (world size %d)", args.world_size)


def seed_everything(args: TrainingArguments) -> None:
    """Seed before the model exists: the projector (and any new embedding rows) start from random init."""
    set_seed(args.seed)
    log.info("seed %d", args.seed)


def build_components(cfg: RunConfig) -> Components:
    """Tokenizer, template, processor, image facts and the model (from the base models, or `model.init_from`)."""
    parts = load_components(cfg)
    # ZeRO-3 partitions parameters at construction: count their full sizes, not the local shards.
    log.info("model built: %s params", f"{sum(full_numel(p) for p in parts.model.parameters()):,}")
    return parts


def build_data(cfg: RunConfig, parts: Components, args: TrainingArguments) -> tuple[Any, Any]:
    """Training (and optional eval) datasets with exact lengths, scanned once per node and cached.

    The local main process of each node scans first and writes the cache; the other ranks wait at
    HF's `main_process_first` barrier and then read it (with `data.cache_dir: null` they rescan).
    """
    seed = args.data_seed if args.data_seed is not None else args.seed
    cache = data_cache_dir(cfg)
    pairs = get_stage(cfg.stage).preference  # rows are preference pairs (stage dpo)
    with args.main_process_first(local=True, desc="data scan"):
        train_ds = build_dataset(cfg.data, parts, seed=seed, split="train", cache_dir=cache, preference=pairs)
        eval_ds = (
            build_dataset(cfg.data, parts, seed=seed, split="eval", cache_dir=cache, preference=pairs)
            if cfg.data.eval
            else None
        )
    if is_main_process():
        (Path(cfg.output_dir) / DATA_SUMMARY_FILENAME).write_text(json.dumps(train_ds.summary(), indent=2))
    log.info(
        "data: %d train samples, %s eval samples, image tokens %s",
        len(train_ds),
        len(eval_ds) if eval_ds is not None else 0,
        parts.geometry.describe(),
    )
    return train_ds, eval_ds


def build_trainer(
    cfg: RunConfig, args: TrainingArguments, model: Any, parts: Components, train_ds: Any, eval_ds: Any
) -> Any:
    """LLaVATrainer with our collator, sampler, lr groups and callbacks: the one assembly (`training.assembly`)."""
    return assemble_trainer(
        cfg, args, model, train_ds, eval_ds, pad_token_id=parts.tokenizer.pad_token_id, processor=parts.processor
    )


def resolve_resume(cfg: RunConfig, out: Path) -> str | None:
    """The checkpoint to resume from (`train.resume_from_checkpoint`), complete ones only."""
    return newest_resume(cfg, out)


def train_steps(cfg: RunConfig, trainer: Any, resume: str | None) -> bool:
    """HF's training loop; True when a preemption signal stopped it (after its checkpoint was saved).

    A checkpoint write that runs out of disk is reported with the last complete checkpoint (untouched).
    """
    try:
        with sdpa_backends(cfg.perf.sdpa_backends):
            trainer.train(resume_from_checkpoint=resume)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        last, _ = newest_complete_checkpoint(cfg.output_dir)
        raise CheckpointWriteError(
            f"out of disk space while writing to {cfg.output_dir} ({e}); the last complete checkpoint, "
            f"{last or 'none yet'}, is intact: free space and resume with train.resume_from_checkpoint=auto"
        ) from e
    safety = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SafetyCallback))
    return safety.preempted_at is not None


def main(argv: list[str] | None = None) -> int:
    """`python -m llava_train.train CONFIG.yaml [key=value | --key=value ...]`.

    Exit codes (`llava_train.errors`): 0 trained and saved, 1 unexpected error, 2 configuration or data
    error, 3 preempted (checkpoint saved), 4 non-finite loss or gradients.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher appends --local_rank=N; the environment already carries it.
    argv = [a for a in argv if not a.startswith("--local_rank")]
    if not argv or argv[0] in ("-h", "--help"):
        print(main.__doc__)
        return EXIT_OK if argv else EXIT_USER_ERROR
    config_path, overrides = (
        (argv[0], argv[1:]) if not argv[0].startswith("-") and "=" not in argv[0] else (None, argv)
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    teardown = Teardown()
    code = _main(config_path, overrides, teardown)
    if teardown.groups_destroyed:
        exit_after_teardown(code)  # a launched rank: the documented code, never a finalization abort
    return code


def _main(config_path: str | None, overrides: list[str], teardown: Teardown) -> int:
    try:
        cfg = load_config(config_path, overrides)
        # Under a wandb sweep agent every trial runs this same command: give each its own folder.
        cfg.train["output_dir"] = sweep_run_output_dir(cfg.output_dir)
        result = execute(cfg, teardown)
    except Exception as e:
        if isinstance(e, NonFiniteStepError):
            print(f"llava-train: stopped: {e}", file=sys.stderr)
            return EXIT_NONFINITE
        if not isinstance(e, user_errors()):
            if teardown.groups_destroyed:
                traceback.print_exc()
                return EXIT_ERROR
            raise  # traceback, exit code 1
        print(f"llava-train: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    if result.preempted:
        print(
            f"llava-train: preempted: checkpoint-{result.global_step} saved; resume with "
            "train.resume_from_checkpoint=auto",
            file=sys.stderr,
        )
        return EXIT_PREEMPTED
    print(f"finished: {result.output_dir} (step {result.global_step})")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
