"""Every write of a run: checkpoints (runtime-named weights, trainable-only for partial stages), the projector
artifact and config in each checkpoint, their optional HF-native export (`checkpoint-N/hf/`), and the final
HF-native folder (LoRA: adapter + merged model).

Checkpoints are written by HF Trainer's own checkpointing, which calls `LLaVATrainer.save_model` for a
`checkpoint-<step>` folder (that is where `save_checkpoint_weights` comes in) and fires `on_save`
(`CheckpointArtifactsCallback`); the final folder is `save_final`'s.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from llava_train.config import RunConfig, dump_config
from llava_train.lmms import is_pending
from llava_train.model.projector import load_projector, save_projector
from llava_train.model.serving import save_serving_files
from llava_train.run_files import (
    ADAPTER_DIR,
    CHECKPOINT_INFO,
    COMPLETE_MARKER,
    CONFIG_FILENAME,
    HF_EXPORT_DIR,
    PREEMPTED_FILE,
    PROJECTOR_FILE,
    STEP0_DIR,
    TRAINING_ARGS_JSON,
)
from llava_train.training.callbacks import optional_artifact
from llava_train.training.lora_merge import merge_lora
from llava_train.training.resume import complete_checkpoints
from llava_train.utils.distributed import barrier, full_tensor, gathered
from llava_train.utils.logging import get_logger, is_main_process
from llava_train.utils.modules import unwrap

log = get_logger(__name__)


def is_checkpoint_folder(path: str | os.PathLike, run_dir: str | os.PathLike) -> bool:
    """Whether `path` is one of the run's HF checkpoint folders (`<run_dir>/checkpoint-<step>`)."""
    p = Path(path)
    return p.parent.resolve() == Path(run_dir).resolve() and p.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-")


def runtime_state_dict(
    model: torch.nn.Module, trainable_only: bool, materialize: bool = True
) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters (all or trainable only, plus persistent buffers), keyed as in `state_dict()`.

    Gathered under ZeRO-3 and FSDP2 (every rank must call it then: the gather is collective); only a rank with
    `materialize` builds the copies, the others return {} (a 7B model is 14 GB per copy). Tied
    parameters appear once (safetensors refuses shared storage; the tie restores the other name on load).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only]
    out: dict[str, torch.Tensor] = {}
    with gathered([p for _, p in named], modifier_rank=None):  # read-only: no broadcast back
        for name, p in named:
            value = full_tensor(p.detach())  # FSDP2: all-gathered on every rank, in this same order
            if materialize:
                out[name] = value.to("cpu").clone().contiguous()
    if materialize and not trainable_only:
        persistent = set(model.state_dict())
        for name, b in model.named_buffers():
            if name in persistent:
                out[name] = b.detach().to("cpu").clone().contiguous()
    return out


def save_checkpoint_weights(
    model: torch.nn.Module, output_dir: str | os.PathLike, trainable_only: bool, frozen_from: dict[str, Any]
) -> int:
    """Write a checkpoint's `model.safetensors` in the model's runtime parameter names.

    Why not `save_pretrained`: transformers 5 writes LLaVA weights under its legacy key names
    (`language_model.model.*`), while `Trainer` resumes with a non-strict `load_state_dict` in
    runtime names (`model.language_model.*`), so a resumed run would silently keep its fresh
    weights. Runtime names load exactly. `trainable_only` (stage 1) stores just what trains (tens of
    MB for 7B instead of 14 GB); the frozen rest is rebuilt from the named base models. Only rank 0
    copies and writes; returns the number of tensors this rank wrote (0 elsewhere).
    """
    state = runtime_state_dict(model, trainable_only, materialize=is_main_process())
    if not is_main_process():
        return 0
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    kind = "trainable-only" if trainable_only else "full"
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "llava_train": kind})
    model.config.save_pretrained(out)
    info = {
        "kind": kind,
        "num_tensors": len(state),
        "num_params": int(sum(t.numel() for t in state.values())),
        "frozen_from": frozen_from if trainable_only else None,
    }
    (out / CHECKPOINT_INFO).write_text(json.dumps(info, indent=2))
    return len(state)


