"""What you train is what you serve: the saved processor renders and tokenizes each turn to the training ids.

For every template, conversations with and without images go through training (`tokenize_conversation`)
and, turn by turn, through the processor as saved with a model and reloaded with `AutoProcessor`
(`apply_chat_template(..., add_generation_prompt=True)` then `processor(text=..., images=...)`, and the
one-call `apply_chat_template(..., tokenize=True)`); the ids must equal the training ids before each reply.
Processors are saved as every save does (`model.serving.save_serving_files`: left padding, end-of-turn eos).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from llava_train.config import from_dict
from llava_train.data.templates import TEMPLATES, run_template
from llava_train.data.tokenize import load_tokenizer, tokenize_conversation
from llava_train.llava_format import count_images, normalize_conversation, to_messages
from llava_train.model.processor import build_processor
from llava_train.model.serving import save_serving_files
from llava_train.model.sources import resolve_sources
from llava_train.model.vision import run_geometry
from llava_train.utils.modules import IGNORE_INDEX

N_IMG = 16  # tiny CLIP tower: (32 // 8) ** 2 patches, CLS dropped
# A Mistral-instruct style template: writes BOS itself, as Llama-2 / Mistral / Llama-3 templates do.
BOS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'system' %}{{ m['content'] + '\n' }}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)

ONE_IMAGE = [
    {"from": "human", "value": "What is in the image?\n<image>"},
    {"from": "gpt", "value": "A red square."},
    {"from": "human", "value": "Where is it?"},
    {"from": "gpt", "value": "At the top left."},
    {"from": "human", "value": "How many are there?"},
    {"from": "gpt", "value": "There are 2."},
]
TWO_IMAGES = [
    {"from": "human", "value": "<image>\n<image>\nCompare them."},
    {"from": "gpt", "value": "The first is red."},
    {"from": "human", "value": "<image>"},
    {"from": "gpt", "value": "Blue."},
]
TEXT_ONLY = [
    {"from": "human", "value": "Say hello."},
    {"from": "gpt", "value": "Hello."},
    {"from": "human", "value": "Again, please!"},
    {"from": "gpt", "value": "Hello again."},
]
# LLaVA's plain (stage-1) format has one caption per image row: single-turn conversations only.
PLAIN = {
    "one image": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a red square"}],
    "two images": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "two squares"}],
}
CONVERSATIONS = {"one image": ONE_IMAGE, "two images": TWO_IMAGES, "text only": TEXT_ONLY}


def _case(
    tmp_path_factory: pytest.TempPathFactory, tok_dir: str, vision_dir: str, template: str, **extra: Any
) -> tuple[Any, Any, Any]:
    """(training template, training tokenizer, the saved-and-reloaded processor) for a run config."""
    from transformers import AutoProcessor

    system = extra.pop("system_prompt", None)
    chat_template = extra.pop("chat_template", None)
    cfg = from_dict(
        {
            "model": {"language_model": tok_dir, "vision_tower": vision_dir, **extra},
            "data": {"template": template, "system_prompt": system},
            "train": {"output_dir": "unused"},
        }
    )
    tokenizer = load_tokenizer(tok_dir, image_token=cfg.model.image_token)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    template_obj = run_template(cfg)
    out = tmp_path_factory.mktemp("served")
    sources = resolve_sources(cfg, weights=False)
    processor = build_processor(cfg, tokenizer, template_obj, sources, run_geometry(cfg, sources.vision_config))
    save_serving_files(out, processor)
    try:
        return template_obj, tokenizer, AutoProcessor.from_pretrained(out)
    except ImportError:
        # OneVision without torchvision: what `llava-train predict` (infer.load) falls back to.
        from llava_train.model.processor import load_onevision_processor

        assert cfg.model.arch == "llava_onevision"
        return template_obj, tokenizer, load_onevision_processor(out)


def _images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (40 + 8 * i, 32), (200, 30 * i, 30)) for i in range(n)]


def _reply_starts(labels: list[int]) -> list[int]:
    """Index of the first trained token of each reply."""
    return [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX)]


def assert_served_as_trained(
    template: Any, tokenizer: Any, processor: Any, conversation: list[dict], geometry: Any = None
) -> int:
    """Turn by turn, both processor paths give the training ids before each reply; returns the turns checked.

    geometry: the anyres archs' `ImageGeometry` (each image's tokens from its size); None = LLaVA-1.5's N_IMG.
    """
    turns = normalize_conversation(conversation, template.image_token)
    images = _images(count_images(turns, template.image_token))
    image_id = tokenizer.convert_tokens_to_ids(template.image_token)
    per_image: Any = N_IMG
    if geometry is not None:
        per_image = [geometry.image_tokens(img.height, img.width, len(images)) for img in images]
    sample = tokenize_conversation(turns, template, tokenizer, image_id, per_image, len(images))
    starts = _reply_starts(sample.labels)
    assert len(starts) == len(turns) // 2
    messages = to_messages(turns, template.image_token)
    for k, start in enumerate(starts):
        history = messages[: 2 * k + 1]
        n = count_images(turns[: 2 * k + 1], template.image_token)
        expected = sample.input_ids[:start]
        prompt = processor.apply_chat_template(history, add_generation_prompt=True)
        served: Any = images[:n] or None
        if geometry is not None and geometry.arch == "llava_onevision" and n > 1:
            served = [served]  # one sample's images, nested: transformers' OneVision multi-image input
        got = processor(text=prompt, images=served, return_tensors="pt")["input_ids"][0].tolist()
        assert got == expected, (k, prompt)
        # String content (LLaVA-style text with tags) renders the same prompt.
        as_text = [{"role": t.role, "content": t.text} for t in turns[: 2 * k + 1]]
        assert processor.apply_chat_template(as_text, add_generation_prompt=True) == prompt
        # The one-call path (images inside the messages) tokenizes the same.
        with_images = [dict(m, content=list(m["content"])) for m in history]
        it = iter(images[:n])
        for m in with_images:
            m["content"] = [dict(c, image=next(it)) if c["type"] == "image" else c for c in m["content"]]
        one_call = processor.apply_chat_template(
            with_images, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        assert one_call["input_ids"][0].tolist() == expected, k
    return len(starts)


LLAMA_TEMPLATES = ["vicuna_v1", "llava_v1", "llama_2", "mistral"]


@pytest.mark.parametrize("name", LLAMA_TEMPLATES)
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_llava_templates_serve_the_training_ids(
    name: str, conv: str, llama_tokenizer_dir: str, clip_vision_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    template, tokenizer, processor = _case(tmp_path_factory, llama_tokenizer_dir, clip_vision_dir, name)
    assert (
        assert_served_as_trained(template, tokenizer, processor, CONVERSATIONS[conv]) == len(CONVERSATIONS[conv]) // 2
    )


@pytest.mark.parametrize("conv", list(PLAIN))
def test_plain_serves_the_training_ids(
    conv: str, llama_tokenizer_dir: str, clip_vision_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    template, tokenizer, processor = _case(tmp_path_factory, llama_tokenizer_dir, clip_vision_dir, "plain")
    assert assert_served_as_trained(template, tokenizer, processor, PLAIN[conv]) == 1


@pytest.mark.parametrize("name", ["chatml", "tokenizer"])
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_chatml_and_tokenizer_templates_serve_the_training_ids(
    name: str, conv: str, chatml_tokenizer_dir: str, siglip_vision_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    template, tokenizer, processor = _case(tmp_path_factory, chatml_tokenizer_dir, siglip_vision_dir, name)
    assert (
        assert_served_as_trained(template, tokenizer, processor, CONVERSATIONS[conv]) == len(CONVERSATIONS[conv]) // 2
    )


# Anyres archs: NeXT with a Llama tokenizer + CLIP, OneVision with a ChatML tokenizer + SigLIP (as released).
# In TWO_IMAGES every prefix already holds >= 2 images, so OneVision counts them as multi-image both ways.
ARCH_CASES = [
    ("llava_next", "vicuna_v1", "llama_tokenizer_dir", "clip_vision_dir"),
    ("llava_next", "mistral", "llama_tokenizer_dir", "clip_vision_dir"),
    ("llava_onevision", "chatml", "chatml_tokenizer_dir", "siglip_vision_dir"),
    ("llava_onevision", "tokenizer", "chatml_tokenizer_dir", "siglip_vision_dir"),
]


@pytest.mark.parametrize(("arch", "name", "tok", "vision"), ARCH_CASES)
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_anyres_processors_serve_the_training_ids(
    arch: str, name: str, tok: str, vision: str, conv: str, request: pytest.FixtureRequest, tmp_path_factory: Any
) -> None:
    from transformers import AutoConfig

    from llava_train.model.vision import image_geometry

    tok_dir, vision_dir = request.getfixturevalue(tok), request.getfixturevalue(vision)
    template, tokenizer, processor = _case(tmp_path_factory, tok_dir, vision_dir, name, arch=arch)
    geometry = image_geometry(arch, AutoConfig.from_pretrained(vision_dir), "patch")
    checked = assert_served_as_trained(template, tokenizer, processor, CONVERSATIONS[conv], geometry)
    assert checked == len(CONVERSATIONS[conv]) // 2


def test_every_template_is_covered() -> None:
    assert set(TEMPLATES) == {"plain", "chatml", "tokenizer", *LLAMA_TEMPLATES}


@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_tokenizer_template_that_writes_bos_serves_one_bos(
    conv: str, llama_tokenizer_dir: str, clip_vision_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    template, tokenizer, processor = _case(
        tmp_path_factory, llama_tokenizer_dir, clip_vision_dir, "tokenizer", chat_template=BOS_TEMPLATE
    )
    assert (
        assert_served_as_trained(template, tokenizer, processor, CONVERSATIONS[conv]) == len(CONVERSATIONS[conv]) // 2
    )
    prompt = processor.apply_chat_template([{"role": "user", "content": "Hi."}], add_generation_prompt=True)
    ids = processor(text=prompt)["input_ids"][0]
    assert ids[:2].count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


@pytest.mark.parametrize(("tok", "name"), [("chatml", "tokenizer"), ("llama", "vicuna_v1"), ("chatml", "chatml")])
def test_configured_system_prompt_is_served(
    tok: str, name: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tok_dir = request.getfixturevalue(f"{tok}_tokenizer_dir")
    vision = request.getfixturevalue("clip_vision_dir")
    template, tokenizer, processor = _case(tmp_path_factory, tok_dir, vision, name, system_prompt="Be brief.")
    assert assert_served_as_trained(template, tokenizer, processor, ONE_IMAGE) == 3
    prompt = processor.apply_chat_template([{"role": "user", "content": "Hi."}], add_generation_prompt=True)
    assert "Be brief." in prompt
    # A system message given at inference replaces the configured one, as in any chat template.
    given = [{"role": "system", "content": "Other."}, {"role": "user", "content": "Hi."}]
    prompt = processor.apply_chat_template(given, add_generation_prompt=True)
    assert "Other." in prompt and "Be brief." not in prompt


def test_custom_image_token(
    llama_tokenizer_dir: str, clip_vision_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`model.image_token: <img>`: data keeps LLaVA's `<image>` tags; training and serving use `<img>`."""
    template, tokenizer, processor = _case(
        tmp_path_factory, llama_tokenizer_dir, clip_vision_dir, "vicuna_v1", image_token="<img>"
    )
    assert processor.image_token == "<img>"
    assert assert_served_as_trained(template, tokenizer, processor, TWO_IMAGES) == 2
    turns = normalize_conversation(TWO_IMAGES, "<img>")
    assert turns[0].text == "<img>\n<img>\nCompare them." and turns[2].text == "<img>"
    sample = tokenize_conversation(turns, template, tokenizer, tokenizer.convert_tokens_to_ids("<img>"), N_IMG, 3)
    assert sample.num_images == 3


