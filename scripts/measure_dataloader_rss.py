"""Measure the memory of a 4-worker DataLoader over a synthetic 665K-row LLaVA JSON index.

Usage: .venv/bin/python scripts/measure_dataloader_rss.py [--rows 665000] [--workers 4] [--batches 200] [--dir DIR]

Writes a LLaVA-1.5-mix-like JSON list (94% one image, 6% text-only, 1-4 rounds), builds the dataset
(tiny tokenizer, tiny CLIP processor; rows converted once to memory-mapped .npy, exact lengths
scanned once and cached), then iterates a DataLoader and prints RSS and PSS (proportional set size:
shared pages are split between the processes that map them) of the main process and each worker,
next to the memory a plain `json.load` of the same file takes (what each worker would hold as a
Python list of dicts).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _pss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_full_info().pss)
    except (psutil.AccessDenied, AttributeError):
        return int(proc.memory_info().rss)


def write_rows(path: Path, rows: int) -> None:
    """A synthetic LLaVA JSON list in the shape of llava_v1_5_mix665k.json."""
    questions = ["What is in the image?", "Describe the picture in detail.", "What color is the car?", "Where?"]
    answers = ["The cat sits on the table.", "A red car near a blue house, and there are 2 of them.", "Yes.", "No."]
    with path.open("w") as f:
        f.write("[")
        for i in range(rows):
            rounds = 1 + i % 4
            conv = []
            for r in range(rounds):
                q = questions[(i + r) % 4]
                conv.append({"from": "human", "value": ("<image>\n" + q) if r == 0 and i % 16 else q})
                conv.append({"from": "gpt", "value": answers[(i * 3 + r) % 4]})
            row: dict = {"id": f"{i:07d}", "conversations": conv}
            if i % 16:
                row["image"] = f"img/{i % 8}.png"
            f.write(("," if i else "") + json.dumps(row))
        f.write("]")


def _write_tiled_scan(cfg: object, tok: object, rows: int, scan_rows: int) -> None:
    """Scan the first `scan_rows` rows and store their scan, tiled to `rows`, as the source's cached scan."""
    import numpy as np

    from llava_train.data import dataset as D

    if scan_rows % 16:
        raise SystemExit("--scan-rows must be a multiple of 16 (the period of the synthetic rows)")
    src = cfg.train[0]
    store = D.open_source(src, cfg.cache_dir)
    ctx = D.make_context(cfg, src, tok, 16, tok.convert_tokens_to_ids("<image>"))
    part = D.JsonRows(store.buf, store.offsets[: scan_rows + 1], store.lines[:scan_rows], store.path)
    t0 = time.perf_counter()
    scan = D.scan_source(part, ctx)
    print(f"scanned {scan_rows} rows in {time.perf_counter() - t0:.1f} s; tiling their lengths to {rows:,} rows")
    reps = -(-rows // scan_rows)
    arrays = {k: np.tile(getattr(scan, k), reps)[:rows] for k in ("lengths", "num_images", "reasons", "truncated")}
    base = Path(cfg.cache_dir) / f"scan-{D.scan_key(src, ctx, True)}"
    np.savez(base.with_suffix(".npz"), **arrays)
    base.with_suffix(".bad.json").write_text("[]")


def main() -> None:
    """Build the index, iterate the DataLoader, print the memory figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=665_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    parser.add_argument(
        "--scan-rows",
        type=int,
        default=None,
        help="scan only this many rows (a multiple of 16) and tile their exact lengths: the synthetic rows repeat "
        "with period 16, so the tiled lengths are exact (every __getitem__ re-checks its length); saves the "
        "full scan's CPU time on a busy machine",
    )
    args = parser.parse_args()

    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor

    from llava_train.config import DataConfig, SourceConfig
    from llava_train.data.collator import PaddingCollator
    from llava_train.data.dataset import build_dataset
    from llava_train.data.tiny_tokenizer import build_tiny_tokenizer
    from llava_train.data.tokenize import load_tokenizer

    work = Path(args.dir or tempfile.mkdtemp(prefix="llava_rss_"))
    (work / "img").mkdir(parents=True, exist_ok=True)
    for k in range(8):
        Image.new("RGB", (48 + 8 * k, 40), (30 * k, 100, 200)).save(work / "img" / f"{k}.png")
    data = work / "index.json"
    if not data.exists():
        t0 = time.perf_counter()
        write_rows(data, args.rows)
        print(f"wrote {args.rows:,} rows ({data.stat().st_size / 2**20:,.0f} MiB) in {time.perf_counter() - t0:.1f} s")

    # What one process holds after json.load of the file (a list of dicts), measured in a child.
    code = "import json,psutil,sys; d=json.load(open(sys.argv[1])); print(psutil.Process().memory_info().rss)"
    base = "import json,psutil; print(psutil.Process().memory_info().rss)"
    loaded = int(subprocess.check_output([sys.executable, "-c", code, str(data)]))
    empty = int(subprocess.check_output([sys.executable, "-c", base]))

    tok = load_tokenizer(build_tiny_tokenizer(work / "tok"))
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    cfg = DataConfig(
        train=[SourceConfig(str(data), image_folder=str(work))],
        template="vicuna_v1",
        model_max_length=2048,
        cache_dir=str(work / "cache"),
        num_workers=os.cpu_count(),
    )
    if args.scan_rows and args.scan_rows < args.rows:
        _write_tiled_scan(cfg, tok, args.rows, args.scan_rows)
    t0 = time.perf_counter()
    ds = build_dataset(cfg, tok, proc, 16, tok.convert_tokens_to_ids("<image>"))
    print(
        f"build_dataset: {len(ds):,} items in {time.perf_counter() - t0:.1f} s (cached scan: {ds.scans[0].from_cache})"
    )
    main_proc = psutil.Process()
    print(f"main process after build: RSS {_mib(main_proc.memory_info().rss)}")

    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        collate_fn=PaddingCollator(tok.pad_token_id),
        persistent_workers=True,
        generator=torch.Generator().manual_seed(0),
    )
    t0 = time.perf_counter()
    it = iter(loader)
    for _ in range(args.batches):
        next(it)
    elapsed = time.perf_counter() - t0
    workers = main_proc.children(recursive=True)
    worker_rss = [w.memory_info().rss for w in workers]
    worker_pss = [_pss(w) for w in workers]
    print(f"iterated {args.batches} batches of {args.batch_size} in {elapsed:.1f} s with {len(workers)} workers")
    print(f"main: RSS {_mib(main_proc.memory_info().rss)}, PSS {_mib(_pss(main_proc))}")
    for k, (r, p) in enumerate(zip(worker_rss, worker_pss)):
        print(f"worker {k}: RSS {_mib(r)}, PSS {_mib(p)}")
    total = _pss(main_proc) + sum(worker_pss)
    print(f"total PSS (main + {len(workers)} workers): {_mib(total)}")
    print(
        f"for comparison: json.load of the index in one process adds {_mib(loaded - empty)} "
        f"(x{args.workers + 1} processes = {_mib((loaded - empty) * (args.workers + 1))} if each held a copy)"
    )
    del it


if __name__ == "__main__":
    main()