@dataclass(frozen=True)
class HFExport:
    """What a checkpoint's `hf/` export needs besides the model (`train.export_hf: true`).

    processor: the run's processor (saved through `model.serving`: left padding, end-of-turn eos).
    dtype: `model.dtype`; every floating tensor is cast to it (trainable parameters may be fp32 masters).
    lora: the run trains LoRA adapters; the export is the merged model.
    """

    processor: Any
    dtype: str
    lora: bool = False


def write_hf_folder(model: torch.nn.Module, state: dict[str, torch.Tensor], dtype: str, out: Path) -> None:
    """Write `state` (runtime names, e.g. `runtime_state_dict`) as an HF-native model folder in `dtype`."""
    target = getattr(torch, dtype)
    cast = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    model.save_pretrained(str(out), state_dict=cast)
    # save_pretrained records the parameters' dtype, which may be the fp32 of the trainable masters.
    config = copy.deepcopy(model.config)
    config.dtype = target
    # FSDP2 makes the model's class `FSDP<Name>` (a subclass): record the transformers class it derives from.
    config.architectures = [next(c.__name__ for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))]
    config.save_pretrained(str(out))


def export_checkpoint(model: torch.nn.Module, ckpt: Path, export: HFExport, world_size: int) -> Path | None:
    """Write `ckpt/hf/`: a complete HF-native folder (weights in `model.dtype`, processor, chat template,
    generation config; LoRA merged), built in a temporary folder and renamed into place.

    Every rank must call it (the ZeRO-3 gather is collective); rank 0 writes and returns the folder. The weights
    come from the model in memory, so a partial (stage-1) checkpoint's export holds the frozen parts as loaded.
    LoRA is merged by `merge_lora` from the checkpoint's adapter in one process only (rebuilding the base model
    inside one rank of a ZeRO-3 job would wait on the others forever).
    """
    tmp = ckpt / f".{HF_EXPORT_DIR}.tmp"
    if export.lora:
        if world_size > 1:
            log.warning("train.export_hf: LoRA checkpoints are merged in one process; run llava-train merge-lora")
            return None
        if not is_main_process():
            return None
        shutil.rmtree(tmp, ignore_errors=True)
        # Rebuilding the base initialises a projector: keep the training RNG where the checkpoint saved it.
        with torch.random.fork_rng(devices=[]):
            merge_lora(ckpt, tmp, dtype=export.dtype)
    else:
        state = runtime_state_dict(model, trainable_only=False, materialize=is_main_process())
        if not is_main_process():
            return None
        shutil.rmtree(tmp, ignore_errors=True)
        write_hf_folder(unwrap(model), state, export.dtype, tmp)
        save_serving_files(tmp, export.processor, getattr(model, "generation_config", None))
    final = ckpt / HF_EXPORT_DIR
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    log.info("exported %s (HF-native, %s)", final, export.dtype)
    return final


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_complete_marker(folder: str | os.PathLike, step: int) -> Path:
    """fsync every file of a finished checkpoint folder, then write the completion marker (atomically) last.

    The marker lists every file (relative path -> size); a folder without it, or whose files no longer
    match it, is a torn checkpoint that resume never picks.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)
    for f in files:
        _fsync(f)
    manifest = {"step": step, "files": {str(f.relative_to(folder)): f.stat().st_size for f in files}}
    tmp = folder / f".{COMPLETE_MARKER}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    _fsync(tmp)
    os.replace(tmp, folder / COMPLETE_MARKER)
    _fsync(folder)  # the rename itself is durable once the folder's entry is
    return folder / COMPLETE_MARKER


def rotate_checkpoints(run_dir: str | os.PathLike, limit: int | None, keep: str | None = None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `limit` (the run's `train.save_total_limit`); returns them.

    Runs only after a new checkpoint is complete, so the last complete one is never deleted before its
    successor exists; torn folders are left for inspection (resume skips them). `keep` (the best
    checkpoint of `load_best_model_at_end`) and checkpoints whose lmms-eval is pending are never deleted.
    """
    import shutil

    if not limit or limit <= 0:
        return []
    done = complete_checkpoints(run_dir)  # oldest first
    # The newest one (just completed) always stays, whatever else is kept.
    removable = [c for c in done[:-1] if (keep is None or c.resolve() != Path(keep).resolve()) and not is_pending(c)]
    extra = len(done) - limit
    gone = removable[: max(0, extra)]
    for folder in gone:
        shutil.rmtree(folder, ignore_errors=True)
        log.info("deleted %s (train.save_total_limit=%d)", folder, limit)
    return gone


