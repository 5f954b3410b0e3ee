"""`llava-train plan`: estimated per-GPU memory of a run config (model states by ZeRO stage, LoRA/QLoRA, activations).

The numbers are derived, not measured: parameter counts come from the model built on the meta device
(exact configs from `model.known_configs`, no download), multiplied by the bytes each state takes.

Bytes per parameter (bf16 mixed precision, Adam), the accounting DeepSpeed's own estimators use:
- 16-bit weights: 2 (every parameter, trainable or frozen).
- For each trainable parameter: 16-bit gradient 2, fp32 gradient 4, fp32 master weight 4, Adam m and
  v 4 + 4 = 18 bytes besides the weight. Frozen parameters carry no gradient and no optimizer state.
  (DeepSpeed's ZeRO-3 estimator counts 18 bytes in all, leaving out the 16-bit gradient partition
  we count; its ZeRO-2 one counts 2 + 18 as we do.)
- ZeRO-2 partitions the 18 bytes over the world size; 16-bit weights stay replicated. ZeRO-3 also
  partitions the weights (frozen ones included: `zero.Init` partitions everything) and needs the
  largest layer gathered (4 bytes per parameter of it: 16-bit weight + gradient). Optimizer offload
  moves the 16 fp32 bytes to CPU RAM; parameter offload moves the 16-bit weights too.
- Without DeepSpeed (DDP / one GPU, HF Trainer) the precision policy (`training.precision`) holds frozen
  weights in `model.dtype` and trainable ones in fp32 with fp32 gradient, m and v: trainable 16 bytes,
  frozen the dtype's bytes. With `model.master_weights: false` (pure bf16) trainable weights, gradient, m and
  v all take the dtype's bytes (4x).
- QLoRA: the language model's linear weights take 4.127 bits (NF4 + double-quantised scales,
  Dettmers et al. 2023) or 8 bits; peft's k-bit preparation upcasts every other parameter to fp32.

Activations of the language model (per GPU, 16-bit): s x b x h x 34 bytes per layer without
checkpointing (Korthikanti et al. 2022 for a transformer layer; the 5·a·s/h attention-score term is
left out because sdpa/flash attention do not store the scores); with gradient checkpointing each
layer keeps only its 16-bit input (2 bytes) and one layer at a time is recomputed (34). The loss adds
rows x vocab x 10 bytes (16-bit logits, their fp32 copy for cross-entropy and its fp32 gradient),
rows = b x s on HF's path, or `perf.loss_chunk_size` with `perf.loss_on_trained_only` (our chunked
loss recomputes each chunk in backward, so one chunk's logits are alive at a time).
A frozen vision tower stores no activations (nothing below it needs a gradient); a trained one adds
the same formula over its layers and patches. s is `data.model_max_length` (or `packing_length`):
the worst case, a micro-batch padded to the longest allowed sample.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_train.config import RunConfig
from llava_train.config_fsdp import FsdpSettings, load_fsdp_settings
from llava_train.model.freeze import format_parameter_table
from llava_train.tools.param_counts import ParamCounts, count_parameters
from llava_train.tools.plan_fsdp import activation_checkpointing as fsdp_ac
from llava_train.tools.plan_fsdp import describe_fsdp, fsdp_rows

GIB = 1024**3
GPU_SIZES_GIB = (24, 40, 80)
DEFAULT_GPUS_PER_NODE = 8
# CUDA context, cuBLAS/NCCL workspaces and allocator slack, per GPU.
OVERHEAD_BYTES = 2 * GIB
ACTIVATION_FACTOR = 34
LOGIT_BYTES = 10
OPTIMIZER_FP32_BYTES = 16  # what optimizer offload moves to CPU: fp32 grad, master, m, v
QLORA_BYTES = {4: 4.127 / 8, 8: 1.0}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class ZeroSettings:
    """What the DeepSpeed JSON says about memory: stage (0 = no DeepSpeed) and offload targets."""

    stage: int
    offload_optimizer: bool
    offload_param: bool
    source: str


@dataclass
class MemoryPlan:
    """Per-GPU memory estimate (bytes) for one config and world size; `rows` itemise `total`."""

    world_size: int
    num_nodes: int
    zero: ZeroSettings
    counts: ParamCounts
    micro_batch: int
    seq_len: int
    gradient_checkpointing: bool
    rows: list[tuple[str, int]]
    cpu_bytes_per_node: int
    deepspeed_estimate: str
    fsdp: FsdpSettings | None = None

    @property
    def total(self) -> int:
        """Estimated peak bytes per GPU."""
        return sum(b for _, b in self.rows)


def read_zero_settings(deepspeed: Any) -> ZeroSettings:
    """ZeRO stage and offload flags from `train.deepspeed` (a JSON path or a dict; None = no DeepSpeed)."""
    if not deepspeed:
        return ZeroSettings(stage=0, offload_optimizer=False, offload_param=False, source="none")
    if isinstance(deepspeed, dict):
        data, source = deepspeed, "inline dict"
    else:
        path = Path(str(deepspeed))
        if not path.is_file():
            raise FileNotFoundError(f"train.deepspeed: no DeepSpeed JSON at {path}")
        data, source = json.loads(path.read_text()), str(path)
    zero = data.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 0))

    def on_cpu(key: str) -> bool:
        return str((zero.get(key) or {}).get("device", "none")).lower() in ("cpu", "nvme")

    return ZeroSettings(stage, on_cpu("offload_optimizer"), on_cpu("offload_param"), source)


def _model_state_rows(cfg: RunConfig, counts: ParamCounts, zero: ZeroSettings, world: int) -> list[tuple[str, int]]:
    n_t, n_f = counts.trainable, counts.frozen
    bits = cfg.lora.bits if cfg.lora.enabled else None
    if bits:
        # Frozen LM linears are quantised; everything else (vision tower, embeddings, lm_head, norms,
        # the adapters themselves) is upcast to fp32 by peft's k-bit preparation.
        frozen_fp32 = n_f - counts.quantizable
        weights = int(counts.quantizable * QLORA_BYTES[bits]) + 4 * (frozen_fp32 + n_t)
        label = f"weights ({bits}-bit LM linears, fp32 rest)"
    elif zero.stage == 0:
        d = DTYPE_BYTES[cfg.model.dtype]
        if not cfg.model.master_weights:
            return [
                (f"weights ({cfg.model.dtype}, all params; pure, no fp32 masters)", d * (n_t + n_f)),
                (f"grads + AdamW m, v ({cfg.model.dtype}, trainable)", 3 * d * n_t),
            ]
        return [
            (f"frozen weights ({cfg.model.dtype})", d * n_f),
            ("trainable weights (fp32 masters)", 4 * n_t),
            ("grads + AdamW m, v (fp32, trainable)", 12 * n_t),
        ]
    else:
        weights = 2 * (n_t + n_f)
        label = "16-bit weights (all params)"
    if zero.stage == 0:
        return [(label, weights), ("grads + AdamW m, v (fp32, trainable)", 12 * n_t)]
    if zero.stage in (1, 2):
        grads16 = 0 if zero.offload_optimizer else 2 * n_t // world
        optim = 0 if zero.offload_optimizer else OPTIMIZER_FP32_BYTES * n_t // world
        return [
            (label + ", replicated", weights),
            (f"16-bit grads (trainable / {world})", grads16),
            (f"fp32 grads + master + Adam m, v (trainable / {world})", optim),
        ]
    gathered = 4 * counts.largest_layer
    weights_gpu = 0 if zero.offload_param else weights // world
    grads16 = 0 if zero.offload_optimizer else 2 * n_t // world
    optim = 0 if zero.offload_optimizer else OPTIMIZER_FP32_BYTES * n_t // world
    return [
        (label + f" / {world}", weights_gpu),
        (f"16-bit grads (trainable / {world})", grads16),
        (f"fp32 grads + master + Adam m, v (trainable / {world})", optim),
        ("largest layer gathered (weight + grad)", gathered),
    ]


def _activation_rows(cfg: RunConfig, counts: ParamCounts, micro: int, seq: int, ckpt: bool) -> list[tuple[str, int]]:
    tokens = micro * seq
    per_layer = ACTIVATION_FACTOR * tokens * counts.hidden
    if ckpt:
        lm = counts.layers * 2 * tokens * counts.hidden + per_layer
        label = f"LM activations (checkpointed: {counts.layers} layer inputs + 1 layer)"
    else:
        lm = counts.layers * per_layer
        label = f"LM activations ({counts.layers} layers x 34 x b x s x h)"
    if cfg.perf.loss_on_trained_only:
        # training/loss.py recomputes each chunk in backward: one chunk's logits are alive at a time.
        logit_rows = min(cfg.perf.loss_chunk_size, tokens)
        logit_label = f"logits + fp32 loss copy + grad ({logit_rows} rows: perf.loss_chunk_size)"
    else:
        logit_rows = tokens
        logit_label = "logits + fp32 loss copy + grad (every position)"
    rows = [(label, lm), (logit_label, LOGIT_BYTES * logit_rows * counts.vocab)]
    if cfg.model.train_vision_tower:
        v_tokens = micro * counts.crops_per_image * counts.vision_tokens
        v_layer = ACTIVATION_FACTOR * v_tokens * counts.vision_hidden
        vis = counts.vision_layers * (2 * v_tokens * counts.vision_hidden if ckpt else v_layer) + (
            v_layer if ckpt else 0
        )
        crops = f", {counts.crops_per_image} crops" if counts.crops_per_image > 1 else ""
        rows.append((f"vision tower activations (1 image per sample{crops})", vis))
    return rows


def _cpu_bytes(counts: ParamCounts, zero: ZeroSettings, num_nodes: int) -> int:
    if zero.stage == 0:
        return 0
    cpu = OPTIMIZER_FP32_BYTES * counts.trainable if zero.offload_optimizer else 0
    if zero.offload_param:
        cpu += 2 * (counts.trainable + counts.frozen)
    return cpu // num_nodes


def deepspeed_estimate(counts: ParamCounts, zero: ZeroSettings, gpus_per_node: int, num_nodes: int) -> str:
    """DeepSpeed's own table (`estimate_zero{2,3}_model_states_mem_needs_all_cold`), which assumes ALL params train."""
    total = counts.trainable + counts.frozen
    try:
        # Imported outside the redirect: DeepSpeed's logger binds its handler to sys.stdout at import.
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold
    except ImportError as e:
        return f"(DeepSpeed's estimator unavailable: {e})"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        if zero.stage == 3:
            estimate_zero3_model_states_mem_needs_all_cold(
                total_params=total,
                largest_layer_params=counts.largest_layer,
                num_gpus_per_node=gpus_per_node,
                num_nodes=num_nodes,
            )
        else:
            estimate_zero2_model_states_mem_needs_all_cold(
                total_params=total, num_gpus_per_node=gpus_per_node, num_nodes=num_nodes
            )
    return buffer.getvalue().rstrip()


