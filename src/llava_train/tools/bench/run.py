"""`llava-train bench`: tokens/s, MFU, memory and data wait of the real LLaVATrainer step on a synthetic LLaVA mix.

Each mode is a run config (`mode_config`); a fresh random-init model from the preset is prepared and wrapped by
the run's own trainer assembly (`training.assembly`: collator, sampler, loss, callbacks, throughput tracker),
trains `warmup + steps` optimizer steps on synthetic samples and reports the tracker's interval over the last
`steps` (the same figures the run logs to `metrics.jsonl`). One JSON line per mode, then a summary line
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
from transformers import TrainerCallback

from llava_train.config import RunConfig, from_dict
from llava_train.model.builder import ARCH_CLASSES, model_class
from llava_train.tools.bench.mix import SyntheticMix, bench_geometry
from llava_train.tools.bench.presets import BOS_ID, MODES, PAD_ID, BenchPreset, get_preset, parse_modes
from llava_train.train import build_training_arguments, setup_fsdp
from llava_train.training.assembly import assemble_trainer, prepare_model
from llava_train.training.precision import resolve_precision
from llava_train.training.trainer import LLaVATrainer
from llava_train.utils.attention import sdpa_backends


def build_bench_model(preset: BenchPreset, attn: str = "sdpa", seed: int = 0) -> Any:
    """Random-init model of the preset's arch (LLaVA-1.5 / NeXT / OneVision), on CUDA when available, prepared as a
    run prepares it (`training.assembly.prepare_model`: LoRA, the stage's trainable set, the precision policy)."""
    model = _random_model(preset, attn, seed)
    cfg = mode_config(preset, MODES["ours"], "unused", seed)
    return prepare_model(model, cfg, resolve_precision(cfg, uses_deepspeed=False))


def _random_model(preset: BenchPreset, attn: str, seed: int) -> Any:
    import transformers
    from transformers import CLIPVisionConfig, LlamaConfig

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
        return model_class(preset.arch)._from_config(cfg, attn_implementation=attn, dtype=getattr(torch, preset.dtype))


def mode_config(
    preset: BenchPreset,
    spec: Any,
    output_dir: str,
    seed: int = 0,
    extra_steps: int = 0,
    num_workers: int | None = None,
) -> RunConfig:
    """The run config a user would write for this mode: what `training.assembly` builds the trainer from.

    hf-padded / grouped / packed are HF-style baselines expressed as run settings (HF's random or length-grouped
    sampler, HF's loss over every position); `ours` is the recipe setting (packed rows of one shape, the
    trained-positions loss).
    """
    packed = spec.batching == "packed"
    checkpointing = preset.baseline_checkpointing if spec.checkpointing is None else spec.checkpointing
    cuda = torch.cuda.is_available()
    train: dict[str, Any] = {
        "output_dir": output_dir,
        "max_steps": preset.warmup + preset.steps + extra_steps,
        "learning_rate": 1e-5,
        "lr_scheduler_type": "constant",
        "per_device_train_batch_size": preset.rows if packed else preset.batch_size,
        "gradient_accumulation_steps": 1,
        "logging_strategy": "no",  # the bench asks for its two logs (end of warmup, end of the timed steps)
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "bf16": preset.bf16,
        "use_cpu": not cuda,
        "seed": seed,
        "dataloader_num_workers": preset.num_workers if num_workers is None else num_workers,
        "dataloader_pin_memory": cuda,
        # HF's length-grouped sampler (LLaVATrainer feeds it the exact lengths) or HF's random one.
        "train_sampling_strategy": "group_by_length" if spec.batching == "grouped" else "random",
    }
    if checkpointing:
        train.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.fsdp:
        train["fsdp"] = {"reshard_after_forward": True}  # configs/fsdp/fsdp2.yaml's settings, inline
    data = {
        "model_max_length": preset.max_length,
        "packing": packed,
        "packing_length": preset.packing_length if packed else None,
        "group_by_modality_length": False,
        "cache_dir": None,
    }
    perf = {
        "loss_on_trained_only": spec.trained_only_loss,
        "static_shapes": spec.fixed_rows,
        "sdpa_backends": list(spec.sdpa_backends),
        "compile": spec.compile,
    }
    lora = {"enabled": True, "r": preset.lora_r, "alpha": 2 * preset.lora_r} if preset.lora_r else {}
    model = {"arch": preset.arch, "dtype": preset.dtype, "attn_implementation": spec.attn}
    return from_dict({"stage": preset.stage, "model": model, "data": data, "perf": perf, "lora": lora, "train": train})


# -- measurement ---------------------------------------------------------------------------------


class BenchTrainer(LLaVATrainer):
    """LLaVATrainer plus a clock around batch fetching (the step itself is untouched)."""

    data_wait = 0.0

    def get_batch_samples(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return super().get_batch_samples(*args, **kwargs)
        finally:
            self.data_wait += time.perf_counter() - start


class _Window(TrainerCallback):
    """Asks for a training log at the end of warmup and at the end of the timed steps: the tracker's interval
    between those two logs is the measurement (the run's own `ThroughputCallback` flushes it into the log)."""

    def __init__(self, trainer: BenchTrainer, warmup: int, steps: int) -> None:
        self.trainer, self.marks = trainer, (warmup, warmup + steps)
        self.waits: dict[int, float] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step in self.marks:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            control.should_log = True
            self.waits[state.global_step] = self.trainer.data_wait


def _profiler(trainer: Any, warmup: int) -> Any:
    """torch.profiler over the two optimizer steps after the first `warmup` ones, stepped by a callback."""
    from torch.profiler import ProfilerActivity, profile, schedule

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
    output_dir: str | None = None,
) -> dict[str, Any]:
    """Train `warmup + steps` optimizer steps of one mode with the run's trainer assembly; returns its JSON record.

    The throughput figures are the training run's own: the `ThroughputTracker` interval between the logs at the
    end of warmup and at the end of the timed steps, the same line `metrics.jsonl` gets.
    preset: use this preset instead of `PRESETS[preset_name]` (tests shrink cpu-tiny further).
    profile: after the measured steps, run torch.profiler over two more steps and add `top_ops` (the
        five ops with the most self device time per step, CPU time without CUDA) to the record.
    output_dir: keep the run folder there (`metrics.jsonl`, ...); default a temporary folder.
    """
    preset = preset or get_preset(preset_name)
    spec = MODES[mode]
    if steps is not None:
        preset = replace(preset, steps=steps)
    if preset.warmup < 1 or preset.steps < 1:
        raise ValueError(f"bench needs warmup >= 1 and steps >= 1, got {preset.warmup} and {preset.steps}")
    cuda = torch.cuda.is_available()
    with contextlib.ExitStack() as stack:
        out = output_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="llava-bench-"))
        cfg = mode_config(preset, spec, out, seed, extra_steps=2 if profile else 0)
        args = build_training_arguments(cfg)
        policy = resolve_precision(cfg, uses_deepspeed=False)
        setup_fsdp(cfg, args, policy)  # the ours-fsdp2 mode; a no-op otherwise
        model = prepare_model(_random_model(preset, spec.attn, seed), cfg, policy)
        dataset = SyntheticMix(preset, image_token_id=model.config.image_token_id, seed=seed)
        trainer = assemble_trainer(cfg, args, model, dataset, None, pad_token_id=PAD_ID, trainer_cls=BenchTrainer)
        window = _Window(trainer, preset.warmup, preset.steps)
        trainer.add_callback(window)
        prof = _profiler(trainer, preset.warmup + preset.steps) if profile else contextlib.nullcontext()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with sdpa_backends(cfg.perf.sdpa_backends), prof:
            trainer.train()
        record = _record(preset_name, mode, preset, trainer, window, bool(args.gradient_checkpointing))
        if profile:
            record["top_ops"] = _top_ops(prof, active_steps=2)
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return record


