"""Time `llava-train data validate` twice on the same 20K-row LLaVA JSON: the scan, then its cache.

    .venv/bin/python scripts/measure_scan_cache.py [--rows 20000] [--workers 2] [--out /tmp/scan-cache]

Writes a tiny model preset (tokenizer + CLIP tower config, no weights are read), 20K rows that share
200 small PNG images (each row is still checked: the image exists and decodes), and runs the
command's library function twice, printing one JSON line with both wall times and their ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path


def write_rows(root: Path, rows: int, images: int = 200, seed: int = 0) -> Path:
    from PIL import Image

    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        Image.new("RGB", (48 + i % 17, 40), (i % 256, 80, 160)).save(root / "images" / f"{i}.png")
    words = [
        *("the", "a", "red", "green", "blue", "square", "circle", "left", "right", "top", "bottom"),
        *("small", "large", "image", "shape", "colour"),
    ]
    data = []
    for i in range(rows):
        question = " ".join(rng.choice(words) for _ in range(rng.randint(4, 16)))
        answer = " ".join(rng.choice(words) for _ in range(rng.randint(2, 40)))
        conv = [{"from": "human", "value": f"<image>\n{question}?"}, {"from": "gpt", "value": answer + "."}]
        data.append({"id": f"r{i}", "image": f"{i % images}.png", "conversations": conv})
    path = root / "train.json"
    path.write_text(json.dumps(data))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="/tmp/llava-scan-cache")
    args = parser.parse_args()

    from llava_train.commands import run_validate
    from llava_train.config import from_dict

    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    data = write_rows(root / "data", args.rows)
    cfg = from_dict(
        {
            "stage": "finetune",
            "model": {"language_model": str(root / "lm"), "vision_tower": str(root / "vision"), "preset": "tiny"},
            "data": {"train": [{"path": str(data), "image_folder": str(root / "data" / "images")}]},
            "train": {"output_dir": str(root / "run")},
        }
    )
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        report = run_validate(cfg, report_path=str(root / "report.json"), num_workers=args.workers)
        seconds.append(time.perf_counter() - start)
    line = {
        "rows": report["total_rows"],
        "workers": args.workers,
        "first_s": round(seconds[0], 2),
        "cached_s": round(seconds[1], 2),
        "ratio": round(seconds[0] / seconds[1], 1),
        "second_from_cache": all(s["from_cache"] for s in report["sources"]),
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
