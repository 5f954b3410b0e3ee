"""Model builder: shapes, image token, processor expansion, pretrained weights, resize, init_from, projector file."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from llava_train.components import load_components
from llava_train.model.builder import init_from_kind
from llava_train.model.projector import load_projector, projector_module, save_projector
from llava_train.model.weights import weight_files

IMAGE_TOKEN_ID = 512
PROJECTOR_KEYS = ["linear_1.bias", "linear_1.weight", "linear_2.bias", "linear_2.weight"]


def _image(color: tuple[int, int, int] = (200, 30, 10)) -> Image.Image:
    return Image.new("RGB", (40, 56), color)


def _source(folder: str) -> dict[str, torch.Tensor]:
    with safe_open(str(Path(folder) / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


@pytest.mark.parametrize(
    ("lm", "tower", "select", "strategy", "n_tokens"),
    [
        ("llama", "clip", "patch", "default", 16),
        ("llama", "clip", "cls_patch", "full", 17),
        ("qwen", "siglip", "patch", "full", 16),
    ],
)
def test_build_shapes_image_token_and_forward(make_cfg, lm, tower, select, strategy, n_tokens) -> None:
    cfg = make_cfg(lm=lm, tower=tower, model={"vision_feature_select": select})
    parts = load_components(cfg)
    model, processor, tokenizer = parts.model, parts.processor, parts.tokenizer
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID
    assert model.config.image_token_id == IMAGE_TOKEN_ID
    assert model.config.vision_feature_select_strategy == strategy
    assert model.config.vision_feature_layer == -2
    assert model.config.image_seq_length == n_tokens
    assert model.config.projector_hidden_act == "gelu"
    assert model.config.text_config.vocab_size == 513
    assert tuple(model.get_input_embeddings().weight.shape) == (513, 64)
    assert tuple(model.lm_head.weight.shape) == (513, 64)
    proj = model.model.multi_modal_projector
    assert (tuple(proj.linear_1.weight.shape), tuple(proj.linear_2.weight.shape)) == ((64, 32), (64, 64))

    texts = ["<image>\nWhat is in the image?", "Describe <image> the picture in detail please."]
    batch = processor(text=texts, images=[_image(), _image((0, 90, 250))], padding=True, return_tensors="pt")
    assert [row.count(IMAGE_TOKEN_ID) for row in batch["input_ids"].tolist()] == [n_tokens, n_tokens]
    assert tuple(batch["pixel_values"].shape) == (2, 3, 32, 32)
    with torch.no_grad():
        logits = model(**batch).logits
    assert tuple(logits.shape) == (2, batch["input_ids"].shape[1], 513)
    assert torch.isfinite(logits).all()


def test_processor_settings_per_tower(make_cfg) -> None:
    clip_proc = load_components(make_cfg(lm="llama", tower="clip")).processor
    siglip_proc = load_components(make_cfg(lm="qwen", tower="siglip")).processor
    assert (clip_proc.patch_size, clip_proc.num_additional_image_tokens) == (8, 1)
    assert clip_proc.vision_feature_select_strategy == "default"
    assert (siglip_proc.patch_size, siglip_proc.num_additional_image_tokens) == (8, 0)
    assert siglip_proc.vision_feature_select_strategy == "full"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    prompt = clip_proc.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nHi? ASSISTANT:"
    )


def test_pretrained_weights_really_loaded(make_cfg, tiny_parts) -> None:
    model = load_components(make_cfg(lm="llama", tower="clip")).model
    vt = _source(tiny_parts["clip"])
    vision = model.model.vision_tower.state_dict()
    for key, tensor in vt.items():
        name = key if key in vision else key.removeprefix("vision_model.")
        assert torch.equal(vision[name], tensor), key
    lm = _source(tiny_parts["llama"])
    text = model.model.language_model.state_dict()
    for key, tensor in lm.items():
        if key == "lm_head.weight":
            assert torch.equal(model.lm_head.weight[:512], tensor)
        elif key == "model.embed_tokens.weight":
            assert torch.equal(text["embed_tokens.weight"][:512], tensor)
        else:
            assert torch.equal(text[key.removeprefix("model.")], tensor), key


def test_resized_rows_are_mean_initialised_and_deterministic(make_cfg) -> None:
    cfg = make_cfg(lm="llama", tower="clip")
    a = load_components(cfg).model
    b = load_components(cfg).model
    emb = a.get_input_embeddings().weight
    assert torch.allclose(emb[512], emb[:512].mean(0), atol=1e-3)
    assert torch.equal(emb[512], b.get_input_embeddings().weight[512])
    assert torch.equal(a.lm_head.weight[512], b.lm_head.weight[512])


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_build_without_random_init_equals_a_fully_initialised_build(make_cfg, arch: str) -> None:
    """The fast build (no init of what the checkpoints overwrite) gives the model a fully initialised
    `_from_config` build gives after loading the same files: every buffer (rotary inv_freq, position ids)
    and the forward, once the projector (and newline) are the same; those get transformers' own init."""
    from transformers import AutoConfig

    from llava_train.model.builder import llava_config, model_class
    from llava_train.model.weights import load_pretrained_parts, resolve_folder

    cfg = make_cfg(lm="llama", tower="clip", model={"arch": arch})
    parts = load_components(cfg)
    fast = parts.model
    lm, vt = resolve_folder(cfg.model.language_model), resolve_folder(cfg.model.vision_tower)
    vision_full = AutoConfig.from_pretrained(str(vt))
    config = llava_config(cfg, AutoConfig.from_pretrained(str(lm)), vision_full, IMAGE_TOKEN_ID)
    slow = model_class(arch)._from_config(config, dtype=torch.float32)
    load_pretrained_parts(slow, lm, vt, vision_full)
    slow.resize_token_embeddings(len(parts.tokenizer), mean_resizing=False)
    slow.load_state_dict(fast.state_dict())  # embeddings' new rows, projector, newline
    assert {k: v for k, v in slow.named_buffers()}.keys() == {k: v for k, v in fast.named_buffers()}.keys()
    for name, buffer in slow.named_buffers():
        assert torch.equal(buffer, dict(fast.named_buffers())[name]), name
    proj = fast.model.multi_modal_projector
    std = fast.config.text_config.initializer_range
    assert torch.all(proj.linear_1.bias == 0) and torch.all(proj.linear_2.bias == 0)
    assert abs(float(proj.linear_1.weight.detach().std()) - std) < 0.3 * std  # normal(0, initializer_range)
    if arch == "llava_next":
        newline = fast.model.image_newline
        assert abs(float(newline.detach().std()) - 64**-0.5) < 0.3 * 64**-0.5  # normal(0, 1 / sqrt(hidden))
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    torch.testing.assert_close(fast(input_ids=ids).logits, slow(input_ids=ids).logits, rtol=0, atol=0)