class CheckpointArtifactsCallback(TrainerCallback):
    """Completes every checkpoint: `projector.safetensors` and `llava_train_config.yaml`, then the completion
    marker (written last, after a barrier, once every rank's files are on disk), then the rotation.

    Runs on every rank (the projector gather under ZeRO-3 is collective); rank 0 writes.
    save_total_limit: the run's `train.save_total_limit` (HF's own rotation is turned off: it deleted the
        oldest checkpoint before the new one was known to be complete).
    export: write the checkpoint's `hf/` export before the marker (`train.export_hf`); None = no export.
    export_step0: with `export`, also export the starting model to `<run>/step-0/hf` at train begin (a run that
        starts at step 0), for `eval.lmms_eval_step0`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config_yaml: str,
        save_total_limit: int | None = None,
        export: HFExport | None = None,
        export_step0: bool = False,
    ) -> None:
        self.model = model
        self.config_yaml = config_yaml
        self.save_total_limit = save_total_limit
        self.export = export
        self.export_step0 = export_step0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Export the starting model (every rank: the ZeRO-3 gather is collective); a failure is a warning."""
        folder = Path(args.output_dir) / STEP0_DIR
        if self.export is None or not self.export_step0 or state.global_step > 0 or (folder / HF_EXPORT_DIR).is_dir():
            return
        if self.export.lora:
            log.warning("eval.lmms_eval_step0: a LoRA run's starting model is its base; evaluate that folder offline")
            return
        with optional_artifact(f"the starting model's export {folder / HF_EXPORT_DIR}"):
            if is_main_process():
                folder.mkdir(parents=True, exist_ok=True)
            export_checkpoint(self.model, folder, self.export, args.world_size)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:

        ckpt = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        save_projector(self.model, ckpt / PROJECTOR_FILE)
        if is_main_process():
            ckpt.mkdir(parents=True, exist_ok=True)
            (ckpt / CONFIG_FILENAME).write_text(self.config_yaml)
        if self.export is not None:
            barrier()  # a LoRA merge reads the adapter and config rank 0 wrote
            try:
                export_checkpoint(self.model, ckpt, self.export, args.world_size)
            except OSError:
                raise  # a full disk stops the run naming the last complete checkpoint (`train.train_steps`)
            except Exception as e:  # noqa: BLE001 - the export is optional: the checkpoint stays complete
                shutil.rmtree(ckpt / f".{HF_EXPORT_DIR}.tmp", ignore_errors=True)
                log.warning("train.export_hf: no hf/ in %s, the run goes on: %s: %s", ckpt, type(e).__name__, e)
        barrier()  # every rank's files (DeepSpeed shards, RNG states) are written
        if is_main_process():
            write_complete_marker(ckpt, state.global_step)
            rotate_checkpoints(args.output_dir, self.save_total_limit, state.best_model_checkpoint)
        barrier()  # nobody goes on (or exits) before the checkpoint is complete


