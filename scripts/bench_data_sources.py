"""Data-source benchmark (not part of the test suite): a synthetic LLaVA index of N rows (default 10M) as JSONL shards
(image files) + parquet shards (embedded images), scanned cold, started warm, and served by a DataLoader.

Measures, each phase in a fresh process so imports and caches count as they do in a real run:
  scan     cold `build_dataset` (the per-shard scan with `--scan-workers` processes): rows/s
  warm     a fresh process until the dataset is built from the warm cache: seconds, main-process RSS
  loader   `--loader-workers` DataLoader workers serving `--batches` shuffled batches: RSS / USS / PSS per worker
  addshard one more JSONL shard: the next build scans only it

    python scripts/bench_data_sources.py --rows 1000000 --dir /tmp/bench_ds   # every row scanned (~13 min, 2 cores)
    python scripts/bench_data_sources.py --rows 10000000 --shard-rows 100000 --tile --dir /tmp/bench_ds10m
        # the 10M-row index with identical shards: one shard per source is scanned for real and its scan is
        # copied to the other 98 (same rows, same lengths), so warm start-up and per-worker memory are measured
        # at 10M rows; the scan rate is the first shards'.

Prints one JSON line per phase and a summary table (docs/performance.md, "Data sources").
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TEXT = (
    "the cat a dog red car blue sky small house green tree big city river runs under bridge old man reads book "
    "children play in park bright sun sets over hills quiet lake reflects mountains people walk along street"
)
WORDS = TEXT.split()
IMAGES = 16


def _png(k: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16 + 4 * k, 48 - 2 * k), (15 * k, 255 - 15 * k, 128)).save(buf, "PNG")
    return buf.getvalue()


def _row(i: int, with_image: bool) -> tuple[list[dict[str, str]], str]:
    """A text-heavy multi-turn conversation (deterministic in i)."""
    turns = []
    n_turns = 1 + i % 2
    for t in range(n_turns):
        q = " ".join(WORDS[(i * 7 + t * 13 + k) % len(WORDS)] for k in range(6 + (i + t) % 16))
        a = " ".join(WORDS[(i * 11 + t * 5 + k) % len(WORDS)] for k in range(8 + (i * 3 + t) % 40))
        if t == 0 and with_image:
            q = "<image>\n" + q
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a + "."}]
    return turns, f"{i % IMAGES}.png"


def generate(root: Path, rows: int, shard_rows: int, tile: bool = False) -> dict[str, Any]:
    """Half the rows as JSONL shards with image paths, half as parquet shards with embedded PNG bytes.

    tile: every shard holds the same conversations (row i is built from i % shard_rows; ids stay unique), so
    the scan of one shard per source is every shard's scan (`--tile`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    start = time.perf_counter()
    (root / "images").mkdir(parents=True, exist_ok=True)
    blobs = [_png(k) for k in range(IMAGES)]
    for k, b in enumerate(blobs):
        (root / "images" / f"{k}.png").write_bytes(b)
    (root / "jsonl").mkdir(exist_ok=True)
    (root / "parquet").mkdir(exist_ok=True)
    half = rows // 2
    for s, first in enumerate(range(0, half, shard_rows)):
        with (root / "jsonl" / f"part-{s:05d}.jsonl").open("w") as f:
            for i in range(first, min(half, first + shard_rows)):
                conv, image = _row(i % shard_rows if tile else i, i % 2 == 0)
                row = {"id": f"j{i}", "conversations": conv, **({"image": image} if i % 2 == 0 else {})}
                f.write(json.dumps(row) + "\n")
    for s, first in enumerate(range(half, rows, shard_rows)):
        ids, images, convs = [], [], []
        for i in range(first, min(rows, first + shard_rows)):
            conv, _ = _row((i - half) % shard_rows if tile else i, i % 2 == 0)
            ids.append(f"p{i}")
            images.append({"bytes": blobs[i % IMAGES], "path": None} if i % 2 == 0 else None)
            convs.append(conv)
        table = pa.table({"id": ids, "image": images, "conversations": convs})
        pq.write_table(table, root / "parquet" / f"train-{s:05d}.parquet", row_group_size=1000)
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return {"phase": "generate", "rows": rows, "seconds": round(time.perf_counter() - start, 1), "bytes": size}


def _config(root: Path, scan_workers: int, first_shards: bool = False) -> Any:
    """The run config of the bench data; `first_shards`: each source is only its first shard."""
    from llava_train.config import from_dict

    jsonl, parquet = root / "jsonl", root / "parquet"
    if first_shards:
        jsonl, parquet = sorted(jsonl.glob("*.jsonl"))[0], sorted(parquet.glob("*.parquet"))[0]
    return from_dict(
        {
            "stage": "finetune",
            "model": {"language_model": str(root / "lm"), "vision_tower": str(root / "vision"), "preset": "tiny"},
            "data": {
                "train": [
                    {"path": str(jsonl), "image_folder": str(root / "images"), "name": "jsonl"},
                    {"path": str(parquet), "name": "parquet"},
                ],
                "model_max_length": 2048,
                "on_bad_sample": "skip",
                "num_workers": scan_workers,
                "cache_dir": str(root / "cache"),
            },
            "train": {"output_dir": str(root / "run")},
        }
    )


