"""`llava-train bench`: tokens/s, MFU, memory and data wait of the real LLaVATrainer step on a synthetic LLaVA mix.

Each mode builds a fresh random-init model from the preset, wraps it in LLaVATrainer with the
real collators and samplers, trains `warmup + steps` optimizer steps on synthetic samples and
reports the last `steps`. One JSON line per mode, then a summary line
`{"preset", "ratio", "packed_ratio", "ours_mfu", "hf_padded_mfu"}`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import resource
import tempfile
import time
from dataclasses import replace
from typing import Any

import torch

from llava_train.tools.bench.mix import SyntheticMix, bench_geometry
from llava_train.tools.bench.presets import BOS_ID, MODES, PAD_ID, BenchPreset, get_preset, parse_modes
from llava_train.utils.attention import sdpa_backends
from llava_train.utils.modules import IGNORE_INDEX


def build_bench_model(preset: BenchPreset, attn: str = "sdpa", seed: int = 0) -> Any:
    """Random-init model of the preset's arch (LLaVA-1.5 / NeXT / OneVision), on CUDA when available, with the
    stage applied."""
    import transformers
    from transformers import CLIPVisionConfig, LlamaConfig

    from llava_train.model.builder import ARCH_CLASSES, model_class
    from llava_train.model.freeze import set_trainable
    from llava_train.stages import get_stage

    text = LlamaConfig(**preset.text, bos_token_id=BOS_ID, pad_token_id=PAD_ID, eos_token_id=2)
    fields: dict[str, Any] = {}
    if preset.arch != "llava":
        fields["image_grid_pinpoints"] = [list(p) for p in bench_geometry(preset).pinpoints]
    cfg = getattr(transformers, ARCH_CLASSES[preset.arch][0])(
        vision_config=CLIPVisionConfig(**preset.vision),
        text_config=text,
        image_token_id=preset.text["vocab_size"] - 1,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        **fields,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_class(preset.arch)._from_config(
            cfg, attn_implementation=attn, dtype=getattr(torch, preset.dtype)
        )
    if preset.lora_r:
        # The run's own LoRA wrapping and stage (adapters + projector train), as `lora.enabled` builds it.
        from llava_train.config import from_dict
        from llava_train.model.lora import apply_lora
        from llava_train.stages import apply_stage

        cfg = from_dict(
            {"stage": preset.stage, "lora": {"enabled": True, "r": preset.lora_r, "alpha": 2 * preset.lora_r}}
        )
        model = apply_lora(model, cfg)
        apply_stage(model, cfg)
    else:
        set_trainable(model, get_stage(preset.stage).trainable)
    # The run's own precision policy (fp32 masters of trainable weights, frozen ones in the preset's dtype).
    from llava_train.config import from_dict
    from llava_train.training.precision import apply_precision, resolve_precision

    run_cfg = from_dict({"stage": preset.stage, "model": {"dtype": preset.dtype}, "train": {"bf16": preset.bf16}})
    apply_precision(model, resolve_precision(run_cfg, uses_deepspeed=False))
    return model


# -- measurement ---------------------------------------------------------------------------------


class _BatchLog:
    """Per-micro-batch host counts, fed by LLaVATrainer's `tracker.observe` hook (no device sync)."""

    def __init__(self, dataset: SyntheticMix) -> None:
        self.dataset = dataset
        self.rows: list[dict[str, Any]] = []

    def observe(self, batch: dict[str, Any]) -> None:
        ids = list(batch["ids"])
        lengths = [self.dataset.lengths[i] for i in ids]
        images = sum(self.dataset.layout[i][0] for i in ids)
        self.rows.append(
            {
                "real_tokens": sum(lengths),
                "padded_tokens": int(batch["input_ids"].numel()),
                "trained_tokens": (batch["labels"][:, 1:] != IGNORE_INDEX).sum(),  # device tensor, summed at the end
                "samples": len(ids),
                "images": images * self.dataset.crops,  # crops through the tower (FLOPs)
                "image_tokens": images * self.dataset.n_img,
                "sum_sq_lengths": sum(n * n for n in lengths),
            }
        )


