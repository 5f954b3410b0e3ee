"""Training entry point: `python -m llava_train.train CONFIG.yaml [key=value ...]` (what deepspeed/torchrun launch)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llava_train.config import CONFIG_FILENAME, RunConfig, dump_config, load_config
from llava_train.config_io import ConfigError, sweep_run_output_dir
from llava_train.errors import EXIT_ERROR, EXIT_NONFINITE, EXIT_OK, EXIT_PREEMPTED, EXIT_USER_ERROR, user_errors
from llava_train.preflight import check_paths
from llava_train.training.precision import PrecisionPolicy, apply_precision, resolve_precision
from llava_train.utils.logging import get_logger, is_main_process

log = get_logger(__name__)


# `train.` keys that llava-train reads itself (documented in RunConfig), never passed to TrainingArguments.
LLAVA_TRAIN_KEYS = ("resume_from_checkpoint", "nan_policy", "max_skipped_steps", "export_hf")


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
    seed_everything(args)
    parts = build_components(cfg)
    model = apply_adapters(parts.model, cfg)
    apply_stage_to_model(model, cfg)
    apply_precision(model, policy)  # after the stage: trainable weights become fp32 masters, the policy is logged
    if cfg.perf.compile:
        from llava_train.training.compile import compile_regions

        compile_regions(model, cfg.perf.compile_options)
    train_ds, eval_ds = build_data(cfg, parts, args)
    trainer = build_trainer(cfg, args, model, parts, train_ds, eval_ds)
    resume = resolve_resume(cfg, out)
    log.info("training: %d samples, resume from %s", len(train_ds), resume or "scratch")
    if resume and cfg.lora.enabled and cfg.model.arch != "llava":
        from llava_train.training.checkpoint import LoraNewlineResumeCallback

        trainer.add_callback(LoraNewlineResumeCallback(model, resume))
    preempted = train_steps(cfg, trainer, resume)
    if not preempted:
        save_final(cfg, trainer, parts.processor)
    return TrainResult(str(out), int(trainer.state.global_step), list(trainer.state.log_history), preempted)


# Set when `execute` tore down this process's process groups: `main` then ends the process itself.
_GROUPS_DESTROYED = False


def execute(cfg: RunConfig) -> TrainResult:
    """`run(cfg)` as the last thing a launched process does: then its process groups are torn down.

    Every rank of a distributed run ends through `utils.distributed.shutdown_distributed` (a barrier
    after success, then every process group destroyed), so a finished run exits 0 instead of racing
    gloo/NCCL teardown at interpreter exit. In-process callers that train several stages in one
    process (tests, the demo) call `run` instead.
    """
    from llava_train.utils.distributed import shutdown_distributed

    global _GROUPS_DESTROYED
    ok = False
    try:
        result = run(cfg)
        ok = True
        return result
    finally:
        if shutdown_distributed(ok):
            _GROUPS_DESTROYED = True
            log.info("process group destroyed (%s)", "run finished" if ok else "run failed")


# -- steps ------------------------------------------------------------------------------------


def prepare_run_dir(cfg: RunConfig) -> Path:
    """Create the run folder and write the resolved config there."""
    from llava_train.training.safety import PREEMPTED_FILE

    out = Path(cfg.output_dir)
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / CONFIG_FILENAME)
        (out / PREEMPTED_FILE).unlink(missing_ok=True)  # this run picks up where a preempted one stopped
    log.info("run folder %s (stage %s)", out, cfg.stage)
    return out


def build_training_arguments(cfg: RunConfig) -> Any:
    """TrainingArguments from `train:` untouched, plus what our runs need (distributed set-up, wandb env)."""
    from transformers import TrainingArguments

    from llava_train.training.wandb_logging import wandb_env
    from llava_train.utils.distributed import prepare_distributed

    # llava-train's own `train.` keys are not TrainingArguments fields; save_total_limit is applied by
    # our checkpoint callback, after a new checkpoint is complete (HF deleted the old one first).
    kwargs = {k: v for k, v in cfg.train.items() if k not in LLAVA_TRAIN_KEYS}
    kwargs["save_total_limit"] = None
    # Our collator consumes dataset columns the model does not take (ids, num_images); keep them.
    kwargs.setdefault("remove_unused_columns", False)
    kwargs.setdefault("report_to", [])
    wandb_env(cfg)
    kwargs = prepare_distributed(kwargs)
    try:
        args = TrainingArguments(**kwargs)
    except TypeError as e:
        raise ConfigError(f"train: {e}") from e
    log.info("training arguments ready (world size %d, deepspeed %s)", args.world_size, bool(args.deepspeed))
    return args


def seed_everything(args: Any) -> None:
    """Seed before the model exists: the projector (and any new embedding rows) start from random init."""
    from transformers import set_seed

    set_seed(args.seed)
    log.info("seed %d", args.seed)


def save_final(cfg: RunConfig, trainer: Any, processor: Any) -> None:
    """The final HF-native folder (`training.checkpoint.save_final`), in `model.dtype`."""
    from llava_train.training.checkpoint import save_final as write_final

    write_final(cfg, trainer, processor)


def resolve_resume(cfg: RunConfig, out: Path) -> str | None:
    """The checkpoint to resume from (`train.resume_from_checkpoint`), complete ones only."""
    from llava_train.training.resume import resolve_resume as newest

    return newest(cfg, out)


def train_steps(cfg: RunConfig, trainer: Any, resume: str | None) -> bool:
    """HF's training loop; True when a preemption signal stopped it (after its checkpoint was saved).

    A checkpoint write that runs out of disk is reported with the last complete checkpoint (untouched).
    """
    import errno

    from llava_train.training.checkpoint import CheckpointWriteError
    from llava_train.training.resume import newest_complete_checkpoint
    from llava_train.training.safety import SafetyCallback
    from llava_train.utils.attention import sdpa_backends

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


def build_components(cfg: RunConfig) -> Any:
    """Tokenizer, template, processor, image facts and the model (from the base models, or `model.init_from`)."""
    from llava_train.components import load_components
    from llava_train.utils.distributed import full_numel

    parts = load_components(cfg)
    # ZeRO-3 partitions parameters at construction: count their full sizes, not the local shards.
    log.info("model built: %s params", f"{sum(full_numel(p) for p in parts.model.parameters()):,}")
    return parts


def apply_adapters(model: Any, cfg: RunConfig) -> Any:
    """LoRA/QLoRA on the language model when enabled."""
    if not cfg.lora.enabled:
        return model
    from llava_train.model.lora import apply_lora

    model = apply_lora(model, cfg)
    log.info("LoRA applied: r=%d alpha=%d dropout=%g", cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout)
    return model


def apply_stage_to_model(model: Any, cfg: RunConfig) -> None:
    """Freeze/unfreeze module groups for the stage and log the parameter table."""
    from llava_train.stages import apply_stage

    apply_stage(model, cfg)


def precision_policy(cfg: RunConfig, args: Any) -> PrecisionPolicy:
    """Frozen parameters in `model.dtype`, trainable ones in fp32 masters (ours, or DeepSpeed's under DeepSpeed)."""
    from llava_train.utils.distributed import has_accelerator, uses_deepspeed

    ds = args.deepspeed
    return resolve_precision(cfg, ds, uses_deepspeed({"deepspeed": ds}), on_cpu=not has_accelerator())


def build_data(cfg: RunConfig, parts: Any, args: Any) -> tuple[Any, Any]:
    """Training (and optional eval) datasets with exact lengths, scanned once per node and cached.

    The local main process of each node scans first and writes the cache; the other ranks wait at
    HF's `main_process_first` barrier and then read it (with `data.cache_dir: null` they rescan).
    """
    from llava_train.data.dataset import build_dataset
    from llava_train.data.scan_cache import data_cache_dir

    seed = args.data_seed if args.data_seed is not None else args.seed
    cache = data_cache_dir(cfg)
    with args.main_process_first(local=True, desc="data scan"):
        train_ds = build_dataset(cfg.data, parts, seed=seed, split="train", cache_dir=cache)
        eval_ds = build_dataset(cfg.data, parts, seed=seed, split="eval", cache_dir=cache) if cfg.data.eval else None
    if is_main_process():
        (Path(cfg.output_dir) / "data_summary.json").write_text(json.dumps(train_ds.summary(), indent=2))
    log.info(
        "data: %d train samples, %s eval samples, image tokens %s",
        len(train_ds),
        len(eval_ds) if eval_ds is not None else 0,
        parts.geometry.describe(),
    )
    return train_ds, eval_ds


def build_trainer(cfg: RunConfig, args: Any, model: Any, parts: Any, train_ds: Any, eval_ds: Any) -> Any:
    """LLaVATrainer with our collator, sampler, lr groups and callbacks."""
    from llava_train.data.collator import PaddingCollator
    from llava_train.data.packing import PackedRows, PackingCollator
    from llava_train.stages import get_stage
    from llava_train.training.callbacks import attach_callbacks, build_callbacks, wandb_enabled
    from llava_train.training.checkpoint import CheckpointArtifactsCallback, HFExport
    from llava_train.training.lmms_callback import build_lmms_callback
    from llava_train.training.metrics import ThroughputTracker
    from llava_train.training.predictions import eval_predictions_fn
    from llava_train.training.safety import SafetyCallback, StepGuard
    from llava_train.training.trainer import LLaVATrainer, LrCheckCallback

    tracker = ThroughputTracker.for_model(model, args)
    guard = StepGuard(cfg.train.get("nan_policy", "error"), cfg.train.get("max_skipped_steps", 10), cfg.output_dir)
    packing_length = (cfg.data.packing_length or cfg.data.model_max_length) if cfg.data.packing else None
    ov = cfg.model.arch == "llava_onevision"
    if packing_length:
        # Each item is a packed row of whole samples; per_device_train_batch_size counts rows.
        dataset, collator = PackedRows(train_ds), PackingCollator(parts.tokenizer.pad_token_id, batch_num_images=ov)
        log.info("packing samples into rows of %d tokens", packing_length)
    else:
        dataset, collator = train_ds, PaddingCollator(parts.tokenizer.pad_token_id, batch_num_images=ov)
    trainer = LLaVATrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_ds,
        data_collator=collator,
        processing_class=parts.processor,
        lr_overrides={"projector": cfg.optim.projector_lr, "vision_tower": cfg.optim.vision_tower_lr},
        modality_lengths=train_ds.modality_lengths,
        group_by_modality_length=cfg.data.group_by_modality_length and not packing_length,
        tracker=tracker,
        partial_checkpoints=get_stage(cfg.stage).checkpoints_are_partial(cfg),
        frozen_from={
            "language_model": cfg.model.language_model,
            "vision_tower": cfg.model.vision_tower,
            "init_from": cfg.model.init_from,
        },
        packing_length=packing_length,
        loss_on_trained_only=cfg.perf.loss_on_trained_only,
        loss_chunk_size=cfg.perf.loss_chunk_size,
        guard=guard,
        video_keepalive=train_ds.has_video or bool(eval_ds is not None and eval_ds.has_video),
    )
    config_yaml = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    trainer.add_callback(LrCheckCallback(trainer))
    # Asynchronous lmms-eval of every checkpoint reads its hf/ export (so eval.lmms_tasks turns the export on).
    lmms = build_lmms_callback(cfg, wandb_enabled(cfg.train.get("report_to")))
    wants_export = cfg.train.get("export_hf") or lmms is not None
    export = HFExport(parts.processor, cfg.model.dtype, cfg.lora.enabled) if wants_export else None
    limit = cfg.train.get("save_total_limit")
    step0 = lmms is not None and cfg.eval.lmms_eval_step0
    trainer.add_callback(CheckpointArtifactsCallback(model, config_yaml, limit, export, export_step0=step0))
    if lmms is not None:
        trainer.add_callback(lmms)  # after the checkpoint callback: a checkpoint is complete when it is queued
    # First of all callbacks (like the throughput one): `skipped_steps` must be in the logs HF's reporters see.
    trainer.callback_handler.callbacks.insert(0, SafetyCallback(guard))
    # Throughput keys must reach the logs before HF's reporters (wandb) see them.
    attach_callbacks(
        trainer,
        build_callbacks(
            cfg, tracker, data_report=train_ds.summary(), predictions_fn=eval_predictions_fn(cfg, parts.processor)
        ),
    )
    return trainer


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
    code = _main(config_path, overrides)
    if _GROUPS_DESTROYED:
        from llava_train.utils.distributed import exit_after_teardown

        exit_after_teardown(code)  # a launched rank: the documented code, never a finalization abort
    return code


def _main(config_path: str | None, overrides: list[str]) -> int:
    try:
        cfg = load_config(config_path, overrides)
        # Under a wandb sweep agent every trial runs this same command: give each its own folder.
        cfg.train["output_dir"] = sweep_run_output_dir(cfg.output_dir)
        result = execute(cfg)
    except Exception as e:
        from llava_train.training.safety import NonFiniteStepError

        if isinstance(e, NonFiniteStepError):
            print(f"llava-train: stopped: {e}", file=sys.stderr)
            return EXIT_NONFINITE
        if not isinstance(e, user_errors()):
            if _GROUPS_DESTROYED:
                import traceback

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