def _rss_mb(pid: int | None = None) -> dict[str, float]:
    import psutil

    info = psutil.Process(pid).memory_full_info()
    return {k: round(getattr(info, k) / 2**20, 1) for k in ("rss", "uss", "pss") if hasattr(info, k)}


def _build(root: Path, scan_workers: int, first_shards: bool = False) -> tuple[Any, float]:
    from llava_train.components import load_components
    from llava_train.data.dataset import build_dataset

    cfg = _config(root, scan_workers, first_shards)
    parts = load_components(cfg, weights=False)
    start = time.perf_counter()
    ds = build_dataset(cfg.data, parts, seed=0, cache_dir=cfg.data.cache_dir)
    return ds, time.perf_counter() - start


def tile_caches(root: Path) -> dict[str, Any]:
    """Copy the scan of each source's first shard to the cache keys of its other (identical) shards."""
    import shutil

    from llava_train.components import load_components
    from llava_train.data import scan_cache
    from llava_train.data.dataset import make_context
    from llava_train.data.rows import open_source

    start = time.perf_counter()
    cfg = _config(root, 1)
    parts = load_components(cfg, weights=False)
    copies = 0
    for src in cfg.data.train:
        store = open_source(src, cfg.data.cache_dir)  # converts the JSONL shards to memory-mapped rows once
        ctx = make_context(cfg.data, src, parts)
        base = [
            Path(cfg.data.cache_dir) / f"scan-{scan_cache.scan_key(src, fp, ctx, True)}" for fp in store.fingerprints
        ]
        for target in base[1:]:
            for suffix in (".npz", ".bad.json"):
                shutil.copyfile(base[0].with_suffix(suffix), target.with_suffix(suffix))
            copies += 1
    return {"phase": "tile", "shard_copies": copies, "seconds": round(time.perf_counter() - start, 1)}


def phase(name: str, root: Path, args: argparse.Namespace, t0: float) -> dict[str, Any]:
    """One measured phase, run in this (fresh) process; `t0` is when the parent started it."""
    if name == "tile":
        return tile_caches(root)
    ds, build_s = _build(root, args.scan_workers, first_shards=args.tile and name == "scan")
    out: dict[str, Any] = {"phase": name, "items": len(ds), "build_seconds": round(build_s, 2)}
    out["scans"] = [
        {"source": r["name"], "rows": r["rows"], "bad": r["bad"], "shards_scanned": s.shards_scanned}
        for r, s in zip(ds.reports, ds.scans)
    ]
    if name in ("scan", "addshard"):
        scanned = sum(r["rows"] for r, s in zip(ds.reports, ds.scans) if s.shards_scanned)
        out["rows_per_second"] = round(len(ds) / build_s) if name == "scan" else None
        out["rows_in_scanned_sources"] = scanned
    out["startup_seconds"] = round(time.time() - t0, 2)
    out["main_mb"] = _rss_mb()
    if name == "loader":
        import torch

        from llava_train.data.collator import PaddingCollator

        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.loader_workers,
            collate_fn=PaddingCollator(0),
            persistent_workers=True,
        )
        it = iter(loader)
        start = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        out["batches_per_second"] = round(args.batches / (time.perf_counter() - start), 1)
        out["workers_mb"] = [_rss_mb(w.pid) for w in it._workers]  # the bench's one peek at a private attribute
        out["main_mb"] = _rss_mb()
    return out


def _spawn(name: str, args: argparse.Namespace) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--phase", name, "--t0", repr(time.time())]
    for key in ("rows", "dir", "scan_workers", "loader_workers", "batches", "batch_size", "shard_rows"):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    argv += ["--tile"] if args.tile else []
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--shard-rows", type=int, default=250_000)
    parser.add_argument("--dir", default="/tmp/bench_data_sources")
    parser.add_argument("--scan-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--tile",
        action="store_true",
        help="identical shards: scan one shard per source for real, copy its scan to the others (10M rows)",
    )
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.dir)
    if args.phase:
        print(json.dumps(phase(args.phase, root, args, args.t0)))
        return
    results = []
    if not (root / "jsonl").is_dir():
        results.append(generate(root, args.rows, args.shard_rows, args.tile))
        print(json.dumps(results[-1]), flush=True)
    for name in ("scan", "tile", "warm", "loader") if args.tile else ("scan", "warm", "loader"):
        results.append(_spawn(name, args))
        print(json.dumps(results[-1]), flush=True)
    extra = root / "jsonl" / "part-99999.jsonl"
    with extra.open("w") as f:
        for i in range(1000):
            conv, image = _row(i, i % 2 == 0)
            row = {"id": f"x{i}", "conversations": conv, **({"image": image} if i % 2 == 0 else {})}
            f.write(json.dumps(row) + "\n")
    results.append(_spawn("addshard", args))
    extra.unlink()
    print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