def estimate(cfg: RunConfig, num_gpus: int | None = None, num_nodes: int = 1) -> MemoryPlan:
    """The per-GPU memory estimate for `cfg` on `num_nodes` x `num_gpus` GPUs (default 8 per node)."""
    gpus_per_node = DEFAULT_GPUS_PER_NODE if num_gpus is None else int(num_gpus)
    if gpus_per_node < 1 or num_nodes < 1:
        raise ValueError(f"num_gpus and num_nodes must be >= 1, got {gpus_per_node} and {num_nodes}")
    world = gpus_per_node * num_nodes
    zero = read_zero_settings(cfg.train.get("deepspeed"))
    fsdp = load_fsdp_settings(cfg.train["fsdp"]) if cfg.train.get("fsdp") else None
    counts = count_parameters(cfg)
    micro = int(cfg.train.get("per_device_train_batch_size", 8))
    seq = int(
        (cfg.data.packing_length or cfg.data.model_max_length) if cfg.data.packing else cfg.data.model_max_length
    )
    ckpt = any((cfg.train.get("gradient_checkpointing"), cfg.train.get("activation_checkpointing"), fsdp_ac(fsdp)))
    if fsdp is not None:
        rows, cpu = fsdp_rows(cfg.model.dtype, counts, fsdp, world, num_nodes)
    else:
        rows, cpu = _model_state_rows(cfg, counts, zero, world), _cpu_bytes(counts, zero, num_nodes)
    if cfg.stage == "dpo":  # a pair is two sequences in one micro-batch; `frozen` keeps a copy of the prepared model
        micro *= 2
        n_t, n_f = counts.trainable, counts.frozen
        copy = 2 * (n_t + n_f) if zero.stage else DTYPE_BYTES[cfg.model.dtype] * n_f + 4 * n_t
        rows += [("DPO frozen reference (a copy of the model)", copy)] if cfg.dpo.reference == "frozen" else []
    rows += _activation_rows(cfg, counts, micro, seq, ckpt)
    rows.append(("CUDA context, workspaces, allocator slack", OVERHEAD_BYTES))
    ds_text = deepspeed_estimate(counts, zero, gpus_per_node, num_nodes) if zero.stage else ""
    return MemoryPlan(
        world_size=world,
        num_nodes=num_nodes,
        zero=zero,
        counts=counts,
        micro_batch=micro,
        seq_len=seq,
        gradient_checkpointing=ckpt,
        rows=rows,
        cpu_bytes_per_node=cpu,
        deepspeed_estimate=ds_text,
        fsdp=fsdp,
    )


