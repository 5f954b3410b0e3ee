"""Shared test helpers: a tiny random-init LLaVA, dataset-like items for it, the tiny end-to-end runs' data.

Importable from any test module (pytest puts `tests/` on sys.path for its conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

IMAGE_TOKEN = 99
TOKENS_PER_IMAGE = 4  # (16 // 8) ** 2 patches, CLS dropped


def tiny_llava(attn: str, seed: int = 0) -> Any:
    """A random-init LlavaForConditionalGeneration built from config (Llama LM + CLIP tower)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    vision = CLIPVisionConfig(
        image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(cfg).train()


def sample(n_text: int, n_images: int, seed: int, sid: str) -> dict[str, Any]:
    """An item as the dataset yields it: image blocks first, then text; labels on the second half of the text."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 90, (n_text,), generator=g)
    ids = torch.cat([torch.full((n_images * TOKENS_PER_IMAGE,), IMAGE_TOKEN), text])
    labels = torch.full_like(ids, -100)
    labels[-(n_text // 2) :] = ids[-(n_text // 2) :]
    item: dict[str, Any] = {"input_ids": ids, "labels": labels, "num_images": n_images, "id": sid}
    if n_images:
        item["pixel_values"] = torch.randn(n_images, 3, 16, 16, generator=g)
    return item


def write_caption_data(root: Path, n: int = 16) -> dict[str, str]:
    """Solid-colour images with one-line captions (stage-1 data)."""
    from PIL import Image

    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 40)}
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        name = list(colours)[i % 4]
        Image.new("RGB", (40, 32), colours[name]).save(root / "images" / f"{i}.png")
        rows.append(
            {
                "id": str(i),
                "image": f"{i}.png",
                "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"a {name} image"}],
            }
        )
    (root / "pretrain.json").write_text(json.dumps(rows))
    return {"path": str(root / "pretrain.json"), "image_folder": str(root / "images")}


def make_parts(
    tokenizer: Any,
    num_image_tokens: Any,
    image_token_id: int,
    template: Any = "vicuna_v1",
    image_processor: Any = None,
    image_token: str = "<image>",
) -> Any:
    """The `components.Components` the data functions take, from test pieces (a template name or a Template;
    tokens per image as an int (LLaVA-1.5, `pad`) or a `model.vision.ImageGeometry`)."""
    from types import SimpleNamespace

    from llava_train.components import Components
    from llava_train.data.templates import Template, get_template
    from llava_train.model.vision import ImageGeometry

    if isinstance(num_image_tokens, int):
        num_image_tokens = ImageGeometry("llava", 0, 0, num_image_tokens, num_image_tokens)

    if not isinstance(template, Template):
        template = get_template(template, image_token=image_token)
    processor = SimpleNamespace(image_processor=image_processor, tokenizer=tokenizer)
    return Components(tokenizer, template, processor, num_image_tokens, image_token_id)


# -- the tiny end-to-end runs (tests/test_train.py, tests/training/test_safety.py) ----------------------

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 40)}


def write_tiny_data(root: Path, n: int = 32, text_only: int = 4) -> dict[str, str]:
    """Solid-colour images with captions (stage 1) and colour Q&A with a few text-only rows (stage 2)."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    pre, ft = [], []
    names = list(COLOURS)
    from PIL import Image

    for i in range(n):
        colour = names[i % len(names)]
        Image.new("RGB", (40, 32), COLOURS[colour]).save(images / f"{i}.png")
        pre.append(
            {
                "id": f"p{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "Describe the image.\n<image>"},
                    {"from": "gpt", "value": f"a {colour} image"},
                ],
            }
        )
        ft.append(
            {
                "id": f"f{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is it?"},
                    {"from": "gpt", "value": colour},
                    {"from": "human", "value": "Answer again."},
                    {"from": "gpt", "value": colour},
                ],
            }
        )
    for i in range(text_only):
        ft.append(
            {
                "id": f"t{i}",
                "conversations": [
                    {"from": "human", "value": f"Say {names[i % 4]}."},
                    {"from": "gpt", "value": names[i % 4]},
                ],
            }
        )
    (root / "pretrain.json").write_text(json.dumps(pre))
    (root / "finetune.json").write_text(json.dumps(ft))
    return {"pretrain": str(root / "pretrain.json"), "finetune": str(root / "finetune.json"), "images": str(images)}


