"""Bench presets (model + data + batch shapes) and modes (how a run batches and computes the loss); the
synthetic mixes they train on are in `tools.bench.mix`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from llava_train.config_io import ConfigError

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
    arch: `model.arch` (llava, llava_next, llava_onevision); anyres archs use the arch's default
        pinpoints for the tower's crop.
    image_hw: (height, width) of every synthetic image (anyres archs: sets its crops and tokens; the
        665K mix's COCO images are mostly 480 x 640).
    lora_r: > 0 trains the LM through LoRA adapters of this rank on every LM linear (alpha = 2r, the
        LLaVA-1.5 LoRA recipe's ratio; the projector trains fully), as `lora.enabled` does in a run.
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
    arch: str = "llava"
    image_hw: tuple[int, int] = (480, 640)
    lora_r: int = 0


_CLIP_L_336 = {
    "image_size": 336,
    "patch_size": 14,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "projection_dim": 768,
}


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
# cpu-tiny with LLaVA-NeXT anyres: 480 x 640 images -> 2 x 2 grids of 48 px crops (5 crops, 594 tokens).
# LLaVA-NeXT-7B stage 2 (configs/llava-next-7b/finetune.yaml): Vicuna-7B + CLIP-L/336, anyres; a 480 x 640
# image is 5 crops and 2340 LM tokens, so rows of 8192 hold about 3 samples.
PRESETS["gpu-7b-next-finetune"] = replace(
    PRESETS["gpu-7b-pretrain"],
    text={**PRESETS["gpu-7b-pretrain"].text, "max_position_embeddings": 8192},
    stage="finetune",
    mix="665k",
    max_length=4096,
    batch_size=2,
    packing_length=8192,
    rows=1,
    steps=6,
    warmup=2,
    num_samples=2048,
    arch="llava_next",
)
# LLaVA-1.5-7B LoRA stage 2 (configs/llava-1.5-7b/finetune_lora.yaml): r=128 on every LM linear, bf16 base
# weights frozen (their backward computes input gradients only), the 665K-like mix in packed rows.
PRESETS["gpu-7b-lora-finetune"] = replace(
    PRESETS["gpu-7b-pretrain"],
    stage="finetune",
    mix="665k",
    batch_size=8,
    packing_length=4096,
    rows=2,
    steps=8,
    warmup=3,
    lora_r=128,
)
PRESETS["cpu-tiny-lora"] = replace(PRESETS["cpu-tiny"], lora_r=8)
PRESETS["cpu-tiny-next"] = replace(
    PRESETS["cpu-tiny"],
    max_length=1024,
    batch_size=4,
    packing_length=1024,
    rows=2,
    steps=4,
    warmup=1,
    num_samples=512,
    arch="llava_next",
)


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
    compile: `perf.compile` (regional torch.compile of the tower's and the LM's layers).
    fsdp: train under FSDP2 (`train.fsdp`, the defaults of configs/fsdp/fsdp2.yaml), also with one process. It
        changes accelerate's process-wide state: bench it alone (`--modes ours-fsdp2`) or last.
    """

    batching: str
    fixed_rows: bool = False
    trained_only_loss: bool = False
    checkpointing: bool | None = None
    sdpa_backends: tuple[str, ...] = field(default_factory=tuple)
    attn: str = "sdpa"
    compile: bool = False
    fsdp: bool = False


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

# Opt-in: ours with perf.compile (compiles once: every packed row has one shape).
MODES["ours-compile"] = replace(MODES["ours"], compile=True)
MODES["ours-fsdp2"] = replace(MODES["ours"], fsdp=True)

DEFAULT_MODES = ("hf-padded", "grouped", "packed", "ours")


def get_preset(name: str) -> BenchPreset:
    """The preset called `name`; an unknown name raises KeyError listing the valid ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown bench preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def parse_modes(text: str | None) -> list[str]:
    """`hf-padded,ours` -> ["hf-padded", "ours"]; None = the default modes; unknown names list the valid ones."""
    if not text:
        return list(DEFAULT_MODES)
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ConfigError(f"unknown bench mode(s) {', '.join(unknown)}; valid modes: {', '.join(MODES)}")
    return modes


# -- synthetic data ------------------------------------------------------------------------------
