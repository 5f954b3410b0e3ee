"""What each part of the LLaVA-NeXT image layout is worth to the anyres demo: controlled stage 1 + stage 2 runs.

    python scripts/demo_anyres_ablations.py --from runs/demo_next --workdir runs/next_ablations [--only crops-shuffled]

`--from` is a finished `llava-train demo --arch llava_next` work dir: its data and pretrained parts (tower and
LM) are reused, so every ablation differs from the demo's own stage 1 + stage 2 only in what the LM is shown at
the image positions. Each ablation changes transformers' `LlavaNextModel.pack_image_features` for the whole
run, training and eval alike (the eval goes through the same class), and keeps every token count, so the
processor's expanded prompts still line up:

- `newline-zeroed`: the `image_newline` after every grid row is a zero vector (the rows are not marked);
- `base-only`: the grid crops' features are zeroed (only the whole-image base view carries content);
- `crops-only`: the base view's features are zeroed (only the grid crops carry content);
- `crops-shuffled`: the grid crops are put in a fresh random order at every forward (the crop order, and so
  the grid's layout, carries nothing).

Unpad is not ablated: turning it off changes the number of image tokens, which the processor derives from
the same geometry; `tests/tools/demo/test_anyres_views.py` pins it (and the crop order) to transformers'.
Prints one table row per ablation (held-out exact match per question type) and writes `ablations.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ABLATIONS = ("none", "newline-zeroed", "base-only", "crops-only", "crops-shuffled")


def _edit(name: str) -> Callable[[list[torch.Tensor], Any], tuple[list[torch.Tensor], Any]]:
    """(image_features, image_newline) -> the ablated pair; each feature is [1 + crops, tokens, dim]."""

    def edit(features: list[torch.Tensor], newline: Any) -> tuple[list[torch.Tensor], Any]:
        out = []
        for f in features:
            if f.shape[0] > 1:  # base view + grid crops
                if name == "base-only":
                    f = torch.cat([f[:1], torch.zeros_like(f[1:])])
                elif name == "crops-only":
                    f = torch.cat([torch.zeros_like(f[:1]), f[1:]])
                elif name == "crops-shuffled":
                    f = torch.cat([f[:1], f[1:][torch.randperm(f.shape[0] - 1)]])
            out.append(f)
        if name == "newline-zeroed" and newline is not None:
            newline = torch.zeros_like(newline)
        return out, newline

    return edit


def patch(name: str) -> None:
    """Install ablation `name` on `LlavaNextModel.pack_image_features` (process-wide)."""
    from transformers.models.llava_next import modeling_llava_next as m

    original = getattr(m.LlavaNextModel, "_unablated_pack", m.LlavaNextModel.pack_image_features)
    m.LlavaNextModel._unablated_pack = original
    if name == "none":
        m.LlavaNextModel.pack_image_features = original
        return
    edit = _edit(name)

    def pack(
        self: Any,
        image_features: Any,
        image_sizes: Any,
        vision_feature_select_strategy: Any,
        image_newline: Any = None,
    ) -> Any:
        image_features, image_newline = edit(list(image_features), image_newline)
        return original(self, image_features, image_sizes, vision_feature_select_strategy, image_newline)

    m.LlavaNextModel.pack_image_features = pack


def run_one(name: str, source: Path, workdir: Path) -> dict[str, Any]:
    """Stage 1 + stage 2 + held-out eval under ablation `name`, on `source`'s data and pretrained parts."""
    from llava_train.archs import DEFAULT_ASPECT_RATIO
    from llava_train.tools.demo.report import evaluate_model
    from llava_train.tools.demo.run import stage_config
    from llava_train.tools.demo.shapes import DemoData
    from llava_train.train import run as train_run

    w = workdir / name
    w.mkdir(parents=True, exist_ok=True)
    for part in ("data", "models"):
        if not (w / part).exists():
            (w / part).symlink_to((source / part).resolve(), target_is_directory=True)
    overrides = [
        "model.arch=llava_next",
        f"data.image_aspect_ratio={DEFAULT_ASPECT_RATIO['llava_next']}",
        "data.model_max_length=1024",
    ]
    patch(name)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    try:
        train_run(stage_config("pretrain", w, overrides=overrides))
        train_run(stage_config("finetune", w, overrides=overrides))
        d = w / "data"
        data = DemoData(d, d / "images", d / "pretrain.json", d / "finetune.json", d / "eval.json", d / "meta.json")
        report = evaluate_model(w / "model", data, w / "eval", None, False)
    finally:
        patch("none")
    shutil.rmtree(w / "stage1", ignore_errors=True)  # the stage-2 model is kept; stage 1's folder is only its start
    exact = {k: round(v["exact_match"], 3) for k, v in report["per_type"].items()}
    return {"ablation": name, "exact_match": exact, "wall_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="source", type=Path, required=True, help="a finished llava_next demo work dir")
    ap.add_argument("--workdir", type=Path, default=Path("runs/next_ablations"))
    ap.add_argument("--only", nargs="*", choices=ABLATIONS, default=list(ABLATIONS[1:]), help="none: the control")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as the demo: the matrices are tiny
    rows = []
    for name in args.only:
        rows.append(run_one(name, args.source, args.workdir))
        print(json.dumps(rows[-1]), flush=True)
        (args.workdir / "ablations.json").write_text(json.dumps(rows, indent=1))
    types = list(rows[0]["exact_match"])
    print("| ablation | " + " | ".join(types) + " | wall |")
    print("| --- " * (len(types) + 2) + "|")
    for r in rows:
        cells = " | ".join(f"{r['exact_match'][t]:.0%}" for t in types)
        print(f"| {r['ablation']} | {cells} | {r['wall_s']:.0f} s |")


if __name__ == "__main__":
    main()