def tiny_config(ws: dict[str, str], stage: str, out: str, **train: object):
    template = "plain" if stage == "pretrain" else "vicuna_v1"
    data = ws["pretrain"] if stage == "pretrain" else ws["finetune"]
    train_args = {
        "output_dir": out,
        "max_steps": 20,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 10,
        "seed": 0,
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "report_to": [],
        "disable_tqdm": True,
    }
    train_args.update(train)
    return {
        "stage": stage,
        "model": {"language_model": ws["lm"], "vision_tower": ws["vision"], "preset": "tiny", "dtype": "float32"},
        "data": {
            "train": [{"path": data, "image_folder": ws["images"]}],
            "template": template,
            "model_max_length": 256,
            "group_by_modality_length": stage == "finetune",
        },
        "train": train_args,
    }


def losses(history: list[dict]) -> dict[int, float]:
    """step -> logged training loss of a Trainer log history."""
    return {h["step"]: h["loss"] for h in history if "loss" in h}


# -- anyres / OneVision runs (tests/test_archs.py, tests/distributed/test_anyres_zero3.py) -----------------

# (width, height) of the mixed-size images: wide, tall, square, very wide, very tall, large square.
ANYRES_SIZES = [(40, 32), (32, 96), (80, 30), (50, 50), (20, 70), (64, 64)]


def write_anyres_data(root: Path, arch: str, n: int = 24, text_only: int = 3, frames: int = 5) -> dict[str, str]:
    """Solid-colour images of mixed sizes: captions (stage 1) and colour Q&A (stage 2) with text-only rows;
    for llava_onevision also two-image rows (every 6th) and one video row (a folder of `frames` frames)."""
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    pre, ft = [], []
    for i in range(n):
        w, h = ANYRES_SIZES[i % len(ANYRES_SIZES)]
        colour = names[i % 4]
        Image.new("RGB", (w, h), COLOURS[colour]).save(images / f"{i}.png")
        pre.append(
            {
                "id": f"p{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>"},
                    {"from": "gpt", "value": f"a {colour} image"},
                ],
            }
        )
        row: dict = {
            "id": f"f{i}",
            "image": f"{i}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is it?"},
                {"from": "gpt", "value": colour},
            ],
        }
        if arch == "llava_onevision" and i % 6 == 5:
            other = names[(i - 1) % 4]
            row = {
                "id": f"m{i}",
                "image": [f"{i}.png", f"{i - 1}.png"],
                "conversations": [
                    {"from": "human", "value": "<image>\n<image>\nWhich colours?"},
                    {"from": "gpt", "value": f"{colour} and {other}"},
                ],
            }
        ft.append(row)
    if arch == "llava_onevision":
        video = images / "video0"
        video.mkdir(exist_ok=True)
        for k in range(frames):
            Image.new("RGB", (48, 36), COLOURS[names[k % 4]]).save(video / f"{k:03d}.png")
        ft.append(
            {
                "id": "v0",
                "video": "video0",
                "conversations": [
                    {"from": "human", "value": "<video>\nWhat happens?"},
                    {"from": "gpt", "value": "the colour changes"},
                ],
            }
        )
    for i in range(text_only):
        ft.append(
            {
                "id": f"t{i}",
                "conversations": [
                    {"from": "human", "value": f"Say {names[i % 4]}."},
                    {"from": "gpt", "value": names[i % 4]},
                ],
            }
        )
    (root / "pretrain.json").write_text(json.dumps(pre))
    (root / "finetune.json").write_text(json.dumps(ft))
    return {"pretrain": str(root / "pretrain.json"), "finetune": str(root / "finetune.json"), "images": str(images)}
