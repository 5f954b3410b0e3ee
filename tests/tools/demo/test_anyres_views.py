"""The anyres demo's tower pretraining sees what the model sees: the views and per-patch targets of
`parts.anyres_view_maps` agree with transformers' own LLaVA-NeXT / OneVision image processors, and the training
batch (dataset item -> collator -> model) puts the same image features at the image tokens as the saved
processor does at serving time, on images whose content says where each pixel came from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llava_train.model.vision import default_pinpoints
from llava_train.tools.demo import parts

CROP = 64
# (width, height): the demo's mixed sizes and odd ones that pad a grid on either axis.
SIZES = [(64, 64), (96, 64), (128, 64), (64, 96), (64, 128), (150, 70), (70, 150), (200, 200)]


def _position_image(width: int, height: int) -> Image.Image:
    """Red = x, green = y (each 0..255 across the image), blue = 255: every pixel says where it is."""
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([(xx + 0.5) * 256 // width, (yy + 0.5) * 256 // height, np.full_like(xx, 255)], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def _image_processor(arch: str) -> object:
    import transformers

    cls = {"llava_next": "LlavaNextImageProcessorPil", "llava_onevision": "LlavaOnevisionImageProcessorPil"}[arch]
    common = {
        "image_mean": [0.0, 0.0, 0.0],
        "image_std": [1.0, 1.0, 1.0],
        "image_grid_pinpoints": default_pinpoints(arch, CROP),
        "do_pad": True,
    }
    if arch == "llava_next":
        return getattr(transformers, cls)(
            size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP}, **common
        )
    return getattr(transformers, cls)(size={"height": CROP, "width": CROP}, **common)


@pytest.mark.parametrize("arch", ["llava_next", "llava_onevision"])
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_view_maps_say_where_each_patch_of_the_processors_crops_comes_from(arch: str, width: int, height: int) -> None:
    processor = _image_processor(arch)
    assert parts.processor_crop(processor) == CROP
    pixels = processor(images=[_position_image(width, height)], return_tensors="pt")["pixel_values"][0]
    maps = parts.anyres_view_maps(width, height, CROP, default_pinpoints(arch, CROP))
    assert len(pixels) >= len(maps) and not pixels[len(maps) :].any()  # the rest is batch padding
    assert [whole for _, whole in maps] == [True] + [False] * (len(maps) - 1)
    checked = 0
    for view, (to_image, _) in enumerate(maps):
        for r in range(4, CROP, 8):
            for c in range(4, CROP, 8):
                x, y = to_image((c + 0.5) / CROP, (r + 0.5) / CROP)
                red, green, blue = (pixels[view, :, r, c] * 255).tolist()
                if not (0 <= x < width and 0 <= y < height):
                    assert blue < 1, (view, r, c)  # the grid's zero padding
                    continue
                # The processor's pixel there encodes the image point the map names (within resampling).
                assert blue > 250 and abs(red - x * 256 / width) < 12 and abs(green - y * 256 / height) < 12, (
                    view,
                    r,
                    c,
                    (red, green),
                    (x, y),
                )
                checked += 1
    assert checked >= 64 * len(maps) // 2


def test_patch_targets_of_a_crop_ignore_the_cell_and_keep_the_object() -> None:
    # 128 x 64: grid 1 x 2 of 64 px crops; the right crop shows the image's x 64..128, i.e. the right third
    # (x >= 85.3) from crop x 21.3 on.
    obj = {"color": "red", "shape": "circle", "position": "top right", "size": "large"}
    maps = parts.anyres_view_maps(128, 64, CROP, default_pinpoints("llava_next", CROP))
    assert len(maps) == 3
    right = parts.patch_targets([obj], 128, 64, 8, maps[2][0], cell_head=False).view(8, 8, 5)
    assert (right[..., 3] == -100).all()
    objects = right[..., 4]
    assert (objects[:3, 3:] == 3).all() and not objects[:3, :3].any() and not objects[3:].any()
    base = parts.patch_targets([obj], 128, 64, 8, maps[0][0]).view(8, 8, 5)  # squashed: the 3 x 3 grid as is
    assert (base[:3, 6:, 3] == 3).all() and not base[:3, :5].any()


@pytest.mark.parametrize("arch", ["llava_next", "llava_onevision"])
def test_training_batch_puts_the_served_features_at_the_image_tokens(arch: str, tmp_path: Path) -> None:
    """Crop order, unpad and newlines as trained = as served: a 6-sample training batch of position images
    (wide, tall, square; two two-image rows) gives every image token the input embedding the saved
    processor's single-sample forward gives it (the model's own `pack_image_features` both times; the data
    side is what is checked)."""

    from llava_train.archs import DEFAULT_ASPECT_RATIO
    from llava_train.components import load_components
    from llava_train.data.collator import PaddingCollator
    from llava_train.data.dataset import build_dataset
    from llava_train.infer import load
    from llava_train.model.serving import save_serving_files
    from llava_train.tools.demo import splits
    from llava_train.tools.demo.run import DemoSize, stage_config

    w = tmp_path / "w"
    data = splits.generate(w / "data", 8, 8, 4, 64)
    parts.write_parts(w, data, DemoSize(lm_hidden=32, vision_hidden=32))
    folder = w / "pos"
    folder.mkdir()
    rows = []
    for k, size in enumerate([(128, 64), (64, 128), (96, 64), (64, 64)]):
        _position_image(*size).save(folder / f"{k}.png")
        conv = [{"from": "human", "value": "<image>\nWhere is the shape?"}, {"from": "gpt", "value": "center"}]
        rows.append({"id": f"p{k}", "image": f"{k}.png", "conversations": conv})
    for k, pair in enumerate([["0.png", "3.png"], ["3.png", "1.png"]]):  # two-image rows (OneVision: base views)
        conv = [{"from": "human", "value": "<image>\n<image>\nWhich?"}, {"from": "gpt", "value": "first"}]
        rows.append({"id": f"two{k}", "image": pair, "conversations": conv})
    (folder / "rows.json").write_text(json.dumps(rows))
    overrides = [f"model.arch={arch}", f"data.image_aspect_ratio={DEFAULT_ASPECT_RATIO[arch]}"]
    cfg = stage_config("finetune", w, init_from=None, overrides=[*overrides, "data.model_max_length=1024"])
    cfg.data.train[0].path, cfg.data.train[0].image_folder = str(folder / "rows.json"), str(folder)
    built = load_components(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        built.model.model.image_newline.normal_()  # a newline unlike any image feature
    built.model.save_pretrained(tmp_path / "served")
    save_serving_files(tmp_path / "served", built.processor, built.model.generation_config)
    model, processor = load(tmp_path / "served")
    dataset = build_dataset(cfg.data, built, cache_dir=None)
    batch = PaddingCollator(built.tokenizer.pad_token_id, batch_num_images=arch == "llava_onevision")(
        [dataset[i] for i in range(len(rows))]
    )
    seen: list[torch.Tensor] = []
    model.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["inputs_embeds"].detach()), with_kwargs=True
    )
    keys = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images")
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k in keys})
    trained = seen.pop()
    image_id = built.image_token_id
    for i, row in enumerate(rows):
        names = row["image"] if isinstance(row["image"], list) else [row["image"]]
        images = [Image.open(folder / name).convert("RGB") for name in names]
        question = row["conversations"][0]["value"].replace("<image>\n", "")
        content = [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        nested = [images] if arch == "llava_onevision" else images  # as infer's predictor passes them
        inputs = processor(text=text, images=nested, return_tensors="pt")
        with torch.no_grad():
            model(**{k: v for k, v in inputs.items() if k in keys})
        served = seen.pop()[0][inputs["input_ids"][0] == image_id]
        ours = trained[i][batch["input_ids"][i] == image_id]
        assert ours.shape == served.shape and torch.allclose(ours, served, atol=1e-5), row["image"]


def test_tower_pretrains_on_anyres_views_with_objects_pooled_over_views(tmp_path: Path) -> None:
    from llava_train.tools.demo import splits
    from llava_train.tools.demo.run import DemoSize, stage_config, tower_views

    w = tmp_path / "w"
    data = splits.generate(w / "data", 12, 12, 4, 64, mixed_sizes=True)
    _, vision = parts.write_parts(w, data, DemoSize(lm_hidden=32, vision_hidden=32))
    cfg = stage_config(
        "finetune", w, init_from=None, overrides=["model.arch=llava_next", "data.image_aspect_ratio=anyres"]
    )
    views = tower_views(cfg, "model")
    assert tower_views(cfg, "pad") is None
    rows = json.loads(data.eval.read_text())
    pixels, targets = parts._vision_batches(rows, data.image_folder, None, 8, views)
    assert pixels.shape == (4, 3, 3, 64, 64) and targets.shape == (4, 3 * 64, 5)  # every demo size: 3 views
    assert (targets[:, :64, 3] >= 0).all() and (targets[:, 64:, 3] == -100).all()  # cells: base view only
    history = parts.pretrain_vision_tower(vision, data, steps=3, batch_size=6, probe=data.eval, anyres=views)
    assert set(history["probe"]) == {"colour", "shape", "size"} and len(history["loss"]) == 3
