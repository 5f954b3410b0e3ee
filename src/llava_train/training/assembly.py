"""The one trainer assembly, shared by `train.run` and `llava-train bench`: the model's preparation (adapters, stage,
precision, compile), the batching (padded or packed collator), the trainer and its callbacks in their one
load-bearing order. A bench figure is therefore a training figure: same collator, sampler, loss and tracker.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from llava_train.config import RunConfig
from llava_train.data.collator import PaddingCollator
from llava_train.data.packing import PackedRows, PackingCollator
from llava_train.data.preference import PairCollator
from llava_train.model.freeze import apply_stage
from llava_train.model.lora import apply_lora
from llava_train.run_files import LOSS_PLOT_FILENAME, METRICS_FILENAME
from llava_train.stages import get_stage
from llava_train.training.callbacks import (
    LossPlotCallback,
    MetricsJsonlCallback,
    PredictionsFn,
    ThroughputCallback,
    wandb_enabled,
)
from llava_train.training.checkpoint import CheckpointArtifactsCallback, HFExport
from llava_train.training.compile import compile_regions
from llava_train.training.dpo import PreferenceTrainer, preference_trainer_kwargs
from llava_train.training.fsdp import set_wrap_classes
from llava_train.training.lmms_callback import build_lmms_callback
from llava_train.training.metrics import ThroughputTracker
from llava_train.training.precision import PrecisionPolicy, apply_precision
from llava_train.training.predictions import eval_predictions_fn
from llava_train.training.safety import SafetyCallback, StepGuard
from llava_train.training.trainer import LLaVATrainer, LrCheckCallback
from llava_train.training.wandb_logging import WandbExtrasCallback
from llava_train.utils.logging import get_logger

log = get_logger(__name__)


def prepare_model(model: Any, cfg: RunConfig, policy: PrecisionPolicy) -> Any:
    """LoRA adapters (when enabled), the stage's trainable set, the precision policy, regional compile; returns
    the model to train (the PeftModel with LoRA). The order matters: precision acts on what the stage trains."""
    if cfg.lora.enabled:
        model = apply_lora(model, cfg)
        log.info("LoRA applied: r=%d alpha=%d dropout=%g", cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout)
    apply_stage(model, cfg)
    apply_precision(model, policy)
    set_wrap_classes(model)  # FSDP2 runs: the per-layer units accelerate shards (a no-op otherwise)
    if cfg.perf.compile:
        compile_regions(model, cfg.perf.compile_options)
    return model


def build_callbacks(
    cfg: RunConfig,
    tracker: ThroughputTracker | None,
    data_report: dict[str, Any] | None = None,
    predictions_fn: PredictionsFn | None = None,
) -> list[TrainerCallback]:
    """The run-reporting callbacks for a RunConfig (`assemble_trainer` installs them in the run's order).

    [ThroughputCallback (if a tracker), MetricsJsonlCallback(<run>/metrics.jsonl),
    LossPlotCallback(<run>/loss.png), WandbExtrasCallback (if report_to includes wandb)].
    """
    out_dir = Path(cfg.output_dir)
    callbacks: list[TrainerCallback] = []
    if tracker is not None:
        callbacks.append(ThroughputCallback(tracker, every=cfg.metrics_every))
    callbacks.append(MetricsJsonlCallback(out_dir / METRICS_FILENAME))
    callbacks.append(LossPlotCallback(out_dir / LOSS_PLOT_FILENAME))
    if wandb_enabled(cfg.train.get("report_to")):
        predictions = predictions_fn if cfg.wandb.log_predictions > 0 else None
        callbacks.append(WandbExtrasCallback(cfg.to_dict(), data_report, predictions))
    return callbacks


@dataclass
class Batching:
    """What the trainer iterates: the dataset (packed rows or samples), its collator, the packed row length."""

    dataset: Any
    collator: Any
    packing_length: int | None


def batching(cfg: RunConfig, train_ds: Any, pad_token_id: int) -> Batching:
    """Padded micro-batches of samples, or (`data.packing`) packed rows of whole samples; `perf.static_shapes`
    pads every packed row to `packing_length` (one shape for the whole run)."""
    ov = cfg.model.arch == "llava_onevision"
    if get_stage(cfg.stage).preference:
        # An item is a whole pair: chosen and rejected stay in one micro-batch on one rank (no packing: RunConfig).
        return Batching(train_ds, PairCollator(pad_token_id, batch_num_images=ov), None)
    packing_length = (cfg.data.packing_length or cfg.data.model_max_length) if cfg.data.packing else None
    if packing_length:
        # Each item is a packed row of whole samples; per_device_train_batch_size counts rows.
        fixed = packing_length if cfg.perf.static_shapes else None
        collator = PackingCollator(pad_token_id, pad_to_multiple_of=fixed, batch_num_images=ov)
        log.info("packing samples into rows of %d tokens", packing_length)
        return Batching(PackedRows(train_ds), collator, packing_length)
    return Batching(train_ds, PaddingCollator(pad_token_id, batch_num_images=ov), None)


def assemble_trainer(
    cfg: RunConfig,
    args: Any,
    model: Any,
    train_ds: Any,
    eval_ds: Any,
    *,
    pad_token_id: int,
    processor: Any = None,
    trainer_cls: type[LLaVATrainer] = LLaVATrainer,
    extra_callbacks: tuple[TrainerCallback, ...] = (),
) -> LLaVATrainer:
    """LLaVATrainer with our collator, sampler, lr groups and callbacks, in the one order the run relies on.

    train_ds: a `data.dataset` dataset (or the bench's synthetic mix): `lengths`, `modality_lengths`,
        `summary()`, `has_video`. processor: saved with checkpoints and used for eval predictions (None:
        the bench). trainer_cls: a LLaVATrainer subclass (the bench adds a data-wait clock).
        extra_callbacks: added last (tools' own observers).
    """
    tracker = ThroughputTracker.for_model(model, args)
    guard = StepGuard(cfg.train.get("nan_policy", "error"), cfg.train.get("max_skipped_steps", 10), cfg.output_dir)
    batches = batching(cfg, train_ds, pad_token_id)
    extra: dict[str, Any] = {}
    if get_stage(cfg.stage).preference:
        extra = preference_trainer_kwargs(cfg, model)  # the frozen copy is taken before the trainer's hooks exist
        trainer_cls = PreferenceTrainer if trainer_cls is LLaVATrainer else trainer_cls
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=batches.dataset,
        eval_dataset=eval_ds,
        data_collator=batches.collator,
        processing_class=processor,
        lr_overrides={"projector": cfg.optim.projector_lr, "vision_tower": cfg.optim.vision_tower_lr},
        modality_lengths=train_ds.modality_lengths,
        group_by_modality_length=cfg.data.group_by_modality_length and not batches.packing_length,
        tracker=tracker,
        partial_checkpoints=get_stage(cfg.stage).checkpoints_are_partial(cfg),
        frozen_from={
            "language_model": cfg.model.language_model,
            "vision_tower": cfg.model.vision_tower,
            "init_from": cfg.model.init_from,
        },
        packing_length=batches.packing_length,
        loss_on_trained_only=cfg.perf.loss_on_trained_only,
        loss_chunk_size=cfg.perf.loss_chunk_size,
        guard=guard,
        video_keepalive=train_ds.has_video or bool(eval_ds is not None and eval_ds.has_video),
        **extra,
    )
    predictions_fn = None
    if processor is not None:
        predictions_fn = eval_predictions_fn(cfg, processor)
    reporting = build_callbacks(cfg, tracker, data_report=train_ds.summary(), predictions_fn=predictions_fn)
    # The one place the callback order is set. HF runs callbacks in list order with its reporters (wandb,
    # tensorboard) among its defaults, so the keys they must see come first: the throughput rates, then
    # `skipped_steps` (the safety guard's). Ours run after HF's: the lr check, checkpoint completion (marker,
    # rotation), the lmms-eval queue, metrics.jsonl, the loss plot, wandb extras, then the caller's.
    first = [c for c in reporting if isinstance(c, ThroughputCallback)] + [SafetyCallback(guard)]
    # Asynchronous lmms-eval of every checkpoint reads its hf/ export (so eval.lmms_tasks turns the export on).
    lmms = build_lmms_callback(cfg, wandb_enabled(cfg.train.get("report_to"))) if processor is not None else None
    export = None
    if (cfg.train.get("export_hf") or lmms is not None) and processor is not None:
        export = HFExport(processor, cfg.model.dtype, cfg.lora.enabled)
    step0 = lmms is not None and cfg.eval.lmms_eval_step0
    config_yaml = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    limit = cfg.train.get("save_total_limit")
    last = [
        LrCheckCallback(trainer),
        CheckpointArtifactsCallback(model, config_yaml, limit, export, export_step0=step0),
        *([lmms] if lmms is not None else []),  # after the checkpoint callback: a queued checkpoint is complete
        *(c for c in reporting if not isinstance(c, ThroughputCallback)),
        *extra_callbacks,
    ]
    handler = trainer.callback_handler
    # Our ThroughputCallback prints the compact line for each log; HF's printer/progress bar would print the raw
    # dict beside it (every log twice on the console).
    handler.remove_callback(PrinterCallback)
    if any(isinstance(c, ProgressCallback) for c in handler.callbacks):
        handler.remove_callback(ProgressCallback)
        handler.add_callback(QuietProgressCallback())
    handler.callbacks[:0] = first
    for callback in last:
        handler.add_callback(callback)
    return trainer


class QuietProgressCallback(ProgressCallback):
    """HF's progress bar without its raw log dict (the throughput callback prints the run's line)."""

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        return None
