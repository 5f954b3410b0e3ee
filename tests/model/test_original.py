"""Original-format LLaVA sources as model.init_from: kinds, exact tensors, hub ids, one-line wrong-pairing errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llava_train.components import load_components
from llava_train.model.init_source import init_source
from original_format import (
    hf_name,
    original_state,
    projector_tensors,
    write_original_checkpoint,
    write_original_projector,
)

VOCAB = 512  # the tiny tokenizer's size: the original checkpoints' embedding rows (the image token is row 512)


@pytest.fixture(scope="module")
def sources(tiny_parts: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Original full checkpoints (bf16 safetensors without the tower; fp16 sharded .bin with it) and a stage 1."""
    root = tmp_path_factory.mktemp("original")
    lm, vt = tiny_parts["llama"], tiny_parts["clip"]
    plain, towered = original_state(lm, vt), original_state(lm, vt, with_tower=True, seed=2)
    return {
        "state": plain,
        "tower_state": towered,
        "safetensors": write_original_checkpoint(root / "st", lm, vt, "safetensors", torch.bfloat16, state=plain),
        "bin": write_original_checkpoint(root / "bin", lm, vt, "bin", torch.float16, state=towered),
        "projector": write_original_projector(root / "stage1", lm, vt),
        "bare": write_original_projector(root / "bare", lm, vt, with_config=False),
    }


