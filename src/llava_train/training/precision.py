"""The precision policy, in one place: frozen parameters stay in `model.dtype`, every trainable parameter is held in
fp32 (master weights; the optimizer state then follows it in fp32), and the forward runs under bf16/fp16 autocast.

Why: AdamW moves each element by about the learning rate on its first steps; at 2e-5 on weights of magnitude
~0.02 that is below half a bf16 ulp, so stepping bf16 weights directly rounds ~70% of the updates away. DeepSpeed
keeps fp32 masters of its own (its bf16/fp16 modes and every ZeRO stage >= 1 step fp32 partitions), so under
DeepSpeed we leave the module to it and never upcast a second time. FSDP2 follows our policy: the upcast trainable
parameters become fp32 shards, `fsdp_mixed_precision` gathers them in the compute dtype and reduces in fp32.
`model.master_weights: false` is the expert's pure-bf16 opt-out (memory), warned about at start-up.

`resolve_precision` is torch-free (used by `plan` and the config checks); `apply_precision` acts on a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_train.config import RunConfig
from llava_train.config_io import ConfigError
from llava_train.utils.distributed import full_numel
from llava_train.utils.distributed import uses_deepspeed as detect
from llava_train.utils.logging import get_logger

log = get_logger(__name__)

SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass(frozen=True)
class PrecisionPolicy:
    """How a run holds and computes its parameters.

    storage: dtype of frozen parameters: `model.dtype`, or DeepSpeed's 16-bit dtype when its bf16/fp16 mode is on
        (it casts the whole module).
    trainable: dtype the optimizer steps: `float32` (master weights) or `model.dtype` (pure low precision).
    compute: autocast dtype of the forward (`bfloat16` / `float16`), or `float32` without autocast.
    masters_by: who holds the fp32 master weights: `llava-train` (trainable parameters upcast in the module),
        `deepspeed` (its optimizer; the module keeps 16-bit copies) or `none` (pure low precision).
    """

    storage: str
    trainable: str
    compute: str
    masters_by: str

    @property
    def upcasts(self) -> bool:
        """Whether `apply_precision` must cast trainable parameters to fp32 in the module."""
        return self.masters_by == "llava-train" and self.storage != "float32"

    @property
    def pure(self) -> bool:
        """The trainable weights are stepped in a 16-bit dtype (updates below half an ulp are lost)."""
        return self.masters_by == "none"


def _deepspeed_json(deepspeed: Any) -> dict[str, Any]:
    if isinstance(deepspeed, dict):
        return deepspeed
    path = Path(str(deepspeed))
    if not path.is_file():
        raise ConfigError(f"train.deepspeed: no DeepSpeed JSON at {path}")
    return json.loads(path.read_text())


def _enabled(block: Any, auto: bool) -> bool:
    """A DeepSpeed `bf16` / `fp16` block's `enabled` ("auto" takes the TrainingArguments flag, as HF fills it)."""
    value = (block or {}).get("enabled", False)
    return auto if value == "auto" else bool(value)


def resolve_precision(
    cfg: RunConfig, deepspeed: Any = None, uses_deepspeed: bool | None = None, on_cpu: bool = False
) -> PrecisionPolicy:
    """The run's precision policy from `model.dtype`, `model.master_weights`, `train.bf16/fp16` and DeepSpeed.

    `deepspeed`: the DeepSpeed config (path or dict; default `train.deepspeed`); `uses_deepspeed` overrides
    the detection (an `accelerate launch --use_deepspeed` run names no JSON in the run config); `on_cpu`: the
    run has no accelerator. Raises ConfigError for combinations that cannot train correctly.
    """
    storage = cfg.model.dtype
    bf16, fp16 = bool(cfg.train.get("bf16", False)), bool(cfg.train.get("fp16", False))
    deepspeed = cfg.train.get("deepspeed") if deepspeed is None else deepspeed
    if uses_deepspeed is None:
        uses_deepspeed = detect({"deepspeed": deepspeed})
    if uses_deepspeed:
        if not deepspeed:  # accelerate's own DeepSpeed plugin (no JSON here): its ZeRO optimizer holds the masters
            compute = "bfloat16" if bf16 else "float16" if fp16 else storage
            return PrecisionPolicy(compute, "float32", compute, "deepspeed")
        data = _deepspeed_json(deepspeed)
        ds_bf16, ds_fp16 = _enabled(data.get("bf16"), bf16), _enabled(data.get("fp16"), fp16)
        stage = int((data.get("zero_optimization") or {}).get("stage", 0))
        compute = "bfloat16" if ds_bf16 else "float16" if ds_fp16 else storage
        if not (ds_bf16 or ds_fp16 or stage >= 1) and storage != "float32":
            raise ConfigError(
                f"model.dtype={storage} under DeepSpeed ZeRO stage 0 without bf16/fp16 would step {storage} "
                "weights directly (updates below half an ulp are lost): set train.bf16=true or a ZeRO stage >= 1"
            )
        # DeepSpeed's bf16/fp16 modes cast every module parameter (frozen ones too) to the 16-bit dtype.
        return PrecisionPolicy(compute, "float32", compute, "deepspeed")
    if fp16 and on_cpu:
        # accelerate runs neither fp16 autocast nor loss scaling on CPU (it silently trains without them).
        raise ConfigError("train.fp16 needs a GPU (no fp16 autocast or loss scaling on CPU): use train.bf16=true")
    compute = "bfloat16" if bf16 else "float16" if fp16 else "float32"
    if storage == "float32":
        return PrecisionPolicy(storage, "float32", compute, "llava-train")
    if not cfg.model.master_weights:
        if fp16:
            raise ConfigError(
                "model.master_weights=false with train.fp16=true: fp16 loss scaling needs fp32 trainable weights "
                "(remove one of the two)"
            )
        return PrecisionPolicy(storage, storage, compute if compute != "float32" else storage, "none")
    if compute == "float32":
        raise ConfigError(
            f"model.dtype={storage} keeps frozen weights in {storage} and trainable ones in fp32, which needs an "
            "autocast forward: set train.bf16=true (or train.fp16=true), or model.dtype=float32"
        )
    return PrecisionPolicy(storage, "float32", compute, "llava-train")


