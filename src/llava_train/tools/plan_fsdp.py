"""`llava-train plan` under FSDP2 (`train.fsdp`): per-GPU model-state bytes of our precision policy, sharded.

Every parameter is sharded over the world (dim-0 chunks, `reshard_after_forward`), frozen ones in `model.dtype`,
trainable ones as fp32 masters with fp32 sharded gradients and fp32 AdamW m, v (16 bytes per trainable parameter,
/ world). In a step the GPU also holds the gathered unit that runs and the next one (FSDP2 prefetches one) in the
compute dtype, plus the gathered unit's gradient before its reduce-scatter: 2 x (2 + 2) bytes x the largest unit.
`cpu_offload` moves the shards, their gradients and AdamW state to CPU RAM (the step runs there): the GPU keeps the
gathered units only. Unlike ZeRO-3 there are no separate 16-bit copies of the trainable weights (ZeRO keeps both a
16-bit partition and an fp32 master): 2 bytes per trainable parameter less, / world.
"""

from __future__ import annotations

from typing import Any

from llava_train.config_fsdp import FsdpSettings

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
COMPUTE_BYTES = 2  # bf16 / fp16 gathered weights and unsharded gradients


def fsdp_rows(
    dtype: str, counts: Any, settings: FsdpSettings, world: int, num_nodes: int
) -> tuple[list[tuple[str, int]], int]:
    """(rows of per-GPU bytes, CPU RAM per node for offloaded state) for FSDP2 on `world` ranks.

    counts: `plan.ParamCounts` (trainable, frozen, largest_layer: the largest unit, e.g. the embeddings)."""
    trainable, frozen, largest_unit = counts.trainable, counts.frozen, counts.largest_layer
    d = DTYPE_BYTES[dtype]
    shards = [
        (f"frozen weights ({dtype} / {world})", d * frozen // world),
        (f"trainable weights (fp32 masters / {world})", 4 * trainable // world),
        (f"fp32 grads + AdamW m, v (trainable / {world})", 12 * trainable // world),
    ]
    gathered = [("2 units gathered (compute dtype) + 1 unsharded grad", 2 * 2 * COMPUTE_BYTES * largest_unit)]
    if settings.cpu_offload:
        return gathered, sum(b for _, b in shards) * (world // num_nodes)
    return shards + gathered, 0


def describe_fsdp(settings: FsdpSettings) -> str:
    """The engine in the plan's header line, e.g. `FSDP2 + cpu offload (configs/fsdp/fsdp2.yaml)`."""
    extra = " + cpu offload" if settings.cpu_offload else ""
    return f"FSDP2{extra} ({settings.source})"


def activation_checkpointing(settings: Any) -> bool:
    """Whether the FSDP2 settings turn on (HF's) activation checkpointing."""
    return bool(settings is not None and settings.activation_checkpointing)
