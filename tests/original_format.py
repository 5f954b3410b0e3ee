"""Tiny checkpoints in the original LLaVA format (haotian-liu/LLaVA v1.2.2), written from the tiny LM and CLIP folders.

Where each name comes from (LLaVA = haotian-liu/LLaVA at c121f04):
- `model.embed_tokens.*`, `model.layers.N.*`, `model.norm.*`, `lm_head.*`: `LlavaLlamaForCausalLM` is a
  `LlamaForCausalLM` whose `model` is `LlavaLlamaModel(LlavaMetaModel, LlamaModel)`
  (llava/model/language_model/llava_llama.py), so the LM keeps Llama's own names.
- `model.layers.N.self_attn.rotary_emb.inv_freq`: a persistent buffer in transformers 4.31, which saved
  liuhaotian/llava-v1.5-7b (its pytorch_model.bin.index.json lists one per layer).
- `model.mm_projector.0.*` / `model.mm_projector.2.*`: `build_vision_projector` for `mlp2x_gelu` is
  `nn.Sequential(Linear, GELU, Linear)` (llava/model/multimodal_projector/builder.py) held as
  `LlavaMetaModel.mm_projector` (llava/model/llava_arch.py).
- `model.vision_tower.vision_tower.vision_model.*` (self-trained folders only; releases were saved
  without it): `LlavaMetaModel.vision_tower = CLIPVisionTower`, whose `.vision_tower` is a transformers
  4.3x `CLIPVisionModel` (`vision_model.*`; llava/model/multimodal_encoder/clip_encoder.py), plus the
  `embeddings.position_ids` buffer older transformers saved.
- config.json: the fields of liuhaotian/llava-v1.5-7b's config.json (`mm_vision_tower`,
  `mm_projector_type`, `mm_vision_select_layer`, `mm_vision_select_feature`, `mm_hidden_size`,
  `mm_use_im_start_end`, `mm_use_im_patch_token`, `image_aspect_ratio`, `model_type: llava`, ...) with
  the tiny model's sizes; `version` is added only when a test asks (the original trainer does not write it).
- Shards: `pytorch_model-0000K-of-0000N.bin` + `pytorch_model.bin.index.json` (the release layout), or one
  `model.safetensors` (what HF Trainer >= 4.35 writes for self-trained runs).
- `mm_projector.bin` + config.json (architectures `LlamaForCausalLM`, `model_type: llava_llama`, the mm
  fields, `tune_mm_mlp_adapter: true`) + trainer_state.json: what train.py's
  `safe_save_model_for_hf_trainer` writes for stage 1 (`--tune_mm_mlp_adapter True`), in bf16.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def _read(folder: str | Path) -> dict[str, torch.Tensor]:
    with safe_open(str(Path(folder) / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _mm_fields(vision_tower: str, vision_hidden: int) -> dict[str, Any]:
    return {
        "mm_hidden_size": vision_hidden,
        "mm_projector_type": "mlp2x_gelu",
        "mm_resampler_type": None,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": vision_tower,
        "use_mm_proj": True,
    }


def projector_tensors(lm_hidden: int, vision_hidden: int, seed: int = 7) -> dict[str, torch.Tensor]:
    """Random mlp2x_gelu projector weights under the original names."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model.mm_projector.0.weight": torch.randn(lm_hidden, vision_hidden, generator=g) * 0.1,
        "model.mm_projector.0.bias": torch.randn(lm_hidden, generator=g) * 0.1,
        "model.mm_projector.2.weight": torch.randn(lm_hidden, lm_hidden, generator=g) * 0.1,
        "model.mm_projector.2.bias": torch.randn(lm_hidden, generator=g) * 0.1,
    }


