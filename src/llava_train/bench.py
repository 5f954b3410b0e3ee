"""`llava-train bench`: tokens/s, MFU, memory and data wait of the real LLaVATrainer step on a synthetic LLaVA mix.

Each mode builds a fresh random-init model from the preset, wraps it in LLaVATrainer with the
real collators and samplers, trains `warmup + steps` optimizer steps on synthetic samples (token
ids + random pixel tensors, no JPEG decode) and reports the last `steps`. One JSON line per mode,
then a summary line `{"preset", "ratio", "packed_ratio", "ours_mfu", "hf_padded_mfu"}`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import resource
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.utils.data import Dataset

from llava_train.model.vision import image_tokens
from llava_train.utils.attention import sdpa_backends
from llava_train.utils.modules import IGNORE_INDEX

BOS_ID = 1
PAD_ID = 0


@dataclass(frozen=True)
class BenchPreset:
    """A model + data + batch shape to benchmark.

    text: LlamaConfig kwargs of the language model (its last vocabulary id is the image token).
    vision: CLIPVisionConfig kwargs of the vision tower (CLS dropped: (size // patch)^2 tokens per image).
    stage: `pretrain` (projector trains) or `finetune` (projector + LM + lm_head train).
    mix: `665k` (llava_v1_5_mix665k-like) or `stage1` (one image + 20-60 caption tokens).
    batch_size: samples per micro-batch in the padded modes.
    packing_length, rows: tokens per packed row and rows per micro-batch in the packed modes.
    steps, warmup: measured optimizer steps and untimed steps before them.
    num_samples: synthetic dataset size (enough that no mode runs out within one epoch).
    max_length: longest sample (model_max_length).
    length_scale: multiplies every text length of the mix (medians, caption range, minimum).
    dtype: weight dtype (`float32` = fp32 master weights under bf16 autocast when `bf16`).
    bf16: mixed precision (TrainingArguments.bf16).
    baseline_checkpointing: activation checkpointing in hf-padded / grouped / packed (as the
        measured HF-native baseline); `ours` turns it off.
    num_workers: DataLoader worker processes.
    """

    text: dict[str, Any]
    vision: dict[str, Any]
    stage: str
    mix: str
    batch_size: int
    packing_length: int
    rows: int
    steps: int
    warmup: int
    num_samples: int
    max_length: int = 2048
    length_scale: float = 1.0
    dtype: str = "float32"
    bf16: bool = False
    baseline_checkpointing: bool = False
    num_workers: int = 0


_CLIP_L_336 = {
    "image_size": 336,
    "patch_size": 14,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "projection_dim": 768,
}
_LLAMA = {"vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}

PRESETS: dict[str, BenchPreset] = {
    # The 665k mix at 1/4 scale (144 image tokens, text medians 30 / 125, rows of 512): with a
    # 256-wide LM, attention then costs about what it does relative to the matmuls in a 1B model at
    # full scale (~L / (6 d)); at full scale a tiny LM is attention-bound, unlike any real one.
    "cpu-tiny": BenchPreset(
        text={
            **_LLAMA,
            "vocab_size": 4096,
            "hidden_size": 256,
            "intermediate_size": 688,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        vision={
            "image_size": 48,
            "patch_size": 4,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        stage="finetune",
        mix="665k",
        length_scale=0.25,
        max_length=512,
        batch_size=8,
        packing_length=512,
        rows=3,
        steps=8,
        warmup=2,
        num_samples=1024,
    ),
    # The same at full scale (576 image tokens, rows of 2048): attention-bound on CPU, see above.
    "cpu-tiny-576": BenchPreset(
        text={
            **_LLAMA,
            "vocab_size": 8000,
            "hidden_size": 128,
            "intermediate_size": 344,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        vision={
            "image_size": 96,
            "patch_size": 4,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        stage="finetune",
        mix="665k",
        batch_size=8,
        packing_length=2048,
        rows=3,
        steps=4,
        warmup=1,
        num_samples=256,
    ),
    "gpu-1b-finetune": BenchPreset(
        text={
            **_LLAMA,
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 22,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
        },
        vision=_CLIP_L_336,
        stage="finetune",
        mix="665k",
        batch_size=8,
        packing_length=4096,
        rows=2,
        steps=10,
        warmup=3,
        num_samples=4096,
        dtype="float32",
        bf16=True,
        baseline_checkpointing=True,
        num_workers=4,
    ),
    "gpu-7b-pretrain": BenchPreset(
        text={
            **_LLAMA,
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
        },
        vision=_CLIP_L_336,
        stage="pretrain",
        mix="stage1",
        batch_size=16,
        packing_length=5120,
        rows=2,
        steps=8,
        warmup=3,
        num_samples=4096,
        dtype="bfloat16",
        bf16=True,
        baseline_checkpointing=True,
        num_workers=4,
    ),
}


@dataclass(frozen=True)
class ModeSpec:
    """How one bench mode batches and computes the loss.

    batching: `random` (HF's random sampler, padded), `grouped` (HF's length-grouped sampler,
        padded), `packed` (best-fit packed rows).
    fixed_rows: pad every packed row to `packing_length` (one shape for the whole run).
    trained_only_loss: lm_head + loss only on trained positions (`perf.loss_on_trained_only`).
    checkpointing: activation checkpointing (None = the preset's baseline setting).
    sdpa_backends: SDPA backends allowed on CUDA (empty = PyTorch's choice).
    attn: attention implementation.
    """

    batching: str
    fixed_rows: bool = False
    trained_only_loss: bool = False
    checkpointing: bool | None = None
    sdpa_backends: tuple[str, ...] = field(default_factory=tuple)
    attn: str = "sdpa"


MODES: dict[str, ModeSpec] = {
    "hf-padded": ModeSpec(batching="random"),
    "grouped": ModeSpec(batching="grouped"),
    "packed": ModeSpec(batching="packed"),
    "ours": ModeSpec(
        batching="packed",
        fixed_rows=True,
        trained_only_loss=True,
        checkpointing=False,
        sdpa_backends=("flash", "efficient"),
    ),
    # Opt-in (GPU): block-sparse flex attention for packed rows; not in the default mode list.
    "ours-flex": ModeSpec(
        batching="packed", fixed_rows=True, trained_only_loss=True, checkpointing=False, attn="flex_attention"
    ),
}
DEFAULT_MODES = ("hf-padded", "grouped", "packed", "ours")


def get_preset(name: str) -> BenchPreset:
    """The preset called `name`; an unknown name raises KeyError listing the valid ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown bench preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def parse_modes(text: str | None) -> list[str]:
    """`hf-padded,ours` -> ["hf-padded", "ours"]; None = the default modes; unknown names list the valid ones."""
    if not text:
        return list(DEFAULT_MODES)
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise KeyError(f"unknown bench mode(s) {', '.join(unknown)}; valid modes: {', '.join(MODES)}")
    return modes


# -- synthetic data ------------------------------------------------------------------------------


def image_tokens_per_image(preset: BenchPreset) -> int:
    """Feature tokens per image: the one formula (`model.vision.image_tokens`) on the preset's CLIP tower."""
    from transformers import CLIPVisionConfig

    return image_tokens(CLIPVisionConfig(**preset.vision), "patch")


def synthetic_layout(preset: BenchPreset, seed: int = 0) -> list[tuple[int, int, int]]:
    """(images, text tokens, trained tokens) per sample, deterministic in the seed.

    665k: 94% one image + lognormal text (median 120 tokens, sigma 1.0), 6% text-only lognormal
    (median 500, sigma 0.8); 60% of the text is answer tokens (trained). stage1: one image +
    uniform 20-60 caption tokens, all trained. Text lengths are multiplied by `length_scale`.
    Every sample fits `max_length` (BOS included).
    """
    g = torch.Generator().manual_seed(seed)
    n_img = image_tokens_per_image(preset)
    out = []
    for _ in range(preset.num_samples):
        u = float(torch.rand((), generator=g))
        z = float(torch.randn((), generator=g))
        s = preset.length_scale
        if preset.mix == "stage1":
            text = max(1, round(s * (20 + int(torch.randint(0, 41, (), generator=g)))))
            out.append((1, text, text))
            continue
        if preset.mix != "665k":
            raise KeyError(f"unknown mix {preset.mix!r}; valid mixes: 665k, stage1")
        images = 1 if u < 0.94 else 0
        median, sigma = (120, 1.0) if images else (500, 0.8)
        room = preset.max_length - 1 - images * n_img
        text = max(round(16 * s), min(room, round(s * median * math.exp(sigma * z))))
        out.append((images, text, max(1, int(0.6 * text))))
    return out


class SyntheticMix(Dataset):
    """Dataset items like `LlavaDataset`'s: BOS + image tokens + text; labels on the trailing answer tokens.

    `lengths` / `modality_lengths` are exact (what the samplers use); every image is the same random
    tensor (decoding is not what the bench measures; `data_wait_fraction` reports the loader cost).
    """

    def __init__(self, preset: BenchPreset, image_token_id: int, seed: int = 0) -> None:
        self.layout = synthetic_layout(preset, seed)
        self.n_img = image_tokens_per_image(preset)
        self.image_token_id = image_token_id
        self.vocab = preset.text["vocab_size"]
        self.seed = seed
        size = preset.vision["image_size"]
        self.image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
        self.lengths = [1 + k * self.n_img + t for k, t, _ in self.layout]
        self.modality_lengths = [n if k else -n for n, (k, _, _) in zip(self.lengths, self.layout, strict=True)]

    def __len__(self) -> int:
        return len(self.layout)

    def __getitem__(self, i: int) -> dict[str, Any]:
        images, text, trained = self.layout[i]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        words = torch.randint(3, self.image_token_id, (text,), generator=g)
        ids = torch.cat([torch.tensor([BOS_ID]), torch.full((images * self.n_img,), self.image_token_id), words])
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[-trained:] = ids[-trained:]
        item: dict[str, Any] = {"input_ids": ids, "labels": labels, "num_images": images, "id": i}
        if images:
            item["pixel_values"] = self.image.expand(images, -1, -1, -1)
        return item


# -- model ---------------------------------------------------------------------------------------


def build_bench_model(preset: BenchPreset, attn: str = "sdpa", seed: int = 0) -> Any:
    """Random-init LlavaForConditionalGeneration of the preset, on CUDA when available, with the stage applied."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from llava_train.model.freeze import set_trainable
    from llava_train.stages import get_stage

    text = LlamaConfig(**preset.text, bos_token_id=BOS_ID, pad_token_id=PAD_ID, eos_token_id=2)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**preset.vision),
        text_config=text,
        image_token_id=preset.text["vocab_size"] - 1,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(
            cfg, attn_implementation=attn, dtype=getattr(torch, preset.dtype)
        )
    set_trainable(model, get_stage(preset.stage).trainable)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # optimizer state and updates in fp32 (bf16 autocast does the math)
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
                "images": images,
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
        )
        if profile:
            record["top_ops"] = _top_ops(prof, active_steps=2)
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return record


def _record(
    preset_name: str, mode: str, preset: BenchPreset, trainer: Any, log: _BatchLog, flops: Any, peak: float | None
) -> dict[str, Any]:
    marks = trainer.step_marks[: preset.warmup + preset.steps]  # profiled steps come after these
    (t0, b0, w0, c0), (t1, b1, w1, c1) = marks[preset.warmup - 1], marks[-1]
    seconds = t1 - t0
    rows = log.rows[b0:b1]
    stats = {k: sum(float(r[k]) for r in rows) for k in rows[0] if k != "trained_tokens"}
    stats["trained_tokens"] = float(sum(r["trained_tokens"] for r in rows))  # one device sync, after timing
    mfu = flops.flops_per_step(stats) / (seconds * peak) if peak else None
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


def main(args: argparse.Namespace, extra: list[str]) -> int:
    """`llava-train bench --preset P [--modes a,b] [--steps N] [--profile]`: one JSON line per mode, then the summary.

    --profile adds each mode's top-5 ops (torch.profiler, two extra steps after the timed ones) as `top_ops`.
    --batch-size, --packing-length, --rows, --warmup override the preset (e.g. to fit memory).
    --repeat R runs R interleaved rounds of all modes and keeps each mode's fastest round (its line
    then lists every round's tokens/s): the way to measure on a CPU host shared with other jobs.
    --threads N sets torch's CPU threads (default 1 without CUDA: with one thread no OpenMP thread
    spins waiting for a preempted sibling, so CPU time measures the work exactly on a shared host).
    """
    import logging
    import os

    more = argparse.ArgumentParser(prog="llava-train bench", add_help=False)
    more.add_argument("--profile", action="store_true")
    more.add_argument("--repeat", type=int, default=1)
    more.add_argument("--threads", type=int, default=None)
    for name in ("batch_size", "packing_length", "rows", "warmup"):
        more.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None)
    opts, unknown = more.parse_known_args(extra)
    if unknown:
        raise SystemExit(f"llava-train bench: unknown arguments {' '.join(unknown)}")
    try:
        preset = get_preset(args.preset)
        modes = parse_modes(args.modes)
    except KeyError as e:
        raise SystemExit(f"llava-train bench: {e.args[0]}") from e
    overrides = {k: getattr(opts, k) for k in ("batch_size", "packing_length", "rows", "warmup")}
    preset = replace(preset, **{k: v for k, v in overrides.items() if v is not None})
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    threads = torch.get_num_threads()
    if opts.threads is not None or not torch.cuda.is_available():
        torch.set_num_threads(opts.threads or 1)
    try:
        records = run_rounds(args.preset, preset, modes, args.steps, opts.repeat, opts.profile)
    finally:
        torch.set_num_threads(threads)  # main() also runs inside tests and other tools' processes
    print(json.dumps(summary(args.preset, records)), flush=True)
    return 0


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
