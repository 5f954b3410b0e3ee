"""The scan cache: one file per shard under `data.cache_dir` (on by default: `<output_dir>/../.cache`), keyed
by the shard's size/mtime, the tokenizer, the template, the image token, the image geometry and the max length,
so a changed shard rescans and an unchanged one never does; shared by `data validate`, training and every rank.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from llava_train.config import RunConfig, SourceConfig
from llava_train.data.rows import SourceRows
from llava_train.data.scan import (
    SCAN_ARRAYS,
    SCAN_CHUNK,
    SCAN_VERSION,
    SampleContext,
    SourceScan,
    concat_scans,
    scan_source,
    worker_init,
)
from llava_train.utils.logging import get_logger
from llava_train.utils.progress import scan_progress

log = get_logger(__name__)


def data_cache_dir(cfg: RunConfig) -> str | None:
    """The scan cache folder of a run: `data.cache_dir`, where `auto` is `<output_dir>/../.cache` (./.cache without
    an output folder) and null disables the cache."""
    value = cfg.data.cache_dir
    if value != "auto":
        return value
    out = cfg.train.get("output_dir")
    return str(Path(out).resolve().parent / ".cache") if out else str(Path(".cache").resolve())


# -- one row -----------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the tokenizer's full definition (vocab, merges, normalizer, added tokens) and its pad/eos/bos."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    h.update(repr((type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)).encode())
    h.update(repr(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()[:20]


def scan_key(src: SourceConfig, shard_fingerprint: str, ctx: SampleContext, check_images: bool) -> str:
    """Cache key of one shard's scan: the shard's mtime/size + the source's split, image folder and column mapping
    + tokenizer + template + image tokens + max length (so adding a shard to a source scans only that shard)."""
    parts = [
        SCAN_VERSION,
        shard_fingerprint,
        src.split,
        os.path.abspath(src.image_folder or "."),
        sorted(src.columns.as_dict().items()),
        tokenizer_fingerprint(ctx.tokenizer),
        repr(ctx.template),
        ctx.image_token_id,
        repr(ctx.geometry),
        ctx.video_token_id,
        ctx.video_frames,
        ctx.max_length,
        check_images,
        repr(ctx.image_limits),
        *(["preference"] if ctx.preference else []),  # the keys of earlier scans are unchanged
    ]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]


def _read_cached(npz: Path, bad_json: Path) -> SourceScan | None:
    if not (npz.exists() and bad_json.exists()):
        return None
    with np.load(npz) as z:
        scan = SourceScan(*(z[k] for k in SCAN_ARRAYS))
    scan.bad = json.loads(bad_json.read_text())
    return scan


def _write_cached(scan: SourceScan, npz: Path, bad_json: Path) -> None:
    """Written atomically (temporary names, then rename), so concurrent readers never see half a scan."""
    npz.parent.mkdir(parents=True, exist_ok=True)
    tmp = npz.with_name(f"{npz.stem}.tmp{os.getpid()}")
    np.savez(tmp.with_suffix(".npz"), **{k: getattr(scan, k) for k in SCAN_ARRAYS})
    tmp.with_suffix(".bad.json").write_text(json.dumps(scan.bad, default=str))
    os.replace(tmp.with_suffix(".bad.json"), bad_json)
    os.replace(tmp.with_suffix(".npz"), npz)


def cached_scan(
    src: SourceConfig,
    store: SourceRows,
    ctx: SampleContext,
    cache_dir: str | None,
    num_workers: int = 1,
    check_images: bool = True,
) -> SourceScan:
    """`scan_source` of each shard of a source, read from / written to `cache_dir` when set (one file per shard,
    key: `scan_key`), concatenated; logs one line saying how many shards were scanned and how many read.

    Shards needing a scan share one process pool; a progress bar (rows/s, bad rows) shows on the terminal of
    the process that scans (`utils.progress`).
    """
    start = time.perf_counter()
    views = [store.shard(k) for k in range(len(store.shards))]
    scans: list[SourceScan | None] = [None] * len(views)
    files: list[tuple[Path, Path] | None] = [None] * len(views)
    if cache_dir is not None:
        for k, fp in enumerate(store.fingerprints):
            base = Path(cache_dir) / f"scan-{scan_key(src, fp, ctx, check_images)}"
            files[k] = (base.with_suffix(".npz"), base.with_suffix(".bad.json"))
            scans[k] = _read_cached(*files[k])
    todo = [k for k, scan in enumerate(scans) if scan is None]
    rows = sum(len(views[k]) for k in todo)
    if todo:
        use_pool = num_workers > 1 and rows > SCAN_CHUNK
        with contextlib.ExitStack() as stack:
            pool = (
                stack.enter_context(multiprocessing.get_context("spawn").Pool(num_workers, worker_init))
                if use_pool
                else None
            )
            bar = stack.enter_context(scan_progress(f"scanning {src.name}", rows))
            for k in todo:
                scans[k] = scan_source(views[k], ctx, 1, check_images, SCAN_CHUNK, pool, bar.update)
                views[k].close()  # bounded open files whatever the shard count
                if files[k] is not None:
                    _write_cached(scans[k], *files[k])
    scan = concat_scans([s for s in scans if s is not None])
    scan.from_cache = not todo
    scan.shards_scanned, scan.shards_cached = len(todo), len(views) - len(todo)
    where = f"cached in {cache_dir}" if cache_dir is not None else "no cache: data.cache_dir is null"
    if not todo:
        log.info(
            "read the cached scan of %s (%d rows, %d shard(s)) from %s in %.2f s",
            src.name,
            len(store),
            len(views),
            cache_dir,
            _since(start),
        )
    else:
        log.info(
            "scanned %s: %d rows in %.1f s (%d of %d shard(s) scanned, %d read from the cache; %s)",
            src.name,
            rows,
            _since(start),
            len(todo),
            len(views),
            len(views) - len(todo),
            where,
        )
    return scan


def _since(start: float) -> float:
    return time.perf_counter() - start