def test_image_only_turn_has_no_trailing_newline(
    llama_tokenizer_dir: str, clip_vision_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    template, _, processor = _case(tmp_path_factory, llama_tokenizer_dir, clip_vision_dir, "vicuna_v1")
    messages = [{"role": "user", "content": [{"type": "image"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True).endswith("USER: <image> ASSISTANT:")
    assert template.prompt(
        normalize_conversation([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}])
    )


def test_exported_template_file_is_written(
    chatml_tokenizer_dir: str, siglip_vision_dir: str, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    _, _, processor = _case(tmp_path_factory, chatml_tokenizer_dir, siglip_vision_dir, "tokenizer")
    processor.save_pretrained(tmp_path)
    assert "macro content(m)" in (tmp_path / "chat_template.jinja").read_text()


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_jinja_export_renders_every_conversation_as_training_does(
    name: str,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Whole conversations (replies included): the saved chat template's text equals `Template.prompt`."""
    chatml = name in ("chatml", "tokenizer")
    tok_dir = request.getfixturevalue("chatml_tokenizer_dir" if chatml else "llama_tokenizer_dir")
    vision = request.getfixturevalue("siglip_vision_dir" if chatml else "clip_vision_dir")
    template, tokenizer, processor = _case(tmp_path_factory, tok_dir, vision, name)
    conversations = PLAIN if name == "plain" else CONVERSATIONS
    for conv in conversations.values():
        turns = normalize_conversation(conv, template.image_token)
        served = processor.apply_chat_template(to_messages(turns, template.image_token))
        assert served == template.prompt(turns, tokenizer), conv
