"""The demo's part pretraining: exact patch targets, towers and LMs that train and save as HF folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llava_train.data.templates import get_template
from llava_train.tools.demo import parts, shapes, splits
from llava_train.tools.demo.run import DemoSize


def _obj(color: str, shape: str, position: str, size: str = "large") -> dict[str, str]:
    return {"color": color, "shape": shape, "position": position, "size": size}


def test_patch_targets_square_image() -> None:
    # 64 px, 8 x 8 patches of 8 px: the top-left cell (x, y < 21.3) holds the centres 4, 12, 20 per axis.
    t = patch_grid(parts.patch_targets([_obj("blue", "triangle", "top left", "small")], 64, 64, 8))
    blue, triangle, small = list(shapes.COLORS).index("blue") + 1, 3, 1
    assert t[:3, :3].tolist() == [[[blue, triangle, small, 1, 1]] * 3] * 3
    assert int(t[3:].abs().sum()) == 0 and int(t[:, 3:].abs().sum()) == 0


def test_patch_targets_follow_the_padding_of_a_wide_image() -> None:
    # 96 x 64 padded to 96 x 96 (16 px bands above and below): patch rows 0-1 and 6-7 (centres 6, 18 and
    # 78, 90) partly or wholly padding; centre 18 - 16 = 2 is inside the image, row 0 (6 - 16 < 0) is not.
    t = patch_grid(
        parts.patch_targets([_obj("red", "circle", "bottom right"), _obj("red", "square", "top left")], 96, 64, 8)
    )
    occupied = (t[..., 0] > 0).int()
    assert occupied[0].tolist() == [0] * 8 and occupied[7].tolist() == [0] * 8
    # y in the image = centre - 16: rows 1..2 (2, 14) are in the top third (< 21.3), rows 5..6 (50, 62) the bottom
    assert occupied[1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]  # x centres 6, 18, 30 < 32 -> left third
    assert occupied[5].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert t[1, 0, 3] == 1 and t[5, 7, 3] == 9 and t[1, 0, 1] == 2 and t[5, 7, 1] == 1


def patch_grid(t: torch.Tensor) -> torch.Tensor:
    return t.view(8, 8, 5)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, shapes.DemoData, DemoSize]:
    root = tmp_path_factory.mktemp("parts")
    data = splits.generate(root / "data", 40, 40, 4, 32)
    size = DemoSize(image_size=32, lm_hidden=32, vision_hidden=32, vision_layers=2)
    return root, data, size


def test_pretrain_vision_tower_trains_and_saves_a_plain_clip_folder(tiny_world) -> None:
    from transformers import CLIPVisionModel

    root, data, size = tiny_world
    _, vision = parts.write_parts(root / "w1", data, size)
    before = CLIPVisionModel.from_pretrained(vision).state_dict()
    history = parts.pretrain_vision_tower(vision, data, steps=30, batch_size=16, seed=0)
    assert set(history["accuracy"]) == {"colour", "shape", "size", "cell"}
    assert history["loss"][-1] < history["loss"][0]
    after = CLIPVisionModel.from_pretrained(vision).state_dict()  # heads dropped: the same keys
    assert after.keys() == before.keys()
    assert not torch.equal(after["encoder.layers.0.mlp.fc1.weight"], before["encoder.layers.0.mlp.fc1.weight"])


def test_lm_corpus_renders_both_templates_without_images(tiny_world) -> None:
    from transformers import AutoTokenizer

    root, data, size = tiny_world
    lm, _ = parts.write_parts(root / "w2", data, size)
    tokenizer = AutoTokenizer.from_pretrained(lm)
    docs = parts.lm_corpus(
        [(data.pretrain, get_template("plain")), (data.finetune, get_template("vicuna_v1"))], tokenizer
    )
    assert len(docs) == 80 and not any("<image>" in d for d in docs)
    captions = [d for d in docs if not d.startswith(get_template("vicuna_v1").system)]
    dialogues = [d for d in docs if d.startswith(get_template("vicuna_v1").system)]
    assert len(dialogues) == 40 and all(d.endswith("</s>") and " USER: " in d for d in dialogues)
    assert all(d.endswith("\n") and d.startswith("a ") for d in captions)
    history = parts.pretrain_language_model(
        lm, [(data.pretrain, get_template("plain"))], steps=20, seq_len=32, batch_size=8
    )
    assert history["loss"][-1] < history["loss"][0]
