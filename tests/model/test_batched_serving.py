"""Saved folders serve batches as they serve one prompt, and stop at the template's end of turn (`model.serving`).

Each folder is saved as every save does (model weights + `save_serving_files`) and loaded exactly as a client
loads it (`AutoModelForImageTextToText` / `AutoProcessor`, no llava-train helper in the generation path).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from llava_train.config import from_dict
from llava_train.data.templates import TEMPLATES
from llava_train.model.serving import end_of_turn_id, save_serving_files

ARCHS = ["llava", "llava_next", "llava_onevision"]
CHATML_TEMPLATES = ("chatml", "tokenizer")
# (question, images): different lengths and image counts, so the batch really pads.
REQUESTS = [
    ("What colour is it?", 1),
    ("Describe the picture in detail, then say which colour fills most of it, and where.", 1),
    ("Compare them.", 2),
]
SIZES = [(40, 32), (32, 96), (64, 64), (50, 50)]  # (width, height): anyres grids differ per image


@pytest.fixture(scope="module")
def parts_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny LMs (Llama-style, ChatML, ChatML on a base tokenizer) and towers (CLIP, SigLIP) as pretrained folders."""
    from llava_train.model.tiny import write_tiny_language_model, write_tiny_vision_tower

    root = tmp_path_factory.mktemp("serving_parts")
    dirs = {
        "llama": write_tiny_language_model(root / "llama", "llama"),
        "chatml": write_tiny_language_model(root / "chatml", "chatml"),
        "clip": write_tiny_vision_tower(root / "clip", "clip"),
        "siglip": write_tiny_vision_tower(root / "siglip", "siglip"),
    }
    # A base LM (Qwen2-base style): ChatML tokens exist, but eos is <|endoftext|> (id 0), not <|im_end|>.
    base = root / "base"
    shutil.copytree(dirs["chatml"], base)
    for name, key, value in [
        ("tokenizer_config.json", "eos_token", "<|endoftext|>"),
        ("config.json", "eos_token_id", 0),
        ("generation_config.json", "eos_token_id", 0),
    ]:
        data = json.loads((base / name).read_text())
        data[key] = value
        (base / name).write_text(json.dumps(data))
    dirs["base"] = str(base)
    return dirs


def _run_config(parts_dir: dict[str, str], lm: str, template: str, arch: str = "llava") -> Any:
    vision = parts_dir["siglip" if lm != "llama" else "clip"]
    model = {"language_model": parts_dir[lm], "vision_tower": vision, "arch": arch, "dtype": "float32"}
    data = {"template": template}
    return from_dict({"stage": "finetune", "model": model, "data": data, "train": {"output_dir": "x"}})


def _save(cfg: Any, out: Path) -> Any:
    """Save the run's model as the final folder does; returns the components (the training side)."""
    from llava_train.components import load_components

    torch.manual_seed(0)
    parts = load_components(cfg)
    parts.model.save_pretrained(str(out))
    save_serving_files(out, parts.processor, parts.model.generation_config)
    return parts


