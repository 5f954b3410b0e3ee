"""Every write of a run: checkpoints (runtime-named weights, trainable-only for partial stages), the projector
artifact and config in each checkpoint, and the final HF-native folder (LoRA: adapter + merged model).

Checkpoints are written by HF Trainer's own checkpointing, which calls `LLaVATrainer.save_model` for a
`checkpoint-<step>` folder (that is where `save_checkpoint_weights` comes in) and fires `on_save`
(`CheckpointArtifactsCallback`); the final folder is `save_final`'s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from llava_train.config import CONFIG_FILENAME, RunConfig, dump_config
from llava_train.model.projector import PROJECTOR_FILE, save_projector
from llava_train.utils.distributed import gathered
from llava_train.utils.logging import get_logger, is_main_process

log = get_logger(__name__)

CHECKPOINT_INFO = "llava_train_checkpoint.json"


def is_checkpoint_folder(path: str | os.PathLike, run_dir: str | os.PathLike) -> bool:
    """Whether `path` is one of the run's HF checkpoint folders (`<run_dir>/checkpoint-<step>`)."""
    p = Path(path)
    return p.parent.resolve() == Path(run_dir).resolve() and p.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-")


def runtime_state_dict(
    model: torch.nn.Module, trainable_only: bool, materialize: bool = True
) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters (all or trainable only, plus persistent buffers), keyed as in `state_dict()`.

    Gathered under ZeRO-3 (every rank must call it then: the gather is collective); only a rank with
    `materialize` builds the copies, the others return {} (a 7B model is 14 GB per copy). Tied
    parameters appear once (safetensors refuses shared storage; the tie restores the other name on load).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only]
    out: dict[str, torch.Tensor] = {}
    with gathered([p for _, p in named], modifier_rank=None):  # read-only: no broadcast back
        if materialize:
            for name, p in named:
                out[name] = p.detach().to("cpu").clone().contiguous()
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


class CheckpointArtifactsCallback(TrainerCallback):
    """Adds `projector.safetensors` and `llava_train_config.yaml` to every checkpoint.

    Runs on every rank (the projector gather under ZeRO-3 is collective); rank 0 writes.
    """

    def __init__(self, model: torch.nn.Module, config_yaml: str) -> None:
        self.model = model
        self.config_yaml = config_yaml

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        save_projector(self.model, ckpt / PROJECTOR_FILE)
        if is_main_process():
            ckpt.mkdir(parents=True, exist_ok=True)
            (ckpt / "llava_train_config.yaml").write_text(self.config_yaml)


def save_final(cfg: RunConfig, trainer: Any, processor: Any) -> None:
    """The final HF-native folder: weights (merged for LoRA), processor, generation config, projector, config.

    Every rank must call it (saving gathers ZeRO-3 shards); rank 0 writes.
    """
    out = Path(cfg.output_dir)
    model = trainer.model
    save_projector(model, out / PROJECTOR_FILE)
    if cfg.lora.enabled:
        from llava_train.model.lora import ADAPTER_DIR, merge_lora

        trainer.save_model(str(out / ADAPTER_DIR))
        if trainer.args.world_size > 1:
            # Rebuilding the base model inside one rank of a ZeRO-3 job would wait on the others forever.
            log.info(
                "LoRA adapter saved to %s; merge with: llava-train merge-lora %s --out %s", out / ADAPTER_DIR, out, out
            )
        elif trainer.args.should_save:
            dump_config(cfg, out / CONFIG_FILENAME)
            merge_lora(out, out)
    else:
        trainer.save_model(str(out))
    if trainer.args.should_save:
        processor.save_pretrained(str(out))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(str(out))
        dump_config(cfg, out / CONFIG_FILENAME)
    log.info("saved final model to %s", out)