def apply_precision(model: Any, policy: PrecisionPolicy) -> dict[str, int]:
    """Cast every trainable floating parameter to fp32 when the policy upcasts; log the policy in one line.

    Call after the stage set `requires_grad` and before the optimizer exists. Frozen parameters are not
    touched (bit-identical). Returns {"trainable": n, "frozen": n, "upcast": n} parameter counts.
    """
    import torch

    counts = {"trainable": 0, "frozen": 0, "upcast": 0}
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen:  # tied weights count once
            continue
        seen.add(id(param))
        n = full_numel(param)
        counts["trainable" if param.requires_grad else "frozen"] += n
        if policy.upcasts and param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
            counts["upcast"] += n
    if policy.upcasts:
        _align_frozen_norm_inputs(model)
    log.info("%s", describe(policy, counts["trainable"], counts["frozen"]))
    if policy.pure:
        log.warning(
            "model.master_weights=false: trainable weights and optimizer state are stepped in %s (pure %s); every "
            "update smaller than half a %s ulp is rounded away (~70%% of AdamW's first-step updates at lr 2e-5 "
            "on weights of magnitude 0.02)",
            policy.storage,
            SHORT[policy.storage],
            SHORT[policy.storage],
        )
    return counts


def _align_frozen_norm_inputs(model: Any) -> None:
    """Frozen 16-bit LayerNorms take their input in their own dtype.

    A frozen layer after a trained one (the vision tower's unused tail behind `vision_tower_train_from_layer`)
    receives fp32 activations from the fp32 residual stream. CUDA autocast runs layer_norm in fp32 whatever its
    inputs; CPU autocast does not cast it and refuses fp32 input with bf16 parameters. The hook casts the input
    (a no-op when the dtypes already agree), so every backend computes the frozen norm alike.
    """
    import torch

    def cast_input(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0]
        if x.is_floating_point() and x.dtype != module.weight.dtype:
            return (x.to(module.weight.dtype), *args[1:])
        return None

    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (
            isinstance(module, torch.nn.LayerNorm)
            and weight is not None
            and not weight.requires_grad
            and weight.dtype in (torch.bfloat16, torch.float16)
        ):
            module.register_forward_pre_hook(cast_input)


def fsdp_mixed_precision(policy: PrecisionPolicy) -> Any:
    """FSDP2's `MixedPrecisionPolicy` for the policy: parameters gathered in the compute dtype (bf16 compute over fp32
    trainable shards and `model.dtype` frozen ones), gradients reduce-scattered in fp32 whatever the compute dtype.

    A pure low-precision policy (`master_weights: false`) keeps its 16-bit shards; its gradients still reduce in
    fp32. fp32 compute gathers parameters as they are held.
    """
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    param_dtype = None if policy.compute == "float32" else getattr(torch, policy.compute)
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=True)


def describe(policy: PrecisionPolicy, trainable: int, frozen: int) -> str:
    """The start-up line, e.g. `precision: 1.10B trainable in fp32 (master weights, fp32 optimizer state),
    0.30B frozen in bf16, compute bf16 autocast`."""
    compute = "fp32" if policy.compute == "float32" else f"{SHORT[policy.compute]} autocast"
    if policy.masters_by == "deepspeed":
        compute = f"{SHORT[policy.compute]} (DeepSpeed)"
        held = "fp32 master weights and optimizer state held by DeepSpeed's optimizer"
    elif policy.pure:
        held = f"stepped in {SHORT[policy.storage]}: no master weights"
    else:
        held = "master weights, fp32 optimizer state"
    trained_in = "" if policy.masters_by == "deepspeed" else f" in {SHORT[policy.trainable]}"
    n_trainable, n_frozen = _counts(trainable, frozen)
    return (
        f"precision: {n_trainable} trainable{trained_in} ({held}), {n_frozen} frozen in "
        f"{SHORT[policy.storage]}, compute {compute}"
    )


def _counts(*counts: int) -> list[str]:
    """Parameter counts in one unit, that of the largest (`1.10B`, `0.30B`)."""
    top = max(counts)
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if top >= size:
            return [f"{n / size:.2f}{unit}" for n in counts]
    return [str(n) for n in counts]