def _client(folder: Path) -> tuple[Any, Any]:
    """(model, processor) as a client loads them."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch.float32).eval()
    try:
        processor = AutoProcessor.from_pretrained(str(folder))
    except ImportError:
        # OneVision without torchvision (this CPU box): AutoProcessor insists on its torchvision-only video
        # processor; the same saved files read without video support.
        from llava_train.model.processor import load_onevision_processor

        processor = load_onevision_processor(folder)
    return model, processor


def _inputs(processor: Any, arch: str, requests: list[tuple[str, int]], first_image: int = 0) -> Any:
    prompts, images, k = [], [], first_image
    for question, n in requests:
        content = [{"type": "image"}] * n + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
        images.append([Image.new("RGB", SIZES[(k + j) % len(SIZES)], (40 * (k + j), 90, 200)) for j in range(n)])
        k += n
    # OneVision takes each prompt's images nested (several images: one crop each, as trained); the others flat.
    served = images if arch == "llava_onevision" else [img for group in images for img in group]
    return processor(text=prompts, images=served, padding=True, return_tensors="pt")


def _generate(model: Any, inputs: Any, **kwargs: Any) -> Any:
    with torch.inference_mode():
        return model.generate(
            **inputs, max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True, **kwargs
        )


CASES = [(arch, name) for arch in ARCHS for name in sorted(TEMPLATES)]


@pytest.mark.parametrize(("arch", "name"), CASES)
def test_batched_generation_equals_one_at_a_time(
    arch: str, name: str, parts_dir: dict[str, str], tmp_path: Path
) -> None:
    lm = "chatml" if name in CHATML_TEMPLATES else "llama"
    _save(_run_config(parts_dir, lm, name, arch), tmp_path)
    model, processor = _client(tmp_path)
    assert processor.tokenizer.padding_side == "left"
    batch = _inputs(processor, arch, REQUESTS)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) > 1, lengths  # the batch pads (`plain` keeps only the images of a question)
    together = _generate(model, batch)
    start = batch["input_ids"].shape[1]
    first = 0
    for i, request in enumerate(REQUESTS):
        single = _inputs(processor, arch, [request], first_image=first)
        first += request[1]
        assert single["input_ids"].shape[1] == lengths[i]
        alone = _generate(model, single)
        new = alone.sequences[0, lengths[i] :].tolist()
        assert together.sequences[i, start : start + len(new)].tolist() == new, (i, new)
        for step, scores in enumerate(alone.scores):  # next-token scores at every step of the answer
            diff = (together.scores[step][i] - scores[0]).abs().max().item()
            assert diff < 1e-2, (i, step, diff)


@pytest.mark.parametrize(
    ("lm", "name", "expected"),
    [
        ("llama", "plain", None),  # a newline ends a caption: no stop token
        ("llama", "vicuna_v1", "</s>"),
        ("llama", "llava_v1", "</s>"),
        ("llama", "llama_2", "</s>"),
        ("llama", "mistral", "</s>"),
        ("chatml", "chatml", "<|im_end|>"),
        ("chatml", "tokenizer", "<|im_end|>"),
        ("base", "chatml", "<|im_end|>"),
        ("base", "tokenizer", "<|im_end|>"),
    ],
)
def test_end_of_turn_token_of_every_template(lm: str, name: str, expected: str | None, parts_dir: dict) -> None:
    from llava_train.components import load_components

    processor = load_components(_run_config(parts_dir, lm, name), weights=False).processor
    eot = end_of_turn_id(processor)
    assert (None if eot is None else processor.tokenizer.convert_ids_to_tokens(eot)) == expected


def test_chatml_on_a_base_tokenizer_stops_at_end_of_turn_with_lmms_eval_convention(
    parts_dir: dict[str, str], tmp_path: Path
) -> None:
    """lmms-eval passes `eos_token_id=tokenizer.eos_token_id`: the saved tokenizer's eos must close the turn."""
    from transformers import AutoTokenizer

    from llava_train.llava_format import Turn

    parts = _save(_run_config(parts_dir, "base", "chatml"), tmp_path)
    assert parts.tokenizer.eos_token == "<|endoftext|>" and parts.tokenizer.padding_side == "right"  # training
    model, processor = _client(tmp_path)
    tok = processor.tokenizer
    im_end, endoftext = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token) == ("<|im_end|>", im_end, "<|endoftext|>")
    assert AutoTokenizer.from_pretrained(str(tmp_path)).eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == [im_end, endoftext]
    # The served chat template still renders the training prompt.
    turns = [Turn("user", "<image>\nWhat colour?"), Turn("assistant", "red")]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": "red"},
    ]
    assert processor.apply_chat_template(messages) == parts.template.prompt(turns, parts.tokenizer)
    # A stand-in for a trained model: the bias makes it answer one word, then <|im_end|>, then go on.
    word = tok("red", add_special_tokens=False)["input_ids"][0]
    bias = {(word,): 50.0, (word, im_end): 100.0}
    inputs = _inputs(processor, "llava", REQUESTS[:1])
    start = inputs["input_ids"].shape[1]
    lmms = _generate(model, inputs, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, sequence_bias=bias)
    assert lmms.sequences[0, start:].tolist() == [word, im_end]
    assert tok.decode(lmms.sequences[0, start:], skip_special_tokens=True) == tok.decode([word])
    default = _generate(model, inputs, sequence_bias=bias)  # the generation config's eos list
    assert default.sequences[0, start:].tolist() == [word, im_end]
    # The base tokenizer's own eos (what every folder saved before) lets the answer run on into new turns.
    old = _generate(model, inputs, eos_token_id=endoftext, pad_token_id=tok.pad_token_id, sequence_bias=bias)
    assert old.sequences[0, start:].tolist() == [word, im_end] * 3


def test_a_template_that_writes_eos_keeps_the_tokenizer_eos(parts_dir: dict[str, str]) -> None:
    """Changing eos would change what such a template renders: only the generation config lists the end of turn."""
    from transformers import AutoTokenizer, GenerationConfig

    from llava_train.model.serving import serving_generation_config, serving_processor

    tok = AutoTokenizer.from_pretrained(parts_dir["base"])
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tok) == im_end
    served = serving_processor(tok)
    assert (served.eos_token, served.padding_side, tok.padding_side) == ("<|endoftext|>", "left", "right")
    assert serving_generation_config(GenerationConfig(eos_token_id=0), tok).eos_token_id == [im_end, 0]