def test_tied_lm_keeps_lm_head_tied(make_cfg, tiny_parts) -> None:
    parts = load_components(make_cfg(lm="qwen", tower="siglip"))
    model, tokenizer = parts.model, parts.tokenizer
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    src = _source(tiny_parts["qwen"])
    assert torch.equal(model.lm_head.weight[:512], src["model.embed_tokens.weight"])
    gen = model.generation_config
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (
        None,
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )


def test_generation_config_from_llama_tokenizer(make_cfg) -> None:
    model = load_components(make_cfg(lm="llama", tower="clip")).model
    gen = model.generation_config
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 2, 0)


def test_full_clip_model_folder_as_vision_tower(make_cfg, tmp_path) -> None:
    from transformers import CLIPConfig, CLIPModel

    from llava_train.model.tiny import _tiny_image_processor

    torch.manual_seed(3)
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64}
    vision |= {"num_hidden_layers": 2, "num_attention_heads": 4}
    text = {"vocab_size": 99, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    text |= {"num_attention_heads": 4}
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16))
    folder = tmp_path / "clip_full"
    clip.save_pretrained(str(folder))
    _tiny_image_processor("clip", 32).save_pretrained(str(folder))
    parts = load_components(make_cfg(lm="llama", tower="clip", model={"vision_tower": str(folder)}))
    model, processor = parts.model, parts.processor
    got = model.model.vision_tower.state_dict()
    for name, tensor in clip.vision_model.state_dict().items():
        assert torch.equal(got[name], tensor), name
    batch = processor(text=["<image>\nHi"], images=[_image()], return_tensors="pt")
    assert batch["input_ids"][0].tolist().count(IMAGE_TOKEN_ID) == 16


def test_bin_checkpoint_is_read_weights_only(make_cfg, tiny_parts, tmp_path) -> None:
    folder = tmp_path / "llama_bin"
    shutil.copytree(tiny_parts["llama"], folder)
    state = _source(str(folder))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    assert weight_files(folder) == [folder / "pytorch_model.bin"]
    model = load_components(make_cfg(model={"language_model": str(folder)})).model
    assert torch.equal(
        model.model.language_model.layers[1].mlp.up_proj.weight, state["model.layers.1.mlp.up_proj.weight"]
    )


