"""`llava-train trace`, and the original LLaVA splice checked against the HF-native merge (docs/walkthrough.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image

from llava_train.cli import main
from llava_train.components import load_components
from llava_train.config import load_config
from llava_train.tools.trace import capture_forward, collate_one, data_steps

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200  # the original LLaVA's placeholder id (llava/constants.py)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny finetune config: a single-image row, a two-image row, a text-only row (images of two sizes)."""
    root = tmp_path_factory.mktemp("trace")
    images = root / "images"
    images.mkdir()
    Image.new("RGB", (40, 32), (220, 30, 30)).save(images / "red.png")
    Image.new("RGB", (24, 48), (30, 30, 220)).save(images / "blue.png")
    rows = [
        {
            "id": "one",
            "image": "red.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is it?"},
                {"from": "gpt", "value": "red"},
                {"from": "human", "value": "Sure?"},
                {"from": "gpt", "value": "yes, red"},
            ],
        },
        {
            "id": "two",
            "image": ["red.png", "blue.png"],
            "conversations": [
                {"from": "human", "value": "<image>\n<image>\nThe colours?"},
                {"from": "gpt", "value": "red and blue"},
            ],
        },
        {"id": "text", "conversations": [{"from": "human", "value": "Say red."}, {"from": "gpt", "value": "red"}]},
    ]
    (root / "data.json").write_text(json.dumps(rows))
    cfg = {
        "stage": "finetune",
        "model": {
            "language_model": str(root / "lm"),
            "vision_tower": str(root / "vision"),
            "preset": "tiny",
            "dtype": "float32",
        },
        "data": {
            "train": [{"path": str(root / "data.json"), "image_folder": str(images)}],
            "template": "vicuna_v1",
            "model_max_length": 256,
        },
        "train": {"output_dir": str(root / "run")},
    }
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def parts(config_file: Path) -> Any:
    return load_components(load_config(str(config_file)), weights=True)


