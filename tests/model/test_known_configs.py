"""Tests for the built-in hub configs: exact classes, key values and parameter counts (meta device, no download)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_train.model.known_configs import known_hub_ids, resolve_config

# Parameter counts of the published checkpoints (tied embeddings counted once).
EXPECTED_PARAMS = {
    "lmsys/vicuna-7b-v1.5": 6_738_415_616,
    "lmsys/vicuna-13b-v1.5": 13_015_864_320,
    "mistralai/Mistral-7B-Instruct-v0.2": 7_241_732_096,
    "Qwen/Qwen2.5-1.5B-Instruct": 1_543_714_304,
    "Qwen/Qwen2-0.5B-Instruct": 494_032_768,
    "Qwen/Qwen2-7B-Instruct": 7_615_616_512,
    "openai/clip-vit-large-patch14-336": 303_507_456,
    "google/siglip-so400m-patch14-384": 428_225_600,
}
VISION_IDS = ("openai/clip-vit-large-patch14-336", "google/siglip-so400m-patch14-384")


def _meta_param_count(name: str) -> int:
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    config = resolve_config(name)
    with torch.device("meta"):
        model = AutoModel.from_config(config) if name in VISION_IDS else AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def test_known_ids_are_exactly_the_recipe_models() -> None:
    assert known_hub_ids() == sorted(EXPECTED_PARAMS)


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_count_matches_published_checkpoint(name: str) -> None:
    assert _meta_param_count(name) == EXPECTED_PARAMS[name]


def test_vicuna_values_and_classes() -> None:
    seven, thirteen = resolve_config("lmsys/vicuna-7b-v1.5"), resolve_config("lmsys/vicuna-13b-v1.5")
    assert type(seven).__name__ == "LlamaConfig"
    got = [
        (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.vocab_size)
        for c in (seven, thirteen)
    ]
    assert got == [(4096, 32, 32, 11008, 32000), (5120, 40, 40, 13824, 32000)]
    assert (seven.max_position_embeddings, seven.rms_norm_eps, seven.tie_word_embeddings) == (4096, 1e-5, False)
    assert seven._name_or_path == "lmsys/vicuna-7b-v1.5"


def test_vision_towers_come_back_as_vision_configs() -> None:
    clip = resolve_config("openai/clip-vit-large-patch14-336")
    siglip = resolve_config("google/siglip-so400m-patch14-384")
    assert type(clip).__name__ == "CLIPVisionConfig"
    assert (clip.image_size, clip.patch_size, clip.hidden_act, clip.projection_dim) == (336, 14, "quick_gelu", 768)
    assert type(siglip).__name__ == "SiglipVisionConfig"
    assert (siglip.image_size, siglip.patch_size, siglip.hidden_size, siglip.num_hidden_layers) == (384, 14, 1152, 27)


def test_qwen_is_tied_with_grouped_kv_heads() -> None:
    qwen = resolve_config("Qwen/Qwen2.5-1.5B-Instruct")
    assert type(qwen).__name__ == "Qwen2Config"
    assert (qwen.tie_word_embeddings, qwen.num_key_value_heads, qwen.vocab_size) == (True, 2, 151936)


def test_local_folder_wins(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4).save_pretrained(
        tmp_path
    )
    config = resolve_config(tmp_path)
    assert (type(config).__name__, config.hidden_size, config.num_hidden_layers) == ("LlamaConfig", 64, 2)


def test_folder_without_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"model folder {tmp_path} has no config.json"):
        resolve_config(tmp_path)


def test_unknown_id_error_lists_the_known_ids(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ValueError) as info:
        resolve_config("someone/not-a-model")
    message = str(info.value)
    assert message.startswith("no config for 'someone/not-a-model': it is not a local folder")
    assert ", ".join(known_hub_ids()) in message
