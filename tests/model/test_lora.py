"""LoRA on language-model linears only, projector as a saved trainable copy, merge into a HF-native folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from llava_train.components import load_components
from llava_train.config import dump_config
from llava_train.model.freeze import apply_stage, group_of, strip_wrappers, trainable_names
from llava_train.model.lora import apply_lora, lora_target_modules
from llava_train.model.projector import projector_module
from llava_train.training.lora_merge import merge_lora

LM_LINEARS = [
    f"model.language_model.layers.{i}.{m}"
    for i in (0, 1)
    for m in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
]
PROJECTOR_COPY = [
    f"model.multi_modal_projector.modules_to_save.default.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")
]


def _lora_model(make_cfg, tmp_path: Path | None = None, **lora):
    cfg = make_cfg(lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, **lora})
    parts = load_components(cfg)
    model, processor, tokenizer = parts.model, parts.processor, parts.tokenizer
    model = apply_lora(model, cfg)
    apply_stage(model, cfg)
    return cfg, model, processor, tokenizer


def _adapted_modules(model) -> list[str]:
    names = {strip_wrappers(n).split(".lora_")[0] for n, _ in model.named_parameters() if ".lora_" in n}
    return sorted(names)


def test_target_modules_are_language_model_linears_only(make_cfg) -> None:
    model = load_components(make_cfg()).model
    assert lora_target_modules(model) == LM_LINEARS
    assert lora_target_modules(model, ["q_proj", "v_proj"]) == [
        n for n in LM_LINEARS if n.endswith(("q_proj", "v_proj"))
    ]
    expected = (
        "lora.target_modules ['qkv'] match no linear layer of the language model; available: "
        "['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        lora_target_modules(model, ["qkv", "q_proj"])


def test_adapters_and_trainable_set(make_cfg) -> None:
    _, model, _, _ = _lora_model(make_cfg)
    assert _adapted_modules(model) == sorted(LM_LINEARS)
    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora_names and all(group_of(n) == "language_model" for n in lora_names)
    assert not any("lora_" in n for n, _ in model.named_parameters() if group_of(n) != "language_model")
    assert trainable_names(model, "multi_modal_projector") == PROJECTOR_COPY
    assert trainable_names(model, "vision_tower") == []
    assert trainable_names(model, "lm_head") == []
    expected_lm = [f"{m}.lora_{ab}.default.weight" for m in LM_LINEARS for ab in ("A", "B")]
    assert trainable_names(model, "language_model") == expected_lm


def test_only_listed_suffixes_get_adapters(make_cfg) -> None:
    _, model, _, _ = _lora_model(make_cfg, target_modules=["q_proj", "down_proj"])
    assert _adapted_modules(model) == sorted(n for n in LM_LINEARS if n.endswith(("q_proj", "down_proj")))


def test_adapter_checkpoint_holds_the_projector(make_cfg, tmp_path) -> None:
    _, model, _, _ = _lora_model(make_cfg)
    model.save_pretrained(str(tmp_path / "ckpt"))
    with safe_open(str(tmp_path / "ckpt" / "adapter_model.safetensors"), framework="pt") as f:
        keys = sorted(f.keys())  # noqa: SIM118
    projector = [k for k in keys if "multi_modal_projector" in k]
    assert projector == [
        f"base_model.model.model.multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("bias", "weight")
    ]
    assert len(keys) == 4 + 2 * len(LM_LINEARS)


def _train_like(model) -> None:
    # LoRA B starts at zero (a no-op adapter); give adapters and projector copy non-trivial values.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)


def _batch(processor):
    images = [Image.new("RGB", (48, 40), (250, 120, 5)), Image.new("RGB", (32, 32), (5, 60, 200))]
    texts = ["USER: <image>\nWhat is in the image? ASSISTANT:", "USER: <image>\nDescribe it. ASSISTANT: A dog"]
    return processor(text=texts, images=images, padding=True, return_tensors="pt")


def test_merge_matches_adapter_model(make_cfg, tmp_path) -> None:
    from transformers import LlavaForConditionalGeneration

    cfg, model, processor, _ = _lora_model(make_cfg)
    _train_like(model)
    run = tmp_path / "run"
    model.save_pretrained(str(run / "adapter"))
    dump_config(cfg, run / "llava_train_config.yaml")
    out = Path(merge_lora(run, tmp_path / "merged"))
    # Names transformers writes for processors differ across 5.x (processor_config.json holds the image
    # processor in newer versions); the model, config, tokenizer and our files are fixed.
    required = {"config.json", "generation_config.json", "llava_train_config.yaml", "model.safetensors"}
    required |= {"processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert required <= {p.name for p in out.iterdir()}
    assert not (out / "adapter_config.json").exists()
    assert json.loads((out / "tokenizer_config.json").read_text())["padding_side"] == "left"  # served
    merged = LlavaForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32)
    assert not any("lora_" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    batch = _batch(processor)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        got = merged(**batch).logits
    assert (got - expected).abs().max().item() < 1e-4
    assert torch.equal(
        merged.model.multi_modal_projector.linear_2.weight, projector_module(model).linear_2.weight.detach()
    )


def test_final_save_of_a_lora_run_writes_adapter_and_merged_folder(make_cfg, tmp_path) -> None:
    from llava_train.training.checkpoint import save_final

    cfg, model, processor, _ = _lora_model(make_cfg)
    _train_like(model)
    out = tmp_path / "final"
    cfg.train["output_dir"] = str(out)
    trainer = SimpleNamespace(
        model=model,
        save_model=lambda path: model.save_pretrained(path),
        args=SimpleNamespace(world_size=1, should_save=True),
    )
    save_final(cfg, trainer, processor)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not (out / "adapter_config.json").exists()


def test_merged_folder_loads_with_plain_transformers(make_cfg, tmp_path) -> None:
    cfg, model, _, _ = _lora_model(make_cfg)
    _train_like(model)
    run = tmp_path / "run"
    model.save_pretrained(str(run / "adapter"))
    dump_config(cfg, run / "llava_train_config.yaml")
    out = merge_lora(run, tmp_path / "merged")
    script = textwrap.dedent(
        f"""
        import sys
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor
        model = AutoModelForImageTextToText.from_pretrained({str(out)!r})
        processor = AutoProcessor.from_pretrained({str(out)!r})
        messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Hi?"}}]}}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=[prompt], images=[Image.new("RGB", (32, 32), (9, 9, 9))], return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert ids.shape[1] == inputs["input_ids"].shape[1] + 3, ids.shape
        assert inputs["input_ids"][0].tolist().count(model.config.image_token_id) == 16
        assert "llava_train" not in sys.modules
        print("OK", type(model).__name__, type(processor).__name__)
        """
    )
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "OK LlavaForConditionalGeneration LlavaProcessor"


@pytest.mark.gpu
def test_qlora_4bit_builds_and_trains_adapters_only(make_cfg) -> None:
    if not torch.cuda.is_available():
        pytest.skip("QLoRA needs CUDA")
    pytest.importorskip("bitsandbytes")
    cfg = make_cfg(lora={"enabled": True, "r": 4, "alpha": 8, "bits": 4}, model={"dtype": "bfloat16"})
    model = load_components(cfg).model
    assert type(model.model.language_model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert type(model.model.vision_tower.encoder.layers[0].self_attn.q_proj).__name__ == "Linear"
    model = apply_lora(model, cfg)
    apply_stage(model, cfg)
    assert trainable_names(model, "multi_modal_projector") == PROJECTOR_COPY
    assert trainable_names(model, "lm_head") == []
