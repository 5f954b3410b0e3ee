"""Per-batch token/image statistics and the throughput tracker behind tokens/s, padding efficiency and MFU."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from llava_train.training.flops import FlopModel, peak_flops_for_current_device
from llava_train.utils.distributed import collective_device
from llava_train.utils.modules import IGNORE_INDEX, unwrap

STAT_KEYS = ("real_tokens", "padded_tokens", "trained_tokens", "samples", "images", "image_tokens", "sum_sq_lengths")


def batch_stats(
    batch: Mapping[str, Any], image_token_id: int, video_token_id: int | None = None
) -> dict[str, torch.Tensor]:
    """Counts of one collated micro-batch, as 0-d int64 tensors on the batch's device (no host sync).

    real_tokens: tokens of samples: attention_mask == 1 for padded batches, `real_mask` (the packing
        collator's; the pad tail of a row is not a sample) for packed rows.
    padded_tokens: B x L, everything the model computes on.
    trained_tokens: positions whose label enters the loss; HF shifts labels by one, so the label at
        position 0 of a row never counts (labels[:, 1:] != -100).
    samples: rows, or for packed rows the sample starts (position_ids == 0 on real positions, so the
        pad tail, whose positions also restart at 0, is not counted as a sample).
    images: crops and video frames through the vision tower: pixel_values.shape[0] (LLaVA-1.5: one
        crop per image; anyres: every image's base + grid crops) + frames of pixel_values_videos.
    image_tokens: input_ids == image_token_id (or the video token) on real positions.
    sum_sq_lengths: sum over samples of (real sample length)^2, for the attention FLOPs; computed
        as sum over real positions of (2 p + 1), p = position inside the sample, because
        sum_{p<L} (2p + 1) = L^2; this needs no per-sample lengths on the host.
    """
    input_ids = batch["input_ids"]  # [B, L]
    device = input_ids.device
    mask = batch.get("attention_mask", batch.get("real_mask"))
    real = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()  # [B, L]
    position_ids = batch.get("position_ids")
    if position_ids is not None:
        pos = position_ids.reshape(input_ids.shape)  # [B, L]
        samples = ((pos == 0) & real).sum()
    else:
        pos = real.long().cumsum(dim=1) - 1  # [B, L]: 0.. within each (left- or right-padded) row
        samples = torch.tensor(input_ids.shape[0], device=device)
    labels = batch.get("labels")
    if labels is None:
        trained = torch.zeros((), dtype=torch.long, device=device)
    else:
        trained = (labels[:, 1:] != IGNORE_INDEX).sum()
    pixel_values = batch.get("pixel_values")
    images = 0 if pixel_values is None else pixel_values.shape[0]
    videos = batch.get("pixel_values_videos")
    if videos is not None:
        images += videos.shape[0] * videos.shape[1]  # [V, F, 3, S, S]
    placeholders = input_ids == image_token_id
    if video_token_id is not None:
        placeholders = placeholders | (input_ids == video_token_id)
    return {
        "real_tokens": real.sum(),
        "padded_tokens": torch.tensor(input_ids.numel(), device=device),
        "trained_tokens": trained,
        "samples": samples.long(),
        "images": torch.tensor(images, device=device),
        "image_tokens": (placeholders & real).sum(),
        "sum_sq_lengths": ((2 * pos + 1) * real).sum(),
    }


def _dist_world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class ThroughputTracker:
    """Accumulates `batch_stats` of every micro-batch on the device; `flush()` turns them into rates.

    Counts are global: when torch.distributed is initialized with more than one rank, `flush()`
    all-reduces (sums) the interval's counts, so EVERY rank must call `flush()` at the same log
    step (HF's `on_log` fires on every rank). Rates use the wall time between flushes, minus time
    excluded with `exclude()` (evaluation, checkpoint saving). MFU = model FLOPs / (seconds x
    peak FLOP/s per GPU x world size).

    flops: the FLOP model (None = no MFU).
    peak_flops: dense peak FLOP/s of one GPU (None = no MFU, e.g. on CPU).
    image_token_id: id of the image placeholder in input_ids.
    video_token_id: id of OneVision's video placeholder (None for the image-only archs).
    recompute: activation checkpointing is on: `hfu` (hardware FLOP utilisation) adds the recomputed forward.
    clock: seconds source, also used by ThroughputCallback (tests pass a fake clock).
    cpu_clock: this process's CPU seconds (all threads); `last_interval` reports them.

    After each flush `last_interval` holds the interval's global counts (STAT_KEYS), `seconds` and `cpu_seconds`:
    the raw figures behind the logged rates (the bench reports from them).
    """

    def __init__(
        self,
        flops: FlopModel | None,
        peak_flops: float | None,
        *,
        image_token_id: int,
        video_token_id: int | None = None,
        recompute: bool = False,
        clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] = time.process_time,
    ) -> None:
        self.flops = flops
        self.peak_flops = peak_flops
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.recompute = recompute
        self.clock = clock
        self.cpu_clock = cpu_clock
        self._totals: dict[str, torch.Tensor] | None = None
        self._start: float | None = None
        self._cpu_start = 0.0
        self._excluded = 0.0
        self.last_interval: dict[str, float] = {}

    @classmethod
    def for_model(cls, model: Any, args: Any = None) -> ThroughputTracker:
        """Tracker for a LlavaForConditionalGeneration after its stage/LoRA are applied.

        FLOPs from `FlopModel.from_model`, the image token id from the model config, and the peak
        FLOP/s of the current CUDA device for the compute dtype (`args.bf16` / `args.fp16`, else the
        weights' dtype); no MFU on CPU or unknown GPUs.
        """
        base = unwrap(model)
        if args is not None and getattr(args, "bf16", False):
            dtype = torch.bfloat16
        elif args is not None and getattr(args, "fp16", False):
            dtype = torch.float16
        else:
            dtype = next(base.parameters()).dtype
        peak = None
        if not (args is not None and getattr(args, "use_cpu", False)):
            peak = peak_flops_for_current_device(dtype)
        video = getattr(base.config, "video_token_id", None)
        return cls(
            FlopModel.from_model(base),
            peak,
            image_token_id=int(base.config.image_token_id),
            video_token_id=None if video is None else int(video),
            recompute=bool(args is not None and getattr(args, "gradient_checkpointing", False)),
        )

    def start(self) -> None:
        """Start the first interval now (otherwise it starts at the first `observe`)."""
        self._start = self.clock()
        self._cpu_start = self.cpu_clock()
        self._excluded = 0.0

    def observe(self, batch: Mapping[str, Any]) -> None:
        """Add one micro-batch's statistics (device-side; no host sync)."""
        if self._start is None:
            self.start()
        stats = batch_stats(batch, self.image_token_id, self.video_token_id)
        if self._totals is None:
            self._totals = stats
        else:
            self._totals = {k: self._totals[k] + v.to(self._totals[k].device) for k, v in stats.items()}

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (e.g. an evaluation pass) out of the current interval's wall time."""
        self._excluded += max(0.0, seconds)

    def interval_start(self) -> float | None:
        """Clock reading at which the current interval started (None before the first observe)."""
        return self._start

    def flush(self) -> dict[str, float]:
        """Log keys for the interval since the last flush; syncs the device once. {} when nothing was observed.

        With several ranks every rank joins the same collectives, even one that observed nothing,
        so a rank with an empty interval cannot leave the others waiting.
        """
        totals, start, cpu_start = self._totals, self._start, self._cpu_start
        now, cpu_now = self.clock(), self.cpu_clock()
        self._totals, self._start, self._excluded, excluded = None, now, 0.0, self._excluded
        self._cpu_start = cpu_now
        world = _dist_world()
        if totals is None and world == 1:
            return {}
        if totals is None:
            counts = torch.zeros(len(STAT_KEYS), dtype=torch.float64)
        else:
            counts = torch.stack([totals[k].to(torch.float64) for k in STAT_KEYS])  # [len(STAT_KEYS)]
        if world > 1:
            counts = counts.to(collective_device())
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM)
        memory = _peak_memory_gb(world)
        if totals is None or start is None:
            return {}
        stats = dict(zip(STAT_KEYS, counts.tolist()))
        seconds = max(now - start - excluded, 1e-9)
        out = {
            "tokens_per_s": stats["real_tokens"] / seconds,
            "trained_tokens_per_s": stats["trained_tokens"] / seconds,
            "samples_per_s": stats["samples"] / seconds,
            "images_per_s": stats["images"] / seconds,
            "padding_efficiency": stats["real_tokens"] / max(stats["padded_tokens"], 1.0),
            "image_token_fraction": stats["image_tokens"] / max(stats["real_tokens"], 1.0),
        }
        self.last_interval = {**stats, "seconds": seconds, "cpu_seconds": cpu_now - cpu_start}
        if self.flops is not None and self.peak_flops:
            capacity = seconds * self.peak_flops * world
            model_flops = self.flops.flops_per_step(stats)
            out["mfu"] = model_flops / capacity
            if self.recompute:  # the forward that activation checkpointing runs again: hardware work, not model work
                out["hfu"] = (model_flops + self.flops.recompute_flops_per_step(stats)) / capacity
        if memory is not None:
            out["gpu_mem_peak_gb"] = memory
        return out


def _peak_memory_gb(world: int) -> float | None:
    """Peak CUDA memory allocated since the last call, max over ranks, in GB (1e9 bytes); None without CUDA."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    peak = torch.tensor(float(torch.cuda.max_memory_allocated()), dtype=torch.float64)
    torch.cuda.reset_peak_memory_stats()
    if world > 1:
        peak = peak.to(collective_device())
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    return float(peak.item()) / 1e9