def save_final(cfg: RunConfig, trainer: Any, processor: Any) -> None:
    """The final HF-native folder: weights (merged for LoRA; in `model.dtype`), processor, generation config,
    projector, config.

    Every rank must call it (saving gathers ZeRO-3 shards); rank 0 writes. The model's weights are written in
    `model.dtype` (the fp32 masters of trainable parameters, `training.precision`, are cast on the copy written);
    `projector.safetensors` and a LoRA adapter keep the fp32 masters (what a next stage starts from), and the
    adapter is merged into `model.dtype`.
    """
    out = Path(cfg.output_dir)
    model = trainer.model
    save_projector(model, out / PROJECTOR_FILE)
    if cfg.lora.enabled:
        save_adapter(trainer, out / ADAPTER_DIR)
        if trainer.args.world_size > 1:
            # Rebuilding the base model inside one rank of a ZeRO-3 job would wait on the others forever.
            log.info(
                "LoRA adapter saved to %s; merge with: llava-train merge-lora %s --out %s", out / ADAPTER_DIR, out, out
            )
        elif trainer.args.should_save:
            dump_config(cfg, out / CONFIG_FILENAME)
            merge_lora(out, out)
    elif trainer.is_deepspeed_enabled:
        trainer.save_model(str(out))  # DeepSpeed consolidates its shards; its modules hold model.dtype weights
    else:
        # The writer of checkpoint-N/hf: every floating tensor in model.dtype (trainable ones may be fp32 masters).
        state = runtime_state_dict(model, trainable_only=False, materialize=trainer.args.should_save)
        if trainer.args.should_save:
            write_hf_folder(unwrap(model), state, cfg.model.dtype, out)
            (out / TRAINING_ARGS_JSON).write_text(trainer.args.to_json_string())
    if trainer.args.should_save:
        save_serving_files(out, processor, getattr(model, "generation_config", None))
        dump_config(cfg, out / CONFIG_FILENAME)
        for folder in (out, out / "adapter"):
            replace_pickled_args(folder, trainer.args)

        (out / PREEMPTED_FILE).unlink(missing_ok=True)
    log.info("saved final model to %s", out)


def save_adapter(trainer: Any, folder: Path) -> None:
    """The LoRA adapter (+ the projector as `modules_to_save`) in peft's format.

    Under FSDP2 HF's save writes the sharded (DCP) state only, so the trainable tensors are gathered here (every
    rank; rank 0 writes) and handed to peft's `save_pretrained`, which keeps its own key names.
    """
    if not getattr(trainer, "is_fsdp_enabled", False):
        trainer.save_model(str(folder))
        return
    state = runtime_state_dict(trainer.model, trainable_only=True, materialize=trainer.args.should_save)
    if trainer.args.should_save:
        trainer.model.save_pretrained(str(folder), state_dict=state)


def replace_pickled_args(folder: Path, args: Any) -> None:
    """The final folder holds no pickle: HF's `training_args.bin` (a pickled TrainingArguments) becomes JSON.

    Serving folders must be safe to load anywhere; checkpoints keep HF's file (resume unpickles DeepSpeed
    and optimizer states anyway, so resume only from folders you trust).
    """
    pickled = folder / "training_args.bin"
    if pickled.is_file():
        pickled.unlink()
        (folder / TRAINING_ARGS_JSON).write_text(args.to_json_string())


class LoraNewlineResumeCallback(TrainerCallback):
    """LoRA resume of a LLaVA-NeXT / OneVision run: restore `image_newline` from the checkpoint's projector file.

    peft's adapter holds the LoRA weights and the projector (`modules_to_save`) but cannot hold a bare
    parameter, so HF's adapter resume would leave the trained newline at its initialisation; every
    checkpoint's `projector.safetensors` carries it. Runs at train begin, after HF loaded the adapter.
    """

    def __init__(self, model: torch.nn.Module, checkpoint: str) -> None:
        self.model = model
        self.checkpoint = checkpoint

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:

        load_projector(self.model, Path(self.checkpoint) / PROJECTOR_FILE)
        log.info("restored the projector and image_newline from %s", self.checkpoint)
