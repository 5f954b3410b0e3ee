"""Exact configs of the hub models our recipes name, so `plan` and parameter tables work with no download.

`resolve_config(name_or_path)` returns a local folder's config, else the built-in copy of the hub
`config.json` (the fields that matter, copied verbatim), else whatever the local HF cache holds.
The values decide parameter counts and memory plans, so they are exact copies, not approximations:
tests/model/test_known_configs.py builds each model on the meta device and checks its size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llava_train.remote_code import refuse_remote_code

# Hub `config.json` contents (the vision part for CLIP/SigLIP towers, which is what LLaVA builds).
# model_type selects the config class; everything else is passed to it unchanged.
_HUB_CONFIGS: dict[str, dict[str, Any]] = {
    "lmsys/vicuna-7b-v1.5": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 11008,
        "max_position_embeddings": 4096,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 32,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "vocab_size": 32000,
    },
    "lmsys/vicuna-13b-v1.5": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": 5120,
        "initializer_range": 0.02,
        "intermediate_size": 13824,
        "max_position_embeddings": 4096,
        "num_attention_heads": 40,
        "num_hidden_layers": 40,
        "num_key_value_heads": 40,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "vocab_size": 32000,
    },
    "mistralai/Mistral-7B-Instruct-v0.2": {
        "model_type": "mistral",
        "architectures": ["MistralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "vocab_size": 32000,
    },
    "Qwen/Qwen2.5-1.5B-Instruct": {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": 1536,
        "initializer_range": 0.02,
        "intermediate_size": 8960,
        "max_position_embeddings": 32768,
        "max_window_layers": 21,
        "num_attention_heads": 12,
        "num_hidden_layers": 28,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
    "Qwen/Qwen2-7B-Instruct": {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": 3584,
        "initializer_range": 0.02,
        "intermediate_size": 18944,
        "max_position_embeddings": 32768,
        "max_window_layers": 28,
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "vocab_size": 152064,
    },
    "Qwen/Qwen2-0.5B-Instruct": {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": 896,
        "initializer_range": 0.02,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "max_window_layers": 24,
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
    "openai/clip-vit-large-patch14-336": {
        "model_type": "clip_vision_model",
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "hidden_act": "quick_gelu",
        "hidden_size": 1024,
        "image_size": 336,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 4096,
        "layer_norm_eps": 1e-05,
        "num_attention_heads": 16,
        "num_channels": 3,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
    },
    "google/siglip-so400m-patch14-384": {
        "model_type": "siglip_vision_model",
        "attention_dropout": 0.0,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "image_size": 384,
        "intermediate_size": 4304,
        "layer_norm_eps": 1e-06,
        "num_attention_heads": 16,
        "num_channels": 3,
        "num_hidden_layers": 27,
        "patch_size": 14,
    },
}


def known_hub_ids() -> list[str]:
    """The hub ids whose configs are built in (sorted)."""
    return sorted(_HUB_CONFIGS)


def resolve_config(name_or_path: str | os.PathLike) -> Any:
    """The `transformers.PretrainedConfig` for a local model folder or a hub id, without network access.

    Order: a local folder holding config.json -> `AutoConfig.from_pretrained(folder)`; a hub id in
    the built-in table -> that exact config (vision towers come back as their vision config class);
    otherwise the local HF cache (`local_files_only=True`). Raises ValueError naming the built-in ids
    when none of these has it.
    """
    from transformers import AutoConfig

    name = str(name_or_path)
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise ValueError(f"model folder {name} has no config.json")
        refuse_remote_code(name)
        return AutoConfig.from_pretrained(name, trust_remote_code=False)
    if name in _HUB_CONFIGS:
        values = dict(_HUB_CONFIGS[name])
        model_type = values.pop("model_type")
        config = AutoConfig.for_model(model_type, **values)
        config._name_or_path = name
        return config
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"no config for {name!r}: it is not a local folder, not one of the built-in hub ids "
            f"({', '.join(known_hub_ids())}), and not in the local Hugging Face cache ({e.__class__.__name__}). "
            "Download it first (`huggingface-cli download ...`) or pass a local folder."
        ) from e