def _record(
    preset_name: str, mode: str, preset: BenchPreset, trainer: Any, window: _Window, checkpointing: bool
) -> dict[str, Any]:
    """The bench line: the training log at the end of the timed steps, plus what only a bench knows."""
    last = window.marks[1]
    logged = next(h for h in trainer.state.log_history if h.get("step") == last and "tokens_per_s" in h)
    interval = trainer.tracker.last_interval  # the raw figures of that same log's interval
    seconds, steps = interval["seconds"], preset.steps
    cuda = torch.cuda.is_available()
    mfu = logged.get("mfu")
    return {
        "preset": preset_name,
        "mode": mode,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "steps": steps,
        "seconds": round(seconds, 3),
        # CPU seconds of this process (all threads): on a shared CPU host, unlike wall time, it does not
        # grow when other jobs take the cores. Data-loader worker processes are not included.
        "tokens_per_cpu_s": round(interval["real_tokens"] / max(interval["cpu_seconds"], 1e-9), 1),
        "tokens_per_s": round(logged["tokens_per_s"], 1),
        "trained_tokens_per_s": round(logged["trained_tokens_per_s"], 1),
        "samples_per_s": round(logged["samples_per_s"], 2),
        "mfu": None if mfu is None else round(mfu, 4),
        "hfu": None if mfu is None else round(logged.get("hfu", mfu), 4),
        "checkpointing": checkpointing,
        "peak_mem_gb": round(logged["gpu_mem_peak_gb"], 2) if "gpu_mem_peak_gb" in logged else None,
        "cpu_rss_high_water_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "padding_efficiency": round(logged["padding_efficiency"], 4),
        "data_wait_fraction": round((window.waits[last] - window.waits[window.marks[0]]) / seconds, 4),
        "tokens_per_step": round(interval["real_tokens"] / steps),
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
