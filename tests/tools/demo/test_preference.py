"""The demo's preference pairs: a true and a wrong answer of the same kind about one training image, multi-turn
prompts; the pairs validate as stage dpo rows; `configs/demo/dpo.yaml` parses."""

from __future__ import annotations

import json
from pathlib import Path

from llava_train.tools.demo import splits
from llava_train.tools.demo.preference import ONE_WORD, dpo_config, preference_rows


def test_pairs_prefer_the_true_answer_of_the_same_kind(tmp_path: Path) -> None:
    data = splits.generate(tmp_path / "data", n_pretrain=0, n_finetune=120, n_eval=0, image_size=32, seed=1)
    rows = json.loads(Path(data.finetune).read_text())
    pairs = preference_rows(rows, seed=0)
    assert pairs == preference_rows(rows, seed=0)  # seeded
    by_id = {r["id"]: r for r in rows}
    answers = {k: {r["conversations"][2 * i + 1]["value"] for r in rows for i, t in enumerate(r["types"]) if t == k}
               for k in ONE_WORD}  # fmt: skip
    assert len(pairs) > 60
    for p in pairs:
        row = by_id[p["id"].removeprefix("pref-")]
        k = (len(p["prompt"]) - 1) // 2
        assert p["prompt"] == row["conversations"][: 2 * k + 1] and p["type"] == row["types"][k]
        assert p["chosen"] == row["conversations"][2 * k + 1]["value"]
        assert p["rejected"] != p["chosen"] and p["rejected"] in answers[p["type"]]
        assert p["image"] == row["image"]
    assert any(len(p["prompt"]) > 1 for p in pairs)  # multi-turn prompts


def test_dpo_config_moves_paths(tmp_path: Path) -> None:
    cfg = dpo_config(tmp_path, steps=7)
    assert (cfg.stage, cfg.dpo.reference, cfg.train["max_steps"]) == ("dpo", "frozen", 7)
    assert cfg.model.init_from == str(tmp_path / "model") and cfg.output_dir == str(tmp_path / "model_dpo")
    assert cfg.data.train[0].path == str(tmp_path / "data" / "preference.json")