def _tensors(folder: str) -> dict[str, torch.Tensor]:
    with safe_open(str(Path(folder) / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_kinds_are_detected_from_the_files(sources: dict) -> None:
    for name, kind in (("safetensors", "original"), ("bin", "original"), ("projector", "original_projector")):
        assert init_source(str(sources[name])).kind == kind, name
    file = init_source(str(sources["projector"] / "mm_projector.bin"))
    assert (file.kind, file.projector_file.name, file.original.vision_tower is not None) == (
        "original_projector",
        "mm_projector.bin",
        True,
    )
    bare = init_source(str(sources["bare"]))
    assert (bare.kind, bare.original) == ("original_projector", None)
    assert init_source(str(sources["bin"])).describe() == (
        f"original-format LLaVA checkpoint (LlavaLlamaForCausalLM & co.) ({sources['bin']})"
    )


@pytest.mark.parametrize(
    ("fmt", "state", "dtype"), [("safetensors", "state", torch.bfloat16), ("bin", "tower_state", torch.float16)]
)
def test_original_checkpoint_loads_every_tensor_exactly(make_cfg, tiny_parts, sources, fmt, state, dtype) -> None:
    model = load_components(make_cfg(model={"init_from": str(sources[fmt])})).model
    got = model.state_dict()
    source = sources[state]
    for key, tensor in source.items():
        name = hf_name(key)
        if name is None:
            continue
        value = got[name][:VOCAB] if name.endswith(("embed_tokens.weight", "lm_head.weight")) else got[name]
        assert torch.equal(value, tensor.to(dtype).float()), key
    if fmt == "safetensors":  # no tower in the checkpoint (as in the releases): it comes from model.vision_tower
        for key, tensor in _tensors(tiny_parts["clip"]).items():
            assert torch.equal(got[f"model.vision_tower.{key}"], tensor), key
    assert tuple(model.get_input_embeddings().weight.shape) == (VOCAB + 1, 64)


def test_qwen_original_checkpoint_with_tied_embeddings_and_siglip_tower(make_cfg, tiny_parts, tmp_path) -> None:
    """LLaVA-NeXT's LlavaQwenForCausalLM (no lm_head: tied) with its SigLIP tower in the checkpoint."""
    lm, vt = tiny_parts["qwen"], tiny_parts["siglip"]
    state = original_state(lm, vt, with_tower=True, seed=9)
    state.pop("model.vision_tower.vision_tower.vision_model.embeddings.position_ids")
    arch = {"architectures": ["LlavaQwenForCausalLM"], "model_type": "llava_qwen"}
    folder = write_original_checkpoint(
        tmp_path / "qwen", lm, vt, "safetensors", torch.float32, config=arch, state=state
    )
    model = load_components(make_cfg(lm="qwen", tower="siglip", model={"init_from": str(folder)})).model
    assert model.config.tie_word_embeddings and "lm_head.weight" not in state
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    got = model.state_dict()
    for key, tensor in state.items():
        name = hf_name(key)
        if name is not None:
            value = got[name][:VOCAB] if name.endswith("embed_tokens.weight") else got[name]
            assert torch.equal(value, tensor), key


def test_mm_projector_bin_loads_exactly_onto_the_base_models(make_cfg, tiny_parts, sources) -> None:
    model = load_components(make_cfg(model={"init_from": str(sources["projector"])})).model
    expected = projector_tensors(64, 32)
    got = model.model.multi_modal_projector.state_dict()
    for key, tensor in expected.items():
        assert torch.equal(got[hf_name(key).removeprefix("model.multi_modal_projector.")], tensor.bfloat16().float())
    base = _tensors(tiny_parts["llama"])
    assert torch.equal(model.model.language_model.norm.weight, base["model.norm.weight"])


def test_hub_id_resolves_through_the_local_cache(make_cfg, sources, tmp_path, monkeypatch) -> None:
    import shutil

    import huggingface_hub.constants as hub

    repo = tmp_path / "hub" / "models--liuhaotian--llava-v1.5-tiny"
    sha = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    shutil.copytree(sources["bin"], repo / "snapshots" / sha)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    source = init_source("liuhaotian/llava-v1.5-tiny", weights=True)
    assert (source.kind, source.folder) == ("original", repo / "snapshots" / sha)
    model = load_components(make_cfg(model={"init_from": "liuhaotian/llava-v1.5-tiny"})).model
    norm = sources["tower_state"]["model.norm.weight"].half().float()
    assert torch.equal(model.model.language_model.norm.weight, norm)


# -- wrong pairings: one line naming both values, raised at component load (before any training) --------------


def _error(make_cfg, init_from: Path, **model) -> str:
    with pytest.raises(ValueError) as info:
        load_components(make_cfg(model={"init_from": str(init_from), **model}))
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("config", "model", "expected"),
    [
        (
            {"mm_vision_tower": "openai/clip-vit-large-patch14-336"},
            {},
            "was trained with mm_vision_tower=openai/clip-vit-large-patch14-336 but model.vision_tower={clip}",
        ),
        (
            {},
            {"vision_feature_layer": -1},
            "was trained with mm_vision_select_layer=-2 but model.vision_feature_layer=-1",
        ),
        (
            {"mm_vision_select_feature": "cls_patch"},
            {},
            "was trained with mm_vision_select_feature=cls_patch but model.vision_feature_select=patch",
        ),
        (
            {"mm_projector_type": "linear"},
            {},
            "was trained with mm_projector_type=linear but model.projector=mlp2x_gelu",
        ),
        ({"mm_hidden_size": 1024}, {}, "was trained with mm_hidden_size=1024 but the hidden_size of {clip}=32"),
        ({"version": "plain"}, {}, "was trained with version=plain (template plain) but data.template=vicuna_v1"),
        (
            {"mm_patch_merge_type": "spatial_unpad", "image_aspect_ratio": "anyres"},
            {},
            "is a LLaVA-1.6 (anyres) original checkpoint (mm_patch_merge_type=spatial_unpad, "
            "image_aspect_ratio=anyres); only LLaVA-1.5 original checkpoints are supported (use its llava-hf "
            "conversion with model.arch=llava_next)",
        ),
        (
            {},
            {"arch": "llava_next"},
            "is an original-format LLaVA-1.5 checkpoint; it needs model.arch=llava, not llava_next",
        ),
    ],
    ids=["tower", "layer", "feature", "projector_type", "mm_hidden", "version", "llava_1_6", "arch"],
)
def test_wrong_pairing_is_a_one_line_error(make_cfg, tiny_parts, tmp_path, config, model, expected) -> None:
    folder = write_original_checkpoint(tmp_path / "ckpt", tiny_parts["llama"], tiny_parts["clip"], config=config)
    message = _error(make_cfg, folder, **model)
    assert message == f"model.init_from={folder} " + expected.format(clip=tiny_parts["clip"])


def test_matching_version_passes(make_cfg, tiny_parts, tmp_path) -> None:
    folder = write_original_checkpoint(
        tmp_path / "v1", tiny_parts["llama"], tiny_parts["clip"], config={"version": "v1"}
    )
    assert load_components(make_cfg(model={"init_from": str(folder)})).template.name == "vicuna_v1"


def test_projector_for_another_lm_or_tower_names_the_shapes(make_cfg, tiny_parts, tmp_path) -> None:
    other = projector_tensors(64, 16)  # trained for a tower with 16-dim features
    folder = write_original_projector(tmp_path / "p16", tiny_parts["llama"], tiny_parts["clip"], False, other)
    message = _error(make_cfg, folder)
    assert message == (
        f"{folder / 'mm_projector.bin'} maps vision features to the LM with linear_1.weight (64, 16), but "
        f"model.vision_tower={tiny_parts['clip']} (hidden_size 32) and model.language_model={tiny_parts['llama']} "
        "(hidden_size 64) need (64, 32)"
    )
    tower = write_original_projector(
        tmp_path / "tower", tiny_parts["llama"], tiny_parts["clip"], config={"mm_vision_tower": "google/siglip-base"}
    )
    assert _error(make_cfg, tower) == (
        f"model.init_from={tower} was trained with mm_vision_tower=google/siglip-base but "
        f"model.vision_tower={tiny_parts['clip']}"
    )


def test_loading_is_strict_and_lists_the_names(make_cfg, tiny_parts, sources, tmp_path) -> None:
    lm, vt = tiny_parts["llama"], tiny_parts["clip"]
    missing = {k: v for k, v in sources["state"].items() if k != "model.norm.weight"}
    folder = write_original_checkpoint(tmp_path / "missing", lm, vt, state=missing)
    assert _error(make_cfg, folder) == (
        f"model.init_from={folder} does not provide 1 weight(s) of the model: model.language_model.norm.weight"
    )
    extra = dict(sources["state"]) | {"model.image_newline": torch.zeros(64)}
    folder = write_original_checkpoint(tmp_path / "extra", lm, vt, state=extra)
    assert _error(make_cfg, folder) == (
        f"model.init_from={folder} holds 1 weight(s) a LLaVA-1.5 model does not have: model.image_newline"
    )
    linear = {k: v for k, v in sources["state"].items() if "mm_projector" not in k}
    linear |= {"model.mm_projector.weight": torch.zeros(64, 32), "model.mm_projector.bias": torch.zeros(64)}
    folder = write_original_checkpoint(tmp_path / "linear", lm, vt, state=linear)
    assert _error(make_cfg, folder) == (
        f"model.init_from={folder} holds model.mm_projector.bias: not an mlp2x_gelu projector "
        "(model.mm_projector.0/2.*), which is the only one transformers' LlavaMultiModalProjector has"
    )
