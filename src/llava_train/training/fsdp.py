"""FSDP2, the second distributed engine (`train.fsdp=configs/fsdp/fsdp2.yaml`): HF Trainer + accelerate's FSDP2.

Why accelerate's FSDP2 and not our own `fully_shard` loop: the Trainer then keeps every guarantee it gives
DeepSpeed runs (gradient accumulation without sync, DTensor-aware clipping, sharded DCP checkpoints of model and
optimizer, their resume, RNG states), and `fsdp2_prepare_model` does the wrapping we want (per-layer units, the
optimizer's parameters swapped to the shards). What accelerate (1.15) lacks is CPU: it never turns FSDP on for a
MULTI_CPU (gloo) state, and HF's `fsdp` argument then silently trains plain DDP. `activate_fsdp` builds the plugin
itself (the precision policy's `MixedPrecisionPolicy`, not accelerate's bf16-reduce default) and, on CPU only, sets
the state's distributed type to FSDP, so CPU tests run the exact code path of GPU runs.

The wrapping rule (`set_wrap_classes`): every decoder layer of the LM and every encoder layer of the vision tower is
its own unit (reshard after forward); accelerate carves the input embeddings and [final norm, lm_head] into units;
the rest (projector, tower embeddings and norms, image newline) is the root unit. Frozen parts are sharded like
trained ones (a frozen 7B LM in stage 1 is not replicated); FSDP2 only needs a uniform dtype among a unit's
trainable parameters (fp32 masters), frozen ones keep `model.dtype`. The rank rule holds because every rank runs
each unit the same number of times per micro-batch whatever its data: the LM always, the tower once per missing
image/video pass through the keepalive (`trainer._install_vision_keepalive`, also for different crop counts: one
tower call), lm_head once (`loss.py`).
"""

from __future__ import annotations

import os
from typing import Any

from llava_train.config_fsdp import FsdpSettings
from llava_train.training.precision import PrecisionPolicy, fsdp_mixed_precision
from llava_train.utils.distributed import has_accelerator
from llava_train.utils.logging import get_logger
from llava_train.utils.modules import unwrap

log = get_logger(__name__)


def fsdp_training_kwargs(settings: FsdpSettings, kwargs: dict[str, Any]) -> dict[str, Any]:
    """TrainingArguments kwargs for an FSDP2 run: activation checkpointing through HF's (keeps parameter names)."""
    out = dict(kwargs)
    if settings.activation_checkpointing:
        out.setdefault("gradient_checkpointing", True)
    return out


def activate_fsdp(settings: FsdpSettings, policy: PrecisionPolicy, args: Any) -> Any:
    """Turn accelerate's state into an FSDP2 one with our plugin; call after TrainingArguments, before the Trainer.

    `utils.distributed.prepare_distributed(..., fsdp=True)` created the PartialState and asked TrainingArguments
    to use it (`use_configured_state`). Returns the plugin.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, TorchDynamoPlugin

    offload = settings.cpu_offload
    if offload and not has_accelerator():
        # FSDP2's CPUOffloadPolicy copies shards to the accelerator for compute and refuses a CPU-only machine;
        # there everything already lives in CPU RAM.
        log.warning("train.fsdp: cpu_offload ignored on a machine without an accelerator (all state is in RAM)")
        offload = False
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        reshard_after_forward=settings.reshard_after_forward,
        cpu_offload=offload,
        state_dict_type="SHARDED_STATE_DICT",  # checkpoints: one DCP shard per rank; the final folder is gathered
        mixed_precision_policy=fsdp_mixed_precision(policy),
        activation_checkpointing=False,  # HF's (fsdp_training_kwargs): FSDP's wrapper renames parameters
        cpu_ram_efficient_loading=False,
        sync_module_states=False,
    )
    mixed = getattr(args, "mixed_precision", None) or ("bf16" if args.bf16 else "fp16" if args.fp16 else "no")
    state = AcceleratorState(
        mixed_precision=mixed,
        cpu=not has_accelerator(),
        fsdp_plugin=plugin,
        dynamo_plugin=TorchDynamoPlugin(),
        _from_accelerator=True,
    )
    if state.distributed_type != DistributedType.FSDP:
        # accelerate enables FSDP only for accelerator devices; on CPU (gloo) FSDP2 works the same way. The
        # AcceleratorState re-reads PartialState's fields at every construction: set both.
        PartialState().distributed_type = DistributedType.FSDP
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
    # `accelerate launch --use_fsdp` exports ACCELERATE_USE_FSDP: the Trainer's Accelerator would build a second
    # plugin from accelerate's own env (FSDP1 defaults; it refuses a CPU-only machine). Ours is in the state.
    os.environ["ACCELERATE_USE_FSDP"] = "false"
    mp = plugin.mixed_precision_policy
    log.info(
        "FSDP2 (%s): per-layer units, reshard_after_forward=%s, cpu_offload=%s, gather in %s, reduce in %s",
        settings.source,
        settings.reshard_after_forward,
        offload,
        mp.param_dtype or "the held dtype",
        mp.reduce_dtype,
    )
    return plugin


def fsdp_plugin() -> Any:
    """The active FSDP2 plugin of accelerate's state, or None (no FSDP run, or no state yet). Reads the shared
    state without constructing one (constructing outside an Accelerator raises)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    state = AcceleratorState._shared_state
    if state.get("distributed_type") != DistributedType.FSDP:
        return None
    return state.get("fsdp_plugin")


def layer_class_names(model: Any) -> list[str]:
    """Classes of the repeated blocks to shard one by one: those named in a submodule's `_no_split_modules` that
    hold a `layers` / `layer` list (the LM's decoder layers, the tower's encoder layers)."""
    from torch import nn

    base = unwrap(model)
    wanted: set[str] = set()
    for module in base.modules():
        wanted.update(getattr(module, "_no_split_modules", None) or [])
    names: set[str] = set()
    for module in base.modules():
        if isinstance(module, nn.ModuleList):
            names.update(type(m).__name__ for m in module if type(m).__name__ in wanted)
    return sorted(names)


def set_wrap_classes(model: Any) -> list[str]:
    """Name the per-layer units on the active plugin (before accelerate prepares the model); returns them."""
    plugin = fsdp_plugin()
    if plugin is None:
        return []
    names = layer_class_names(model)
    if not names:
        raise RuntimeError("FSDP2: found no repeated layers to shard (no `_no_split_modules` class in a ModuleList)")
    plugin.transformer_cls_names_to_wrap = names
    log.info("FSDP2 units: one per %s, plus embeddings, [norm, lm_head] and the root", " / ".join(names))
    return names