def test_missing_lm_weight_is_an_error(make_cfg, tiny_parts, tmp_path) -> None:
    folder = tmp_path / "llama_broken"
    shutil.copytree(tiny_parts["llama"], folder)
    state = _source(str(folder))
    del state["model.norm.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=re.escape("does not match the language model: missing ['norm.weight']")):
        load_components(make_cfg(model={"language_model": str(folder)}))


def test_no_weights_error_names_expected_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="expected model.safetensors, model.safetensors.index.json"):
        weight_files(tmp_path)


def test_projector_save_load_round_trip(make_cfg, tmp_path) -> None:
    cfg = make_cfg()
    model = load_components(cfg).model
    with torch.no_grad():
        for i, p in enumerate(projector_module(model).parameters()):
            p.copy_(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) / (100.0 + i))
    path = save_projector(model, tmp_path / "projector.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == PROJECTOR_KEYS
    other = load_components(cfg).model
    assert not torch.equal(
        other.model.multi_modal_projector.linear_2.weight, model.model.multi_modal_projector.linear_2.weight
    )
    load_projector(other, path)
    for a, b in zip(projector_module(model).parameters(), projector_module(other).parameters(), strict=True):
        assert torch.equal(a, b)


def test_projector_shape_mismatch_names_both_shapes(make_cfg, tmp_path) -> None:
    model = load_components(make_cfg()).model
    path = tmp_path / "projector.safetensors"
    shapes = {"linear_1.weight": (64, 16), "linear_1.bias": (64,), "linear_2.weight": (64, 64), "linear_2.bias": (64,)}
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    expected = (
        f"projector shape mismatch for linear_1.weight: {path} has (64, 16), the model expects (64, 32) "
        "(was it trained for another vision tower / language model?)"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_projector(model, path)
    save_file({"weight": torch.zeros(2)}, str(path))
    with pytest.raises(
        ValueError, match=re.escape(f"{path} holds projector weights ['weight'], the model's projector")
    ):
        load_projector(model, path)


def test_init_from_projector_folder(make_cfg, tmp_path) -> None:
    stage1 = load_components(make_cfg(stage="pretrain", data={"template": "plain"})).model
    with torch.no_grad():
        stage1.model.multi_modal_projector.linear_1.bias.fill_(0.25)
    save_projector(stage1, tmp_path / "stage1" / "projector.safetensors")
    assert init_from_kind(str(tmp_path / "stage1")) == "projector"
    model = load_components(make_cfg(model={"init_from": str(tmp_path / "stage1")})).model
    assert torch.equal(model.model.multi_modal_projector.linear_1.bias, torch.full((64,), 0.25))
    for a, b in zip(stage1.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_init_from_full_folder(make_cfg, tmp_path) -> None:
    parts = load_components(make_cfg(stage="pretrain", data={"template": "plain"}))
    stage1, processor = parts.model, parts.processor
    with torch.no_grad():
        stage1.model.language_model.norm.weight.fill_(0.5)
    out = tmp_path / "stage1_full"
    stage1.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    save_projector(stage1, out / "projector.safetensors")
    assert init_from_kind(str(out)) == "full"
    parts = load_components(make_cfg(model={"init_from": str(out)}))
    model, proc2, tokenizer = parts.model, parts.processor, parts.tokenizer
    assert len(tokenizer) == 513
    sd1, sd2 = stage1.state_dict(), model.state_dict()
    assert sorted(sd1) == sorted(sd2)
    for key in sd1:
        assert torch.equal(sd1[key], sd2[key]), key
    # The finetune stage's template replaces stage 1's `plain` template in the processor.
    assert "USER:" in proc2.chat_template and "USER:" not in processor.chat_template


def test_init_from_other_folder_is_an_error(make_cfg, tmp_path) -> None:
    expected = (
        f"model.init_from={tmp_path}: expected a HF-native LLaVA folder (config.json with text_config and its "
        "weights), a stage-1 folder holding projector.safetensors, an original-format LLaVA checkpoint (config.json "
        "with mm_* fields and its weights) or an original mm_projector.bin"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_components(make_cfg(model={"init_from": str(tmp_path)}))


def test_qlora_without_cuda_is_a_clear_error(make_cfg) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = make_cfg(lora={"enabled": True, "bits": 4})
    with pytest.raises(RuntimeError, match=re.escape("lora.bits=4 (QLoRA) needs CUDA and bitsandbytes")):
        load_components(cfg)