def original_state(lm: str, vision: str, with_tower: bool = False, seed: int = 1) -> dict[str, torch.Tensor]:
    """The tensors of an original full checkpoint: the tiny LM (perturbed, so it differs from `lm`), a projector,
    the 4.31-era inv_freq buffers, and with `with_tower` the (perturbed) CLIP tower under its original prefix."""
    config = json.loads((Path(lm) / "config.json").read_text())
    g = torch.Generator().manual_seed(seed)
    state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in _read(lm).items()}
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    for i in range(config["num_hidden_layers"]):
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq
    vision_hidden = json.loads((Path(vision) / "config.json").read_text())["hidden_size"]
    state.update(projector_tensors(config["hidden_size"], vision_hidden, seed + 6))
    if with_tower:
        prefix = "model.vision_tower.vision_tower.vision_model."
        for k, v in _read(vision).items():
            state[prefix + k] = v + 0.01 * torch.randn(v.shape, generator=g)
        positions = json.loads((Path(vision) / "config.json").read_text())
        n = (positions["image_size"] // positions["patch_size"]) ** 2 + 1
        state[prefix + "embeddings.position_ids"] = torch.arange(n)[None]
    return state


def write_original_checkpoint(
    out: str | Path,
    lm: str,
    vision: str,
    fmt: str = "safetensors",
    dtype: torch.dtype = torch.float16,
    with_tower: bool = False,
    config: dict[str, Any] | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """An original-format LLaVA-1.5 full checkpoint folder (`fmt`: `safetensors` = one model.safetensors,
    `bin` = two pytorch_model-*.bin shards + index), with the LM's tokenizer files as the releases ship them.
    `config` entries override/extend the config.json fields (e.g. `architectures: [LlavaQwenForCausalLM]`,
    LLaVA-NeXT's repo); `state` replaces the tensors."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lm_config = json.loads((Path(lm) / "config.json").read_text())
    vision_hidden = json.loads((Path(vision) / "config.json").read_text())["hidden_size"]
    raw = {
        "_name_or_path": "llava-v1.5-7b",
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "freeze_mm_mlp_adapter": False,
        "freeze_mm_vision_resampler": False,
        "image_aspect_ratio": "pad",
        "tune_mm_mlp_adapter": False,
        "tune_mm_vision_resampler": False,
        "unfreeze_mm_vision_tower": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": "4.31.0",
        "pretraining_tp": 1,
        "rope_scaling": None,
        **{k: v for k, v in lm_config.items() if k not in _NOT_LM_FIELDS},
        **_mm_fields(vision, vision_hidden),
    }
    raw.update(config or {})
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    for name in TOKENIZER_FILES:
        if (Path(lm) / name).is_file():
            shutil.copy(Path(lm) / name, out / name)
    tensors = state if state is not None else original_state(lm, vision, with_tower)
    tensors = {
        k: (v.to(dtype) if v.is_floating_point() and not k.endswith("inv_freq") else v) for k, v in tensors.items()
    }
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    elif fmt == "bin":
        keys = sorted(tensors)
        shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2]}
        shards["pytorch_model-00002-of-00002.bin"] = keys[len(keys) // 2 :]
        weight_map = {}
        for file, names in shards.items():
            torch.save({k: tensors[k] for k in names}, out / file)
            weight_map.update(dict.fromkeys(names, file))
        size = sum(v.numel() * v.element_size() for v in tensors.values())
        index = {"metadata": {"total_size": size}, "weight_map": weight_map}
        (out / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    else:
        raise KeyError(f"unknown fmt {fmt!r}; valid: safetensors, bin")
    return out


# A LlavaLlamaForCausalLM / LlavaQwenForCausalLM config.json is its LM's config (these fields aside) + the mm fields.
_NOT_LM_FIELDS = ("architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path")
# The LM config fields a stage-1 config.json carries (its LlamaConfig part).
_LM_FIELDS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "hidden_act",
    "hidden_size",
    "initializer_range",
    "intermediate_size",
    "max_position_embeddings",
    "num_attention_heads",
    "num_hidden_layers",
    "num_key_value_heads",
    "rms_norm_eps",
    "tie_word_embeddings",
    "use_cache",
    "vocab_size",
)


def write_original_projector(
    out: str | Path,
    lm: str,
    vision: str,
    with_config: bool = True,
    tensors: dict[str, torch.Tensor] | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    """An original stage-1 folder: `mm_projector.bin` (bf16, original names), config.json and trainer_state.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lm_config = json.loads((Path(lm) / "config.json").read_text())
    vision_hidden = json.loads((Path(vision) / "config.json").read_text())["hidden_size"]
    tensors = tensors if tensors is not None else projector_tensors(lm_config["hidden_size"], vision_hidden)
    torch.save({k: v.to(torch.bfloat16) for k, v in tensors.items()}, out / "mm_projector.bin")
    if with_config:
        raw = {
            "_name_or_path": lm,
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llava_llama",
            "tune_mm_mlp_adapter": True,
            "image_aspect_ratio": "square",
            **{k: lm_config[k] for k in _LM_FIELDS if k in lm_config},
            **_mm_fields(vision, vision_hidden),
        }
        raw.update(config or {})
        (out / "config.json").write_text(json.dumps(raw, indent=2))
        (out / "trainer_state.json").write_text(json.dumps({"global_step": 2, "log_history": []}))
    return out


def hf_name(key: str) -> str | None:
    """The test's own map (transformers' convert_llava_weights_to_hf.py rules, to in-memory names), independent
    of llava_train.model.original."""
    if key.endswith((".inv_freq", ".position_ids")):
        return None
    if key.startswith("model.mm_projector."):
        index, rest = key[len("model.mm_projector.") :].split(".", 1)
        return f"model.multi_modal_projector.linear_{ {'0': 1, '2': 2}[index] }.{rest}"
    if key.startswith("model.vision_tower.vision_tower.vision_model."):
        return "model.vision_tower." + key[len("model.vision_tower.vision_tower.vision_model.") :]
    if key.startswith("lm_head."):
        return key
    return "model.language_model." + key[len("model.") :]
