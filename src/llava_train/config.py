"""Typed run configuration: YAML -> documented dataclasses -> `key=value` overrides -> validated, resolved config.

This module must not import torch or transformers: `llava-train plan`, `config --help` and the sweep
runner read configs on machines (and in processes) where importing the training stack is too slow.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llava_train.archs import ARCHS, DEFAULT_ASPECT_RATIO, check_aspect_ratio, check_pinpoints

# The data section lives in config_data.py; its names stay importable from here (`X as X`: re-exported).
from llava_train.config_data import TEMPLATES as TEMPLATES
from llava_train.config_data import ColumnsConfig as ColumnsConfig
from llava_train.config_data import DataConfig
from llava_train.config_data import SourceConfig as SourceConfig
from llava_train.config_eval import EvalConfig
from llava_train.config_io import ConfigError, apply_overrides, build, check_choice, describe, load_yaml
from llava_train.run_files import CONFIG_FILENAME as CONFIG_FILENAME
from llava_train.run_files import METRICS_FILENAME as METRICS_FILENAME
from llava_train.stages import STAGES

FEATURE_SELECTS = ("patch", "cls_patch")
TINY_PRESETS = ("tiny", "tiny_chatml")
NAN_POLICIES = ("error", "skip")
PROJECTORS = ("mlp2x_gelu",)
DTYPES = ("bfloat16", "float16", "float32")
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "sigmoid_sft")
DPO_REFERENCES = ("frozen", "precomputed", "adapter")
# Files of a run folder that more than one module reads or writes.


@dataclass
class ModelConfig:
    """Which models make up the LLaVA model and how they are joined.

    language_model: hub id or local folder of a causal LM (tokenizer comes from here unless
        `tokenizer` is set).
    tokenizer: hub id or local folder of the tokenizer, if not the language model's.
    vision_tower: hub id or local folder of a CLIP or SigLIP model (vision part is used).
    projector: projector type; `mlp2x_gelu` = transformers' LlavaMultiModalProjector.
    vision_feature_layer: hidden layer of the vision tower whose features are projected.
    vision_feature_select: `patch` drops the CLS token (LLaVA-1.5), `cls_patch` keeps it.
    preset: `tiny` (Llama-style LM + CLIP) or `tiny_chatml` (Qwen2-style LM + SigLIP) writes a tiny
        random-init LM (+ trained tokenizer) and vision tower into the `language_model` /
        `vision_tower` folders when they do not exist yet (tests, demo, bench).
    init_from: what the run starts from (a folder, file or hub id; the kind is detected from its
        files, see `model.init_source`): a HF-native LLaVA model (ours or llava-hf); an original-format
        LLaVA-1.5 checkpoint (e.g. liuhaotian/llava-v1.5-7b; the vision tower comes from `vision_tower`
        unless the checkpoint holds one); an original stage-1 `mm_projector.bin` or our stage-1
        `projector.safetensors` (LM and vision tower then come from `language_model` / `vision_tower`).
        The original config's tower, select layer / feature, projector type and recorded `version`
        must match this config.
    attn_implementation: `sdpa` (default), `eager`, `flex_attention` (GPU), `flash_attention_2`.
    dtype: dtype of frozen parameters and of the final folder. Trainable ones are fp32 masters (fp32 AdamW
        state; DeepSpeed's own under DeepSpeed) computed under `train.bf16`/`fp16` autocast, which bfloat16/float16
        needs (`llava_train.training.precision`); checkpoints hold the masters.
    master_weights: false = pure bf16/fp16 outside DeepSpeed (trainable weights and AdamW state in `dtype`: less
        memory, and every update below half an ulp lost: ~70% at lr 2e-5); warned at start-up.
    train_vision_tower: also train the vision tower in `finetune` (frozen otherwise).
    vision_tower_train_from_layer: with train_vision_tower, train encoder layers >= this index.
    image_token: the image placeholder token of the tokenizer (added when missing) and the saved processor.
        Data keeps LLaVA's `<image>` tag (the token itself is accepted too); prompts use this token.
    arch: `llava` (LLaVA-1.5: one crop per image, LlavaForConditionalGeneration), `llava_next`
        (LLaVA-NeXT anyres grids + image newline, LlavaNextForConditionalGeneration) or
        `llava_onevision` (anyres_max_N, multi-image and video, LlavaOnevisionForConditionalGeneration).
    image_grid_pinpoints: anyres grid resolutions as [height, width] pixel pairs (null = the arch's
        own in units of the tower's crop S: NeXT [1,2],[2,1],[2,2],[3,1],[1,3] x S; OneVision every
        [i,j] x S for i, j in 1..6).
    video_token: OneVision's video placeholder token (added to the tokenizer when missing).
    """

    language_model: str = "lmsys/vicuna-7b-v1.5"
    tokenizer: str | None = None
    vision_tower: str = "openai/clip-vit-large-patch14-336"
    projector: str = "mlp2x_gelu"
    vision_feature_layer: int = -2
    vision_feature_select: str = "patch"
    preset: str | None = None
    init_from: str | None = None
    attn_implementation: str = "sdpa"
    dtype: str = "bfloat16"
    master_weights: bool = True
    train_vision_tower: bool = False
    vision_tower_train_from_layer: int = 0
    image_token: str = "<image>"
    arch: str = "llava"
    image_grid_pinpoints: list[list[int]] | None = None
    video_token: str = "<video>"

    def __post_init__(self) -> None:
        check_choice("model.arch", self.arch, ARCHS)
        if self.image_grid_pinpoints is not None:
            self.image_grid_pinpoints = check_pinpoints(self.image_grid_pinpoints)
        check_choice("model.projector", self.projector, PROJECTORS)
        check_choice("model.vision_feature_select", self.vision_feature_select, FEATURE_SELECTS)
        check_choice("model.dtype", self.dtype, DTYPES)
        check_choice(
            "model.attn_implementation",
            self.attn_implementation,
            ("sdpa", "eager", "flex_attention", "flash_attention_2"),
        )
        if self.preset is not None:
            check_choice("model.preset", self.preset, TINY_PRESETS)


@dataclass
class OptimConfig:
    """Per-module learning rates (the main lr is `train.learning_rate`).

    projector_lr: learning rate of the multimodal projector (null = train.learning_rate).
    vision_tower_lr: learning rate of the vision tower when it trains (null = train.learning_rate).
    """

    projector_lr: float | None = None
    vision_tower_lr: float | None = None


@dataclass
class LoraConfig:
    """LoRA / QLoRA on the language model's linear layers only.

    enabled: wrap the language model with peft LoRA adapters.
    r, alpha, dropout: adapter rank, scaling numerator and dropout (LLaVA-1.5: 128 / 256 / 0.05).
    bits: null = LoRA on bf16/fp32 weights; 4 or 8 = QLoRA through bitsandbytes (CUDA only).
    target_modules: linear-layer name suffixes inside the language model (null = every linear
        layer of the language model; lm_head and the projector are never adapted).
    """

    enabled: bool = False
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    bits: int | None = None
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        if self.bits is not None:
            check_choice("lora.bits", self.bits, (4, 8))
        if self.r <= 0:
            raise ConfigError(f"lora.r must be > 0, got {self.r}")


@dataclass
class WandbConfig:
    """wandb run metadata (used when `train.report_to` includes wandb).

    project, entity, name, group, tags: as in `wandb.init`; name defaults to the output folder's name.
    log_predictions: number of held-out samples logged as a prediction table at eval/end.
    """

    project: str = "llava-train"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    log_predictions: int = 8


@dataclass
class PerfConfig:
    """Throughput settings that never change the objective (see docs/performance.md).

    loss_on_trained_only: run lm_head and the fp32 cross entropy only on positions whose shifted
        label trains (image tokens, prompts and padding never reach lm_head); same loss and
        gradients as HF's path. On CUDA with `liger-kernel` installed the projection and loss use
        Liger's fused linear cross entropy (Liger's other kernels: `train.use_liger_kernel`).
    loss_chunk_size: trained positions per lm_head + cross-entropy chunk (bounds the [chunk, V]
        fp32 logits alive at once).
    sdpa_backends: restrict PyTorch SDPA on CUDA to these backends (`flash`, `efficient`, `cudnn`,
        `math`); empty = PyTorch's choice. cuDNN re-plans for every new sequence length, so
        `[flash, efficient]` helps batches whose length varies.
    compile: regional `torch.compile` of every vision-tower and language-model layer (`training.compile`);
        compiles once with packed rows (`data.packing`), not with ZeRO-3.
    compile_options: `torch.compile` keyword arguments for it (e.g. `{mode: max-autotune-no-cudagraphs}`).
    static_shapes: with `data.packing`, pad every packed row to `packing_length` (one shape for the run: no
        recompiles, no allocator churn; the bench's `ours` mode).
    """

    loss_on_trained_only: bool = True
    loss_chunk_size: int = 4096
    sdpa_backends: list[str] = field(default_factory=list)
    compile: bool = False
    compile_options: dict[str, Any] = field(default_factory=dict)
    static_shapes: bool = False

    def __post_init__(self) -> None:
        if self.loss_chunk_size <= 0:
            raise ConfigError(f"perf.loss_chunk_size must be > 0, got {self.loss_chunk_size}")
        for name in self.sdpa_backends:
            check_choice("perf.sdpa_backends[]", name, SDPA_BACKENDS)


@dataclass
class DpoConfig:
    """Preference optimisation (stage `dpo`; see `training.dpo`).

    beta: DPO's beta: the strength of the KL pull towards the reference (rewards are beta x log-ratio).
    loss: `sigmoid` (DPO), `ipo` (IPO, log-ratios averaged per reply token as TRL does), `hinge` (SLiC),
        `sigmoid_sft` (DPO + `sft_weight` x the chosen reply's mean token NLL, as RLAIF-V / MPO).
    sft_weight: weight of the SFT term of `sigmoid_sft`.
    reference: `frozen` (a frozen copy of the starting model; not under ZeRO-3), `precomputed` (reference
        log-probs of every pair computed by the starting model before the first step, on every rank in step,
        and kept in the run folder for resume) or `adapter` (with LoRA: the model with its adapters disabled).
    """

    beta: float = 0.1
    loss: str = "sigmoid"
    sft_weight: float = 1.0
    reference: str = "frozen"

    def __post_init__(self) -> None:
        check_choice("dpo.loss", self.loss, DPO_LOSSES)
        check_choice("dpo.reference", self.reference, DPO_REFERENCES)
        if not self.beta > 0:
            raise ConfigError(f"dpo.beta must be > 0, got {self.beta}")


@dataclass
class RunConfig:
    """A whole run: stage + model + data + optimizer + LoRA + wandb + perf + eval + TrainingArguments.

    stage: `pretrain` (projector only), `finetune` (projector + language model) or `dpo` (preference pairs,
        from a finetuned `model.init_from`; trains what finetune trains, or LoRA; settings in `dpo`).
    train: any `transformers.TrainingArguments` field, passed through untouched (output_dir,
        learning_rate, per_device_train_batch_size, deepspeed, bf16, ...), and llava-train's own
        `resume_from_checkpoint` (a path, or `auto` for the newest complete checkpoint), `nan_policy`
        (`error`: a non-finite loss or gradient stops the run naming its samples; `skip`: that step is
        skipped on every rank) and `max_skipped_steps` (with `skip`: stop after this many skipped steps in
        a row; default 10). `save_total_limit` keeps the newest N complete checkpoints. `export_hf: true` also
        writes `checkpoint-N/hf/`, an HF-native folder like the final one (off by default: a full model per
        checkpoint, where a stage-1 checkpoint is otherwise just the projector; LoRA merges rebuild the base);
        `eval.lmms_tasks` turns it on in `finetune`. `fsdp: <file>` trains under FSDP2 instead of DeepSpeed (a
        settings file under `configs/fsdp/`, `config_fsdp.FsdpSettings`; not HF's own `fsdp` argument).
    metrics_every: log the compact throughput line every N optimizer steps (0 = with each log).
    """

    stage: str = "pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    train: dict[str, Any] = field(default_factory=dict)
    metrics_every: int = 0

    def __post_init__(self) -> None:
        check_choice("stage", self.stage, tuple(STAGES))
        spec = STAGES[self.stage]
        if not isinstance(self.train, dict):
            raise ConfigError(
                f"`train` must be a mapping of TrainingArguments fields, got {type(self.train).__name__}"
            )
        if self.lora.enabled and not spec.lora_allowed:
            allowed = ", ".join(n for n, s in STAGES.items() if s.lora_allowed)
            raise ConfigError(f"lora.enabled is only valid with stage: {allowed}")
        if self.data.template is None:
            self.data.template = spec.default_template
        if self.data.image_aspect_ratio is None:
            self.data.image_aspect_ratio = DEFAULT_ASPECT_RATIO[self.model.arch]
        check_aspect_ratio(self.model.arch, self.data.image_aspect_ratio)
        check_choice("train.nan_policy", self.train.get("nan_policy", "error"), NAN_POLICIES)
        if not isinstance(self.train.get("export_hf", False), bool):
            raise ConfigError(f"train.export_hf must be true or false, got {self.train['export_hf']!r}")
        if spec.preference:
            self.check_dpo()
        if self.train.get("fsdp") and self.train.get("deepspeed"):
            raise ConfigError(
                "train.fsdp and train.deepspeed are two distributed engines: set one (train.deepspeed=null)"
            )
        skips = self.train.get("max_skipped_steps", 10)
        if not isinstance(skips, int) or isinstance(skips, bool) or skips < 0:
            raise ConfigError(f"train.max_skipped_steps must be an integer >= 0, got {skips!r}")

    def check_dpo(self) -> None:
        """What a preference stage needs: a finetuned start, LoRA for the adapter reference, no packing."""
        if not self.model.init_from:
            raise ConfigError(f"stage {self.stage} starts from a finetuned model: set model.init_from")
        if self.dpo.reference == "adapter" and not self.lora.enabled:
            raise ConfigError(
                "dpo.reference: adapter needs lora.enabled (the reference is the model without adapters)"
            )
        if self.data.packing:
            raise ConfigError(f"stage {self.stage} does not pack rows (data.packing: false): pairs are batched whole")

    @property
    def output_dir(self) -> str:
        """The run folder (`train.output_dir`)."""
        out = self.train.get("output_dir")
        if not out:
            raise ConfigError("train.output_dir is required (the run folder)")
        return str(out)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON/wandb-ready)."""
        return dataclasses.asdict(self)


# -- reading and writing run configs --------------------------------------------------------------


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from a nested dict."""
    return build(RunConfig, data, "")


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    """YAML file (optional) + overrides -> validated RunConfig."""
    data = load_yaml(path) if path is not None else {}
    apply_overrides(data, list(overrides or []))
    return from_dict(data)


def dump_config(config: RunConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (the run folder's `llava_train_config.yaml`)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return p


def config_reference() -> list[tuple[str, str, str]]:
    """(dotted key, type = default, documentation) of every run-config key (`llava-train config`)."""
    return describe(RunConfig)