def test_trace_prints_every_step_and_writes_the_same_as_json(config_file: Path, capsys: pytest.CaptureFixture) -> None:
    out_json = config_file.parent / "trace.json"
    assert main(["trace", str(config_file), "--index", "0", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    for title in (
        "1. raw row",
        "2. normalised conversation",
        "3. rendered prompt",
        "4. input_ids / labels",
        "5. image preprocessing",
        "6. vision tower",
        "7. projector",
        "8. merge into inputs_embeds",
        "9. logits and loss on trained positions only",
    ):
        assert f"== {title}" in text
    assert "[[ red</s>]]" in text and "[[ yes, red</s>]]" in text and "<image x16>" in text
    steps = json.loads(out_json.read_text())
    assert steps["sample"] == {"index": 0, "source": "data.json", "row": 0, "id": "one"}
    assert steps["conversation"][0] == {"role": "user", "text": "<image>\nWhat colour is it?"}
    tokens = steps["tokens"]
    ids, labels = tokens["input_ids"], tokens["labels"]
    assert tokens["image_tokens"] == 16 and tokens["tokens_per_image"] == [16] and tokens["length"] == len(ids)
    assert "<image>x16" in tokens["input_ids_collapsed"]
    trained = [i for i, v in enumerate(labels) if v != IGNORE_INDEX]
    assert tokens["trained_tokens"] == len(trained) == steps["loss"]["trained_positions"]
    assert [p["position"] for p in steps["loss"]["per_position"]] == trained
    # 40x32 padded to 40x40 with CLIP's mean colour, resized to the tiny tower's 32 px
    (image,) = steps["images"]["per_image"]
    assert image["size_wh"] == [40, 32] and image["pad_fill_rgb"] == [122, 116, 104] and image["padded_side"] == 40
    assert steps["images"]["pixel_values_shape"] == [1, 3, 32, 32]
    tower = steps["vision_tower"]
    assert tower["feature_layer"] == -2 and tower["feature_layer_shape"] == [1, 17, 32]
    assert tower["selected_shape"] == [1, 16, 32] and tower["dropped_per_crop"] == 1 and tower["selection_checked"]
    assert steps["projector"]["output_shape"] == [1, 16, 64] and steps["projector"]["features_are_projector_output"]
    merge = steps["merge"]
    start = ids.index(tokens["image_token_id"])
    assert merge["image_positions"] == [[start, start + 16]] and merge["replaced"] == 16
    assert merge["image_positions_equal_features"] and merge["text_positions_equal_token_embeddings"]
    assert merge["first_image_position_head"] == steps["projector"]["output_head"]
    assert steps["loss"]["losses_equal"] and steps["loss"]["logits_shape"][1] == len(ids)


def test_trace_of_a_text_only_sample_and_a_bad_index(config_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["trace", str(config_file), "--index", "2"]) == 0
    text = capsys.readouterr().out
    assert "no image (text-only sample; the LM alone)" in text and "== 6. vision tower" not in text
    assert "losses_equal: True" in text
    assert main(["trace", str(config_file), "--index", "3"]) == 2
    assert "error: sample index 3 out of range: the sources hold 3 rows (0..2)" in capsys.readouterr().err


# -- the original LLaVA splice, written independently of transformers' merge ---------------------------------


def collapse_image_blocks(ids: torch.Tensor, labels: torch.Tensor, image_token_id: int, per_image: int) -> tuple:
    """Our expanded ids/labels -> the original's form: each block of `per_image` image tokens becomes ONE
    IMAGE_TOKEN_INDEX (its label IGNORE_INDEX, as `preprocess_v1` masks the whole instruction)."""
    out_ids, out_labels, i = [], [], 0
    while i < len(ids):
        if int(ids[i]) == image_token_id:
            block = slice(i, i + per_image)
            assert bool((ids[block] == image_token_id).all()) and bool((labels[block] == IGNORE_INDEX).all())
            out_ids.append(IMAGE_TOKEN_INDEX)
            out_labels.append(IGNORE_INDEX)
            i += per_image
        else:
            out_ids.append(int(ids[i]))
            out_labels.append(int(labels[i]))
            i += 1
    return torch.tensor(out_ids), torch.tensor(out_labels)


def original_splice(model: Any, batch_ids: list, batch_labels: list, images: torch.Tensor) -> tuple:
    """LLaVA's `prepare_inputs_labels_for_multimodal` (llava_arch.py), restated: `encode_images` = tower hidden
    state at the feature layer, CLS dropped, projector; each IMAGE_TOKEN_INDEX is replaced by its image's
    features (labels IGNORE_INDEX there); a text-only sample consumes its zero image (the original dataset
    gives it one) as 0 features; then right padding with zeros. Returns (embeds [B, L, H], labels [B, L], lengths)."""
    config = model.config
    tower_out = model.model.vision_tower(images, output_hidden_states=True)
    selected = tower_out.hidden_states[config.vision_feature_layer][:, 1:]
    image_features = model.model.multi_modal_projector(selected)  # [images, P, H]
    embed = model.get_input_embeddings()
    new_embeds, new_labels, k = [], [], 0
    for ids, labels in zip(batch_ids, batch_labels):
        where = torch.nonzero(ids == IMAGE_TOKEN_INDEX).flatten().tolist()
        if not where:
            new_embeds.append(torch.cat([embed(ids), image_features[k][0:0]]))
            new_labels.append(labels)
            k += 1
            continue
        bounds = [-1, *where, len(ids)]
        parts_e, parts_l = [], []
        for j in range(len(bounds) - 1):
            text = ids[bounds[j] + 1 : bounds[j + 1]]
            parts_e.append(embed(text))
            parts_l.append(labels[bounds[j] + 1 : bounds[j + 1]])
            if j < len(where):
                parts_e.append(image_features[k])
                parts_l.append(torch.full((image_features.shape[1],), IGNORE_INDEX))
                k += 1
        new_embeds.append(torch.cat(parts_e))
        new_labels.append(torch.cat(parts_l))
    length = max(len(e) for e in new_embeds)
    embeds = torch.zeros(len(new_embeds), length, new_embeds[0].shape[-1])
    labels_out = torch.full((len(new_embeds), length), IGNORE_INDEX)
    for b, (e, lab) in enumerate(zip(new_embeds, new_labels)):
        embeds[b, : len(e)] = e
        labels_out[b, : len(lab)] = lab
    return embeds, labels_out, [len(e) for e in new_embeds]


@pytest.mark.parametrize("order", [[0], [1], [2], [0, 1, 2], [2, 1, 0]], ids=["one", "two", "text", "mix", "rmix"])
def test_original_splice_equals_hf_native_merge(config_file: Path, parts: Any, order: list[int]) -> None:
    cfg = load_config(str(config_file))
    items = [data_steps(cfg, parts, i)[1] for i in order]
    inputs = collate_one(parts, items, cfg.model.arch)
    got, _ = capture_forward(parts.model, inputs)
    hf_embeds, hf_labels = got["embeds"], inputs["labels"]
    per_image = parts.geometry.base_tokens
    originals = [collapse_image_blocks(it["input_ids"], it["labels"], parts.image_token_id, per_image) for it in items]
    # The original's data: images in sample order, a zero image for a text-only sample
    images = torch.cat(
        [it["pixel_values"] if "pixel_values" in it else torch.zeros(1, 3, 32, 32) for it in items], dim=0
    )
    assert sum(int((ids == IMAGE_TOKEN_INDEX).sum()) for ids, _ in originals) == sum(it["num_images"] for it in items)
    with torch.no_grad():
        embeds, labels, lengths = original_splice(parts.model, *zip(*originals), images)
    assert lengths == [len(it["input_ids"]) for it in items]
    for b, n in enumerate(lengths):
        assert torch.equal(labels[b, :n], hf_labels[b, :n])  # labels: identical, IGNORE over every image token
        torch.testing.assert_close(embeds[b, :n], hf_embeds[b, :n], rtol=0, atol=1e-6)
        assert bool((hf_labels[b, n:] == IGNORE_INDEX).all())  # our right padding is never trained either
