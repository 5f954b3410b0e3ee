"""`scripts/demo_anyres_ablations.py` changes exactly what each ablation names in transformers' LLaVA-NeXT feature
packing, keeps every token count, and puts the original method back."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers.models.llava_next import modeling_llava_next as m

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "demo_anyres_ablations.py"


@pytest.fixture(scope="module")
def ablations():
    spec = importlib.util.spec_from_file_location("demo_anyres_ablations", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _features() -> list[torch.Tensor]:
    """One 2-crop-grid image ([base + 2 crops, 4 tokens, 3 dims], every value its crop's index + 1) and one
    base-view-only image ([1, 4, 3], value 9)."""
    grid = torch.arange(1, 4, dtype=torch.float32)[:, None, None].expand(3, 4, 3).clone()
    return [grid, torch.full((1, 4, 3), 9.0)]


def test_each_edit_changes_only_what_it_names(ablations) -> None:
    newline = torch.ones(3)
    feats, nl = ablations._edit("base-only")(_features(), newline)
    assert feats[0][:, 0, 0].tolist() == [1.0, 0.0, 0.0] and feats[1].eq(9).all() and nl is newline
    feats, nl = ablations._edit("crops-only")(_features(), newline)
    assert feats[0][:, 0, 0].tolist() == [0.0, 2.0, 3.0] and feats[1].eq(9).all() and nl is newline
    feats, nl = ablations._edit("newline-zeroed")(_features(), newline)
    assert feats[0][:, 0, 0].tolist() == [1.0, 2.0, 3.0] and nl.tolist() == [0.0, 0.0, 0.0]
    torch.manual_seed(0)
    orders = {
        tuple(ablations._edit("crops-shuffled")(_features(), newline)[0][0][:, 0, 0].tolist()) for _ in range(20)
    }
    assert orders == {(1.0, 2.0, 3.0), (1.0, 3.0, 2.0)}  # the base view stays first; the crops move


def test_patch_keeps_token_counts_and_restores_the_original(ablations) -> None:
    original = m.LlavaNextModel.pack_image_features
    config = m.LlavaNextConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "image_size": 16,
            "patch_size": 8,
            "hidden_size": 8,
            "num_attention_heads": 2,
            "intermediate_size": 16,
        },
        text_config={"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2},
        image_grid_pinpoints=[[16, 32]],
    )
    model = m.LlavaNextModel(config)
    feats = [torch.randn(3, 4, 8)]  # base view + a 1 x 2 grid of 2 x 2-token crops
    sizes = torch.tensor([[16, 32]])
    (want,), want_lens = original(model, feats, sizes, "default", model.image_newline)
    try:
        ablations.patch("crops-only")
        (got,), lens = model.pack_image_features(
            feats, sizes, vision_feature_select_strategy="default", image_newline=model.image_newline
        )
        assert got.shape == want.shape and lens.tolist() == want_lens.tolist()
        assert got[:4].eq(0).all() and torch.equal(got[4:], want[4:])  # base view zeroed, crops + newlines kept
    finally:
        ablations.patch("none")
    assert m.LlavaNextModel.pack_image_features is original