def _trainer_class() -> type:
    from llava_train.training.trainer import LLaVATrainer

    class BenchTrainer(LLaVATrainer):
        """LLaVATrainer plus a clock around batch fetching (the step itself is untouched)."""

        data_wait = 0.0
        step_marks: list[tuple[float, int, float, float]]

        def get_batch_samples(self, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return super().get_batch_samples(*args, **kwargs)
            finally:
                self.data_wait += time.perf_counter() - start

    return BenchTrainer


def _step_clock(trainer: Any, log: _BatchLog) -> Any:
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Records (time, micro-batches seen, data wait, process CPU time) at every step end, after a device sync."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            trainer.step_marks.append((time.perf_counter(), len(log.rows), trainer.data_wait, time.process_time()))

    return StepClock()


def _profiler(trainer: Any, warmup: int) -> Any:
    """torch.profiler over the two optimizer steps after the first `warmup` ones, stepped by a callback."""
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import TrainerCallback

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities, schedule=schedule(wait=warmup, warmup=0, active=2, repeat=1))

    class Step(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            prof.step()

    trainer.add_callback(Step())
    return prof


def _top_ops(prof: Any, active_steps: int, top: int = 5) -> list[dict[str, Any]]:
    """The `top` ops by self device time (self CPU time without CUDA), in ms per step and % of the total."""
    cuda = torch.cuda.is_available()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    total = sum(getattr(e, key) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return [
        {
            "op": e.key[:80],
            "ms_per_step": round(getattr(e, key) / 1e3 / active_steps, 2),
            "percent": round(100.0 * getattr(e, key) / total, 1),
        }
        for e in events[:top]
    ]


def run_mode(
    preset_name: str,
    mode: str,
    steps: int | None = None,
    seed: int = 0,
    preset: BenchPreset | None = None,
    profile: bool = False,
) -> dict[str, Any]:
    """Train `warmup + steps` optimizer steps of one mode with LLaVATrainer; returns its JSON record.

    preset: use this preset instead of `PRESETS[preset_name]` (tests shrink cpu-tiny further).
    profile: after the measured steps, run torch.profiler over two more steps and add `top_ops` (the
        five ops with the most self device time per step, CPU time without CUDA) to the record.
    """
    from transformers import PrinterCallback, TrainingArguments
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from llava_train.data.collator import PaddingCollator
    from llava_train.data.packing import PackedRows, PackingCollator
    from llava_train.training.flops import FlopModel, peak_flops_for_current_device

    preset = preset or get_preset(preset_name)
    spec = MODES[mode]
    if steps is not None:
        preset = replace(preset, steps=steps)
    if preset.warmup < 1 or preset.steps < 1:
        raise ValueError(f"bench needs warmup >= 1 and steps >= 1, got {preset.warmup} and {preset.steps}")
    model = build_bench_model(preset, attn=spec.attn, seed=seed)
    if spec.compile:
        from llava_train.training.compile import compile_regions

        compile_regions(model)
    dataset = SyntheticMix(preset, image_token_id=model.config.image_token_id, seed=seed)
    packed = spec.batching == "packed"
    checkpointing = preset.baseline_checkpointing if spec.checkpointing is None else spec.checkpointing
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="llava-bench-") as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=preset.warmup + preset.steps + (2 if profile else 0),
            learning_rate=1e-5,
            lr_scheduler_type="constant",
            per_device_train_batch_size=preset.rows if packed else preset.batch_size,
            gradient_accumulation_steps=1,
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            remove_unused_columns=False,
            disable_tqdm=True,
            bf16=preset.bf16,
            use_cpu=not cuda,
            seed=seed,
            dataloader_num_workers=preset.num_workers,
            dataloader_pin_memory=cuda,
            # The old name works on 5.17 and 5.24 (which only warns); pass it only when on.
            **(
                {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
                if checkpointing
                else {}
            ),
        )
        if packed:
            fixed = preset.packing_length if spec.fixed_rows else None
            collator: Any = PackingCollator(PAD_ID, pad_to_multiple_of=fixed)
            train_ds: Any = PackedRows(dataset)
        else:
            collator, train_ds = PaddingCollator(PAD_ID), dataset
        log = _BatchLog(dataset)
        trainer = _trainer_class()(
            model=model,
            args=args,
            train_dataset=train_ds,
            data_collator=collator,
            tracker=log,
            modality_lengths=dataset.modality_lengths,
            group_by_modality_length=spec.batching == "grouped",
            packing_length=preset.packing_length if packed else None,
            loss_on_trained_only=spec.trained_only_loss,
        )
        trainer.step_marks = []
        if spec.batching == "grouped" and not packed:
            # HF's length grouping (megabatches of 50 batches sorted by length). LLaVA's modality
            # sampler sorts only within one optimizer step, which on one GPU is a single batch.
            sampler = LengthGroupedSampler(
                preset.batch_size, lengths=dataset.lengths, generator=torch.Generator().manual_seed(seed)
            )
            trainer._get_train_sampler = lambda *a, **k: sampler
        trainer.add_callback(_step_clock(trainer, log))
        trainer.remove_callback(PrinterCallback)  # its end-of-train dict would break the JSON-lines output
        prof = _profiler(trainer, preset.warmup + preset.steps) if profile else contextlib.nullcontext()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with sdpa_backends(spec.sdpa_backends), prof:
            trainer.train()
        record = _record(
            preset_name,
            mode,
            preset,
            trainer,
            log,
            FlopModel.from_model(model),
            peak_flops_for_current_device("bfloat16" if preset.bf16 else "float32"),
            checkpointing,
        )
        if profile:
            record["top_ops"] = _top_ops(prof, active_steps=2)
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return record


def _record(
    preset_name: str,
    mode: str,
    preset: BenchPreset,
    trainer: Any,
    log: _BatchLog,
    flops: Any,
    peak: float | None,
    checkpointing: bool = False,
) -> dict[str, Any]:
    marks = trainer.step_marks[: preset.warmup + preset.steps]  # profiled steps come after these
    (t0, b0, w0, c0), (t1, b1, w1, c1) = marks[preset.warmup - 1], marks[-1]
    seconds = t1 - t0
    rows = log.rows[b0:b1]
    stats = {k: sum(float(r[k]) for r in rows) for k in rows[0] if k != "trained_tokens"}
    stats["trained_tokens"] = float(sum(r["trained_tokens"] for r in rows))  # one device sync, after timing
    model_flops = flops.flops_per_step(stats)
    mfu = model_flops / (seconds * peak) if peak else None
    # HFU also counts the forward that activation checkpointing recomputes (hardware work, not model work)
    hardware = model_flops + (flops.recompute_flops_per_step(stats) if checkpointing else 0.0)
    hfu = hardware / (seconds * peak) if peak else None
    cuda = torch.cuda.is_available()
    return {
        "preset": preset_name,
        "mode": mode,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "steps": len(marks) - preset.warmup,
        "seconds": round(seconds, 3),
        # CPU seconds of this process (all threads): on a shared CPU host, unlike wall time, it does not
        # grow when other jobs take the cores. Data-loader worker processes are not included.
        "tokens_per_cpu_s": round(stats["real_tokens"] / max(c1 - c0, 1e-9), 1),
        "tokens_per_s": round(stats["real_tokens"] / seconds, 1),
        "trained_tokens_per_s": round(stats["trained_tokens"] / seconds, 1),
        "samples_per_s": round(stats["samples"] / seconds, 2),
        "mfu": None if mfu is None else round(mfu, 4),
        "hfu": None if hfu is None else round(hfu, 4),
        "checkpointing": bool(checkpointing),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
        "cpu_rss_high_water_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "padding_efficiency": round(stats["real_tokens"] / stats["padded_tokens"], 4),
        "data_wait_fraction": round((w1 - w0) / seconds, 4),
        "tokens_per_step": round(stats["real_tokens"] / max(len(marks) - preset.warmup, 1)),
    }


def summary(preset_name: str, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The last line: ours / hf-padded tokens/s (and packed / hf-padded), with both MFUs."""
    base = records.get("hf-padded")

    def ratio(mode: str, key: str = "tokens_per_s") -> float | None:
        if base is None or mode not in records:
            return None
        return round(records[mode][key] / base[key], 3)

    out = {
        "preset": preset_name,
        "ratio": ratio("ours"),
        "packed_ratio": ratio("packed"),
        "ours_mfu": records.get("ours", {}).get("mfu"),
        "hf_padded_mfu": base.get("mfu") if base else None,
    }
    if base is not None and base.get("device") == "cpu":
        # The same ratios in tokens per CPU second: what a shared CPU host can measure reliably.
        out["cpu_time_ratio"] = ratio("ours", "tokens_per_cpu_s")
        out["cpu_time_packed_ratio"] = ratio("packed", "tokens_per_cpu_s")
    return out


def run_rounds(
    preset_name: str, preset: BenchPreset, modes: list[str], steps: int | None, repeat: int = 1, profile: bool = False
) -> dict[str, dict[str, Any]]:
    """`repeat` interleaved rounds of all modes; prints and returns each mode's fastest record.

    Interleaving makes a burst of load on a shared host hit every mode, not just one.
    """
    records: dict[str, dict[str, Any]] = {}
    rounds: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(repeat):
        for mode in modes:
            rec = run_mode(preset_name, mode, steps=steps, preset=preset, profile=profile)
            rounds[mode].append(rec["tokens_per_s"])
            if mode not in records or rec["tokens_per_s"] > records[mode]["tokens_per_s"]:
                records[mode] = rec
            if r == repeat - 1:
                if repeat > 1:
                    records[mode]["tokens_per_s_rounds"] = rounds[mode]
                print(json.dumps(records[mode]), flush=True)
    return records


def bench(
    preset_name: str,
    modes: str | None = None,
    steps: int | None = None,
    profile: bool = False,
    repeat: int = 1,
    threads: int | None = None,
    overrides: dict[str, int | None] | None = None,
) -> dict[str, Any]:
    """Run the bench: one JSON line per mode on stdout, then the summary line (also returned).

    modes: comma-separated mode names (None: the default modes). profile: each mode's top-5 ops
    (torch.profiler, two extra steps after the timed ones) as `top_ops`. repeat: R interleaved rounds
    of all modes, keeping each mode's fastest (its line lists every round's tokens/s): the way to
    measure on a CPU host shared with other jobs. threads: torch's CPU threads (default 1 without CUDA:
    then no OpenMP thread spins waiting for a preempted sibling, so CPU time measures the work exactly
    on a shared host). overrides: preset fields (batch_size, packing_length, rows, warmup) to change.
    """
    preset = get_preset(preset_name)
    mode_list = parse_modes(modes)
    preset = replace(preset, **{k: v for k, v in (overrides or {}).items() if v is not None})
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    before = torch.get_num_threads()
    if threads is not None or not torch.cuda.is_available():
        torch.set_num_threads(threads or 1)
    try:
        records = run_rounds(preset_name, preset, mode_list, steps, repeat, profile)
    finally:
        torch.set_num_threads(before)  # bench() also runs inside tests and other tools' processes
    line = summary(preset_name, records)
    print(json.dumps(line), flush=True)
    return line