def verdict(total_bytes: int, gpu_gib: int) -> str:
    """`fits` (<= 90% of the card), `tight` (<= 100%) or `OOM`."""
    cap = gpu_gib * GIB
    if total_bytes <= 0.9 * cap:
        return "fits"
    if total_bytes <= cap:
        return "tight"
    return "OOM"


def _gib(n: int | float) -> str:
    return f"{n / GIB:8.2f} GiB"


def format_plan(p: MemoryPlan) -> str:
    """The plan as the text `llava-train plan` prints."""

    z = p.zero
    zero_text = "no DeepSpeed" if z.stage == 0 else f"ZeRO-{z.stage}"
    if z.offload_optimizer or z.offload_param:
        zero_text += " + offload " + "+".join(
            name for name, on in (("optimizer", z.offload_optimizer), ("params", z.offload_param)) if on
        )
    engine = describe_fsdp(p.fsdp) if p.fsdp else f"{zero_text} ({z.source})"
    lines = [
        f"world: {p.num_nodes} node(s) x {p.world_size // p.num_nodes} GPU(s) = {p.world_size}; "
        f"{engine}; micro-batch {p.micro_batch} x {p.seq_len} tokens; gradient checkpointing "
        f"{'on' if p.gradient_checkpointing else 'off'}",
        "",
        format_parameter_table(p.counts.groups),
        "",
        f"{'per-GPU memory (ours: frozen modules counted as frozen)':<70}",
    ]
    lines += [f"  {name:<68}{_gib(b)}" for name, b in p.rows]
    lines.append(f"  {'total per GPU':<68}{_gib(p.total)}")
    if p.cpu_bytes_per_node:
        lines.append(f"  {'CPU RAM per node for offloaded states':<68}{_gib(p.cpu_bytes_per_node)}")
    lines.append("")
    lines.append("verdict: " + ", ".join(f"{g} GB GPU: {verdict(p.total, g)}" for g in GPU_SIZES_GIB))
    if p.deepspeed_estimate:
        lines += [
            "",
            "DeepSpeed's estimator (model states only, assumes EVERY parameter trains, 1.5x CPU buffer factor;",
            "ignores frozen modules and activations, so it overstates stages that freeze most of the model):",
            p.deepspeed_estimate,
            f"(the row for this config: {_deepspeed_row(z)})",
        ]
    return "\n".join(lines)


def _deepspeed_row(z: ZeroSettings) -> str:
    optim = "cpu" if z.offload_optimizer else "none"
    if z.stage != 3:
        return f"offload_optimizer={optim}"
    return f"offload_param={'cpu' if z.offload_param else 'none'}, offload_optimizer={optim}, zero_init=1"


def plan(cfg: RunConfig, num_gpus: int | None = None, num_nodes: int = 1) -> str:
    """Estimated per-GPU memory for `cfg`: parameter table, bytes per state, activations, verdict per GPU size.

    num_gpus: GPUs per node (default 8, the recipes' setup); num_nodes: nodes. Prints DeepSpeed's own
    estimator table too, labelled: it assumes all parameters train.
    """
    return format_plan(estimate(cfg, num_gpus=num_gpus, num_nodes=num_nodes))
