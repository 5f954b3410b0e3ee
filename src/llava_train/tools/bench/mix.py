"""The synthetic LLaVA mixes the bench trains on: token ids + random pixel tensors (no JPEG decode is measured),
with each image's tokens and crops from the one geometry (`model.vision`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import Dataset

from llava_train.model.vision import ImageGeometry, image_geometry
from llava_train.tools.bench.presets import BOS_ID, BenchPreset
from llava_train.utils.modules import IGNORE_INDEX


def bench_geometry(preset: BenchPreset) -> ImageGeometry:
    """The preset's image geometry: the one formula (`model.vision`) on its CLIP tower and arch."""
    from transformers import CLIPVisionConfig

    return image_geometry(preset.arch, CLIPVisionConfig(**preset.vision), "patch")


def image_tokens_per_image(preset: BenchPreset) -> int:
    """LM tokens of each synthetic image (the preset's `image_hw` through its geometry)."""
    return bench_geometry(preset).image_tokens(*preset.image_hw)


def crops_per_image(preset: BenchPreset) -> int:
    """Tower crops of each synthetic image (1 for llava)."""
    return bench_geometry(preset).crops(*preset.image_hw)


def synthetic_layout(preset: BenchPreset, seed: int = 0) -> list[tuple[int, int, int]]:
    """(images, text tokens, trained tokens) per sample, deterministic in the seed.

    665k: 94% one image + lognormal text (median 120 tokens, sigma 1.0), 6% text-only lognormal
    (median 500, sigma 0.8); 60% of the text is answer tokens (trained). stage1: one image +
    uniform 20-60 caption tokens, all trained. Text lengths are multiplied by `length_scale`.
    Every sample fits `max_length` (BOS included).
    """
    g = torch.Generator().manual_seed(seed)
    n_img = image_tokens_per_image(preset)
    out = []
    for _ in range(preset.num_samples):
        u = float(torch.rand((), generator=g))
        z = float(torch.randn((), generator=g))
        s = preset.length_scale
        if preset.mix == "stage1":
            text = max(1, round(s * (20 + int(torch.randint(0, 41, (), generator=g)))))
            out.append((1, text, text))
            continue
        if preset.mix != "665k":
            raise KeyError(f"unknown mix {preset.mix!r}; valid mixes: 665k, stage1")
        images = 1 if u < 0.94 else 0
        median, sigma = (120, 1.0) if images else (500, 0.8)
        room = preset.max_length - 1 - images * n_img
        text = max(round(16 * s), min(room, round(s * median * math.exp(sigma * z))))
        out.append((images, text, max(1, int(0.6 * text))))
    return out


class SyntheticMix(Dataset):
    """Dataset items like `LlavaDataset`'s: BOS + image tokens + text; labels on the trailing answer tokens.

    `lengths` / `modality_lengths` are exact (what the samplers use); every image is the same random
    tensor (decoding is not what the bench measures; `data_wait_fraction` reports the loader cost).
    """

    def __init__(self, preset: BenchPreset, image_token_id: int, seed: int = 0) -> None:
        self.layout = synthetic_layout(preset, seed)
        self.n_img = image_tokens_per_image(preset)
        self.image_token_id = image_token_id
        self.vocab = preset.text["vocab_size"]
        self.seed = seed
        size = preset.vision["image_size"]
        self.crops = crops_per_image(preset)
        self.anyres = preset.arch != "llava"
        self.image_hw = list(preset.image_hw)
        self.image = torch.randn(self.crops, 3, size, size, generator=torch.Generator().manual_seed(seed))
        self.lengths = [1 + k * self.n_img + t for k, t, _ in self.layout]
        self.modality_lengths = [n if k else -n for n, (k, _, _) in zip(self.lengths, self.layout, strict=True)]

    has_video = False  # the mixes are images and text (the trainer's video keepalive stays off)

    def __len__(self) -> int:
        return len(self.layout)

    def summary(self) -> dict[str, Any]:
        """What the run's data report holds for a real source: sample and image counts."""
        return {
            "source": "synthetic",
            "samples": len(self.layout),
            "images": sum(k for k, _, _ in self.layout),
            "tokens_per_image": self.n_img,
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        images, text, trained = self.layout[i]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        words = torch.randint(3, self.image_token_id, (text,), generator=g)
        ids = torch.cat([torch.tensor([BOS_ID]), torch.full((images * self.n_img,), self.image_token_id), words])
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[-trained:] = ids[-trained:]
        item: dict[str, Any] = {"input_ids": ids, "labels": labels, "num_images": images, "id": i}
        if images:
            # [images x crops, 3, S, S]; anyres archs also take each image's size
            item["pixel_values"] = self.image.repeat(images, 1, 1, 1)
            if self.anyres:
                item["image_sizes"] = torch.tensor([self.image_hw] * images, dtype=torch.long)
        return item
