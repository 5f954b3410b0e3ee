"""The one model-FLOP formula of llava-train (MFU logging and the throughput bench), and peak FLOP/s per GPU.

Model FLOPs count the useful matmul work of one optimizer step, walking the model in forward order
(vision tower -> projector -> language model -> lm_head) in blocks (embeddings, each transformer
layer, the rest). Per token that passes through a block:

- trainable parameters: 6 FLOPs per parameter (forward 2N, input gradient 2N, weight gradient 2N);
- frozen parameters with a trainable block at or before them (the gradient must flow through them,
  e.g. the frozen language model in stage 1, whose projector trains): 4 per parameter;
- frozen parameters with nothing trainable before them (the frozen vision tower): 2 per parameter
  (forward only).

Embedding tables are lookups, not matmuls, so they are not counted (an untied or tied lm_head is a
matmul and is counted). Self-attention adds, per layer and per sequence of length L,
QK^T and AV: 2 matmuls x 2 FLOPs x L^2 x d_attn = 4 L^2 d_attn forward (d_attn = heads x head_dim,
full L x L as in PaLM's MFU accounting, so figures compare with published ones; causal kernels skip
about half), x3 when the gradient flows through the layer. With packing, attention is block-diagonal,
so the term uses the sum over samples of L_i^2, never the packed row length squared.

Tokens per block: the language model and lm_head see every real token (image tokens included), the
projector sees every image token, the vision tower sees (patches + CLS) tokens per image.
Activation recomputation (gradient checkpointing) is not model FLOPs and is not counted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llava_train.model.builder import MODEL_TYPE_ARCH, model_class
from llava_train.model.freeze import MODULE_GROUPS, set_trainable
from llava_train.model.vision import has_cls, patches_per_side, tower_tokens
from llava_train.utils.modules import unwrap

STREAMS = ("vision", "projector", "text")
_LAYER = re.compile(r"\.layers\.\d+$")  # a decoder layer's block (what gradient checkpointing wraps)
# bf16 / fp16 dense tensor-core peak (no structured sparsity), FLOP/s. Sources: NVIDIA data sheets
# (H100/H200 data sheet, A100 data sheet, A10 / L4 / L40S product briefs, Ada architecture white
# paper for the RTX 4090 with fp32 accumulate, V100 data sheet); see docs/metrics.md.
PEAK_FLOPS = {
    "h100-sxm": {"bfloat16": 989.4e12, "float16": 989.4e12},
    "h100-pcie": {"bfloat16": 756.0e12, "float16": 756.0e12},
    "h100-nvl": {"bfloat16": 835.0e12, "float16": 835.0e12},
    "h200": {"bfloat16": 989.4e12, "float16": 989.4e12},
    "h200-nvl": {"bfloat16": 835.0e12, "float16": 835.0e12},
    "a100": {"bfloat16": 312.0e12, "float16": 312.0e12},
    "a10g": {"bfloat16": 70.0e12, "float16": 70.0e12},
    "a10": {"bfloat16": 125.0e12, "float16": 125.0e12},
    "l4": {"bfloat16": 121.0e12, "float16": 121.0e12},
    "l40s": {"bfloat16": 362.05e12, "float16": 362.05e12},
    "rtx-4090": {"bfloat16": 165.2e12, "float16": 165.2e12},
    # V100 has no bf16 tensor cores: bf16 runs emulated, so no honest peak exists for it.
    "v100-sxm": {"float16": 125.0e12},
    "v100-pcie": {"float16": 112.0e12},
}


@dataclass(frozen=True)
class Block:
    """A run of parameters that share trainability and position in the forward pass.

    name: where it lives ("language_model.layers.3").
    stream: which tokens pass through it: `vision` (patches + CLS per image), `projector` (image
        tokens), `text` (every real token).
    trained_params, frozen_params: matmul parameters (embedding tables excluded).
    has_trainable: any parameter of the block trains (a trainable embedding table counts here even
        though its lookup costs no FLOPs: the gradient must reach it).
    attn_dim: heads x head_dim of the block's self-attention (0 = no attention in the block).
    """

    name: str
    stream: str
    trained_params: int
    frozen_params: int
    has_trainable: bool
    attn_dim: int = 0


@dataclass(frozen=True)
class FlopModel:
    """Model FLOPs of one training step as a linear function of the batch statistics.

    blocks: the model in forward order.
    vision_tokens_per_image: tokens the vision tower processes per crop (patches + CLS).
    projector_tokens_per_crop: tokens the projector processes per crop (the patches, + CLS when kept);
        None = the `image_tokens` statistic (LLaVA-1.5, where each image is one crop). With anyres the
        projector runs on every crop's full feature map, before the unpadding and downsampling that
        set the LM's image-token count.
    """

    blocks: tuple[Block, ...]
    vision_tokens_per_image: int
    projector_tokens_per_crop: int | None = None

    def coefficients(self) -> dict[str, tuple[float, float]]:
        """stream -> (FLOPs per token, FLOPs per unit of sum of squared sequence lengths)."""
        out = {s: [0.0, 0.0] for s in STREAMS}
        grad_flows = False
        for b in self.blocks:
            grad_flows = grad_flows or b.has_trainable
            frozen_factor = 4 if grad_flows else 2
            out[b.stream][0] += 6 * b.trained_params + frozen_factor * b.frozen_params
            out[b.stream][1] += 4 * b.attn_dim * (3 if grad_flows else 1)
        return {s: (v[0], v[1]) for s, v in out.items()}

    def flops_per_step(self, stats: Mapping[str, Any]) -> float:
        """Model FLOPs for the given statistics (one step or a sum over steps and ranks).

        stats: `real_tokens`, `image_tokens`, `images` (crops and video frames through the tower),
        `sum_sq_lengths` (sum over samples of the squared real sample length) as numbers or 0-d tensors
        (see `metrics.batch_stats`).
        """
        coef = self.coefficients()
        images = float(stats["images"])
        t_v = self.vision_tokens_per_image
        per_crop = self.projector_tokens_per_crop
        projector_tokens = images * per_crop if per_crop is not None else float(stats["image_tokens"])
        return (
            coef["vision"][0] * images * t_v
            + coef["vision"][1] * images * t_v * t_v
            + coef["projector"][0] * projector_tokens
            + coef["text"][0] * float(stats["real_tokens"])
            + coef["text"][1] * float(stats["sum_sq_lengths"])
        )

    def recompute_flops_per_step(self, stats: Mapping[str, Any]) -> float:
        """The extra forward FLOPs of activation checkpointing (HF's `gradient_checkpointing`: each decoder
        layer of the language model that the gradient flows through runs its forward twice). Not model FLOPs:
        added only for the hardware-FLOP utilisation (HFU)."""
        per_token, per_sq = 0.0, 0.0
        grad_flows = False
        for b in self.blocks:
            grad_flows = grad_flows or b.has_trainable
            if grad_flows and b.stream == "text" and _LAYER.search(b.name):
                per_token += 2 * (b.trained_params + b.frozen_params)
                per_sq += 4 * b.attn_dim
        return per_token * float(stats["real_tokens"]) + per_sq * float(stats["sum_sq_lengths"])

    @classmethod
    def from_model(cls, model: nn.Module) -> FlopModel:
        """Read block sizes and trainability (requires_grad) from a LlavaForConditionalGeneration.

        Works on peft-wrapped models (LoRA adapters count as trainable LM parameters, the frozen base
        weights as frozen) and on ZeRO-3 partitioned parameters (uses `ds_numel`). Call it after the
        stage and LoRA have been applied.
        """
        base = unwrap(model)
        cfg = base.config
        head_ids = {id(p) for p in base.get_output_embeddings().parameters()}
        text_cfg = cfg.get_text_config()
        heads = text_cfg.num_attention_heads
        head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // heads
        attn_dims = {"vision": cfg.vision_config.hidden_size, "projector": 0, "text": heads * head_dim}
        blocks: list[Block] = []
        # MODULE_GROUPS lists the groups in forward order (vision tower, projector, LM, lm_head).
        for group, spec in MODULE_GROUPS.items():
            if spec.stream == "none":
                continue  # an added parameter (image_newline): no FLOPs
            module = base.get_submodule(spec.prefix.rstrip("."))
            if group == "lm_head":
                # A tied lm_head owns the embedding matrix here: the lookup costs nothing, the projection does.
                blocks.append(_block(group, spec.stream, list(module.parameters()), 0))
            else:
                blocks += _module_blocks(group, module, spec.stream, attn_dims[spec.stream], head_ids)
        per_crop = None
        if getattr(cfg, "model_type", "llava") != "llava":
            keeps_cls = has_cls(cfg.vision_config) and cfg.vision_feature_select_strategy == "full"
            per_crop = patches_per_side(cfg.vision_config) ** 2 + (1 if keeps_cls else 0)
        return cls(
            blocks=tuple(blocks),
            vision_tokens_per_image=tower_tokens(cfg.vision_config),
            projector_tokens_per_crop=per_crop,
        )

    @classmethod
    def from_config(cls, config: Any, trainable: Iterable[str], vision_train_from_layer: int = 0) -> FlopModel:
        """The FlopModel of a LLaVA / LLaVA-NeXT / OneVision config without weights (meta device), e.g. for bench.

        trainable: module groups (`model.freeze.MODULE_GROUPS`) that train, set exactly as a run sets them
            (`freeze.set_trainable`); e.g. stage 1 = {"multi_modal_projector"}, stage 2 =
            {"multi_modal_projector", "language_model", "lm_head"}.
        vision_train_from_layer: with `vision_tower` trainable, only encoder layers >= this train.
        """

        with torch.device("meta"):
            model = model_class(MODEL_TYPE_ARCH[config.model_type])(config)
        set_trainable(model, tuple(trainable), vision_from_layer=vision_train_from_layer)
        return cls.from_model(model)


def _numel(p: torch.Tensor) -> int:
    # ZeRO-3 leaves an empty `data` on each rank and records the full size in ds_numel.
    return int(getattr(p, "ds_numel", p.numel()))


def _block(
    name: str, stream: str, params: list[nn.Parameter], attn_dim: int, lookups: list[nn.Parameter] | None = None
) -> Block:
    trained = sum(_numel(p) for p in params if p.requires_grad)
    frozen = sum(_numel(p) for p in params if not p.requires_grad)
    has_trainable = trained > 0 or any(p.requires_grad for p in lookups or [])
    return Block(name, stream, trained, frozen, has_trainable, attn_dim)


def _layers(module: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer layer list of a vision tower or language model (`...layers`)."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.ModuleList) and name.split(".")[-1] == "layers":
            return name, sub
    raise ValueError(f"{type(module).__name__} has no `layers` ModuleList; cannot count FLOPs per layer")


def _module_blocks(prefix: str, module: nn.Module, stream: str, attn_dim: int, skip: set[int]) -> list[Block]:
    """[pre (embeddings, ...), layer 0..n-1, post (final norm, ...)] blocks of one module group.

    Parameters before the layer list in registration order go to `pre`, after it to `post`;
    nn.Embedding tables and CLIP's class embedding are lookups (no FLOPs) but still mark the block
    trainable when they train. A module without a layer list (the projector) is one block.
    """
    if not any(isinstance(m, nn.ModuleList) and n.split(".")[-1] == "layers" for n, m in module.named_modules()):
        return [_block(prefix, stream, [p for p in module.parameters() if id(p) not in skip], 0)]
    layer_name, layers = _layers(module)
    lookup_ids = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    pre: list[nn.Parameter] = []
    post: list[nn.Parameter] = []
    pre_lookups: list[nn.Parameter] = []
    seen_layers = False
    for name, p in module.named_parameters():
        if id(p) in skip:
            continue
        if name.startswith(layer_name + "."):
            seen_layers = True
            continue
        if id(p) in lookup_ids or re.search(r"(^|\.)class_embedding$", name):
            pre_lookups.append(p)
        elif seen_layers:
            post.append(p)
        else:
            pre.append(p)
    blocks = [_block(f"{prefix}.pre", stream, pre, 0, pre_lookups)]
    blocks += [
        _block(f"{prefix}.{layer_name}.{i}", stream, [p for p in layer.parameters() if id(p) not in skip], attn_dim)
        for i, layer in enumerate(layers)
    ]
    blocks.append(_block(f"{prefix}.post", stream, post, 0))
    return blocks


def _device_key(device_name: str) -> str | None:
    """Map `torch.cuda.get_device_name()` to a PEAK_FLOPS key (None when unknown)."""
    tokens = set(re.split(r"[^A-Z0-9]+", device_name.upper()))
    if "H100" in tokens:
        return "h100-pcie" if "PCIE" in tokens else "h100-nvl" if "NVL" in tokens else "h100-sxm"
    if "H200" in tokens:
        return "h200-nvl" if "NVL" in tokens else "h200"
    if "V100" in tokens or any(t.startswith("V100") for t in tokens):
        return "v100-pcie" if "PCIE" in tokens else "v100-sxm"
    for token, key in (
        ("A100", "a100"),
        ("A10G", "a10g"),
        ("A10", "a10"),
        ("L40S", "l40s"),
        ("L4", "l4"),
        ("4090", "rtx-4090"),
    ):
        if token in tokens:
            return key
    return None


def peak_flops_for_device(device_name: str, dtype: torch.dtype | str) -> float | None:
    """Dense bf16/fp16 peak FLOP/s of one GPU by its CUDA name; None for unknown GPUs, CPUs, or fp32.

    dtype: the mixed-precision compute dtype (torch.bfloat16 / "bfloat16", torch.float16 / "float16").
    """
    key = _device_key(device_name)
    if key is None:
        return None
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    return PEAK_FLOPS[key].get(name)


def peak_flops_for_current_device(dtype: torch.dtype | str) -> float | None:
    """`peak_flops_for_device` for the current CUDA device; None without CUDA (MFU is then not logged)."""
    if not torch.cuda.is_available():
        return None
    return peak_flops_for_device(torch.cuda.get_device_name(), dtype)
