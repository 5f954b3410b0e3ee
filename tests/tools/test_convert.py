"""`llava-train convert`: original checkpoints and mm_projector.bin to HF-native folders plain transformers loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from llava_train.cli import main
from llava_train.model.tiny import write_tiny_language_model, write_tiny_vision_tower
from original_format import (
    hf_name,
    original_state,
    projector_tensors,
    write_original_checkpoint,
    write_original_projector,
)

VOCAB = 512


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("convert")
    lm = write_tiny_language_model(root / "lm")
    vt = write_tiny_vision_tower(root / "clip")
    state = original_state(lm, vt, with_tower=True, seed=3)
    return {
        "root": root,
        "lm": lm,
        "vt": vt,
        "state": state,
        "bin": write_original_checkpoint(root / "orig", lm, vt, "bin", torch.float16, state=state),
        "projector": write_original_projector(root / "stage1", lm, vt),
    }


def _prompt_batch(processor, text: str = "What colour is it?"):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return prompt, processor(images=Image.new("RGB", (40, 30), (200, 30, 10)), text=prompt, return_tensors="pt")


def test_convert_round_trips_exactly_and_matches_the_hf_native_model(parts: dict, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    out = tmp_path / "hf"
    assert main(["convert", str(parts["bin"]), "--out", str(out)]) == 0
    converted = AutoModelForImageTextToText.from_pretrained(str(out))
    assert converted.dtype == torch.float16  # the source's torch_dtype
    got = converted.state_dict()
    reference_state = {}
    for key, tensor in parts["state"].items():
        name = hf_name(key)
        if name is None:
            continue
        value = got[name][:VOCAB] if name.endswith(("embed_tokens.weight", "lm_head.weight")) else got[name]
        assert torch.equal(value, tensor.half()), key
        reference_state[name] = tensor.half().float()
    # The HF-native model built independently from the same tensors (the test's own key map) plus the one
    # embedding row the image token added, which the source does not have.
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        reference_state[name] = torch.cat([reference_state[name], got[name][VOCAB:].float()])
    config = AutoConfig.from_pretrained(str(out))
    reference = LlavaForConditionalGeneration(config).float().eval()
    reference.load_state_dict(reference_state, strict=True)
    converted = AutoModelForImageTextToText.from_pretrained(str(out), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(out))
    assert (processor.tokenizer.padding_side, processor.tokenizer.eos_token) == ("left", "</s>")  # served
    prompt, batch = _prompt_batch(processor)
    assert prompt == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat colour is it? ASSISTANT:"
    )
    assert batch["input_ids"][0].tolist().count(VOCAB) == 16
    with torch.no_grad():
        assert torch.equal(converted(**batch).logits, reference(**batch).logits)
    # The converted folder is itself a model.init_from (kind full) and a stage-1 source (projector.safetensors).
    from llava_train.model.init_source import init_source

    assert init_source(str(out)).kind == "full" and (out / "projector.safetensors").is_file()


def test_convert_projector_with_base_models_from_flags(parts: dict, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "from_projector"
    args = ["convert", str(parts["projector"] / "mm_projector.bin"), "--out", str(out)]
    assert main([*args, "--language-model", parts["lm"], "--dtype", "float32", "data.template=llava_v1"]) == 0
    model = AutoModelForImageTextToText.from_pretrained(str(out))
    for key, tensor in projector_tensors(64, 32).items():
        name = hf_name(key).removeprefix("model.multi_modal_projector.")
        assert torch.equal(model.model.multi_modal_projector.state_dict()[name], tensor.bfloat16().float()), key
    assert "curious human" in (out / "chat_template.jinja").read_text()


def test_convert_of_a_hf_native_folder_is_a_clear_error(parts: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "hf"
    assert main(["convert", str(parts["bin"]), "--out", str(out)]) == 0
    assert main(["convert", str(out), "--out", str(tmp_path / "again")]) == 2
    assert (
        f"llava-train: error: {out} is already a HF-native LLaVA folder; nothing to convert" in capsys.readouterr().err
    )
