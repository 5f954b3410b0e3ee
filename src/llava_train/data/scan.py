"""The scan: every row of a source once (normalise, render, tokenize, check images) -> exact lengths or a bad-row
reason; cached on disk, shared by `data validate`, training and every rank; and the one per-source report.

The cache key is made of the source files' size/mtime, the tokenizer, the template, the image token,
the image geometry (tokens per image, anyres pinpoints) and the max length, so a changed input rescans
and an unchanged one never does.
The cache is on by default (`data.cache_dir: auto` = `<output_dir>/../.cache`).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llava_train.config import RunConfig, SourceConfig
from llava_train.data.errors import BAD_REASONS, BadSample
from llava_train.data.images import load_image, resolve_image_path, verify_image, video_frame_paths
from llava_train.data.rows import HFRows, JsonRows, fingerprint_path
from llava_train.data.templates import Template
from llava_train.data.tokenize import TokenizedSample, tokenize_conversation
from llava_train.llava_format import normalize_conversation, record_id, record_images, record_video
from llava_train.utils.logging import get_logger

log = get_logger(__name__)

# Bump when the scan's meaning changes so stale caches are not reused.
SCAN_VERSION = 3  # 3: per-image token counts (anyres) and video rows; 2: the tokenizer template's wrapper
REASON_CODES = tuple(BAD_REASONS)
FIRST_IDS = 5  # row ids listed per bad-row reason in a report


def data_cache_dir(cfg: RunConfig) -> str | None:
    """The scan cache folder of a run: `data.cache_dir`, where `auto` is `<output_dir>/../.cache` (./.cache without
    an output folder) and null disables the cache."""
    value = cfg.data.cache_dir
    if value != "auto":
        return value
    out = cfg.train.get("output_dir")
    return str(Path(out).resolve().parent / ".cache") if out else str(Path(".cache").resolve())


# -- one row -----------------------------------------------------------------------------------


@dataclass
class SampleContext:
    """Everything needed to turn a record into a sample (picklable: sent once to scan workers).

    geometry: `model.vision.ImageGeometry` (tokens per image from its size; video tokens).
    video_token_id / video_frames: OneVision's video placeholder and frames per video (None / unused otherwise).
    """

    tokenizer: Any
    template: Template
    image_token_id: int
    geometry: Any
    max_length: int | None
    image_folder: str | None = None
    video_token_id: int | None = None
    video_frames: int = 32


def image_paths(record: dict[str, Any], image_folder: str | None) -> list[str]:
    """The record's images as resolved paths (`image` may be missing, a string or a list)."""
    return [resolve_image_path(image_folder, p) for p in record_images(record)]


@dataclass
class Processed:
    """A record made into a sample: the tokenized sample, its media files, the LM tokens per image / video
    (text order), and with `load` the decoded RGB images and video frames."""

    sample: TokenizedSample
    paths: list[str]
    frames: list[str]
    media_tokens: list[int]
    images: list[Any] = field(default_factory=list)
    video: list[Any] = field(default_factory=list)


def process_record(record: dict[str, Any], ctx: SampleContext, row: Any = None, io: str = "auto") -> Processed:
    """Normalise + tokenize a record with its exact image / video token counts; BadSample on any problem.

    io: how much image I/O: `auto` reads image headers only when the geometry needs sizes (anyres),
    `verify` reads every header and PIL-verifies every image and sampled frame (the scan), `load`
    decodes them (training; the counts then come from the decoded images).
    """
    paths = image_paths(record, ctx.image_folder)
    video = record_video(record)
    frames: list[str] = []
    if video is not None:
        if ctx.video_token_id is None:
            raise BadSample(
                "bad_video", "the row has a `video` but the model has no video input (use llava_onevision)"
            )
        if paths:
            raise BadSample("bad_video", "a row with both `image` and `video` is not supported; split it")
        frames = video_frame_paths(ctx.image_folder, video, ctx.video_frames)
    turns = normalize_conversation(
        record.get("conversations"), ctx.template.image_token, ctx.template.video_token if frames else None
    )
    images: list[Any] = []
    loaded_frames: list[Any] = []
    sizes: list[tuple[int, int]] = []
    if io == "load":
        images = [load_image(p) for p in paths]
        loaded_frames = [load_image(p) for p in frames]
        sizes = [(img.height, img.width) for img in images]
    elif io == "verify":
        sizes = [verify_image(p) for p in paths]
        for p in frames:
            verify_image(p)
    elif ctx.geometry.size_dependent:
        sizes = [verify_image(p, verify=False) for p in paths]
    geometry = ctx.geometry
    if geometry.size_dependent:
        image_tokens: int | list[int] = [geometry.image_tokens(h, w, len(paths)) for h, w in sizes]
    else:
        image_tokens = geometry.base_tokens
    video_tokens = [geometry.video_tokens(len(frames))] if frames else []
    sample = tokenize_conversation(
        turns,
        ctx.template,
        ctx.tokenizer,
        ctx.image_token_id,
        image_tokens,
        len(paths),
        ctx.max_length,
        row,
        ctx.video_token_id,
        video_tokens,
    )
    per_image = image_tokens if isinstance(image_tokens, list) else [image_tokens] * len(paths)
    return Processed(sample, paths, frames, per_image + video_tokens, images, loaded_frames)


@dataclass
class RowResult:
    """Scan result of one row: exact length, media count and tokens per image / video, or the bad-row reason."""

    row: int
    id: Any
    length: int = 0
    num_images: int = 0
    truncated: bool = False
    reason: str | None = None
    detail: str = ""
    media_tokens: list[int] = field(default_factory=list)
    num_videos: int = 0


def scan_row(store: JsonRows | HFRows, i: int, ctx: SampleContext, check_images: bool = True) -> RowResult:
    """Scan one row: tokenize with exact image counts, and check that its images exist and decode (PIL verify)."""
    sample_id: Any = i
    try:
        record = store.get(i)
        sample_id = record_id(record, i)
        done = process_record(record, ctx, i, "verify" if check_images else "auto")
        sample = done.sample
        return RowResult(
            i,
            sample_id,
            len(sample.input_ids),
            sample.num_images + sample.num_videos,
            sample.truncated,
            media_tokens=done.media_tokens,
            num_videos=sample.num_videos,
        )
    except BadSample as e:
        return RowResult(i, sample_id, reason=e.reason, detail=e.detail)


# -- a whole source ----------------------------------------------------------------------------------


@dataclass
class SourceScan:
    """Per-row scan of a source: arrays indexed by row (length 0 and a reason code for bad rows)."""

    lengths: np.ndarray  # int32 [rows]
    num_images: np.ndarray  # int32 [rows]: images + videos of the row
    reasons: np.ndarray  # int8 [rows], -1 = good, else index into REASON_CODES
    truncated: np.ndarray  # bool [rows]
    media_tokens: np.ndarray  # int32 [images + videos of the good rows]: LM tokens of each, in row order
    num_videos: np.ndarray  # int8 [rows]: videos of the row (0 or 1)
    bad: list[dict[str, Any]] = field(default_factory=list)
    from_cache: bool = False

    @property
    def good_rows(self) -> np.ndarray:
        """Row indices without a bad-row reason."""
        return np.flatnonzero(self.reasons < 0)


def _scan_chunk(args: tuple[Any, SampleContext, int, int, bool]) -> list[RowResult]:
    store, ctx, start, stop, check_images = args
    return [scan_row(store, i, ctx, check_images) for i in range(start, stop)]


def _worker_init() -> None:
    import torch

    # Each scan process is single-threaded; the Rust tokenizer's own thread pool would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(1)


def scan_source(
    store: JsonRows | HFRows,
    ctx: SampleContext,
    num_workers: int = 1,
    check_images: bool = True,
    chunk_size: int = 2000,
) -> SourceScan:
    """Scan every row (in `num_workers` spawned processes, by chunks, when > 1)."""
    n = len(store)
    if num_workers > 1 and isinstance(store, JsonRows) and not isinstance(store.buf, np.memmap):
        # An in-memory buffer is pickled with every chunk: use one chunk per worker.
        chunk_size = max(chunk_size, -(-n // num_workers))
    chunks = [(store, ctx, s, min(n, s + chunk_size), check_images) for s in range(0, n, chunk_size)]
    if num_workers > 1 and len(chunks) > 1:
        with multiprocessing.get_context("spawn").Pool(min(num_workers, len(chunks)), _worker_init) as pool:
            parts = pool.map(_scan_chunk, chunks, chunksize=1)
    else:
        parts = [_scan_chunk(c) for c in chunks]
    lengths = np.zeros(n, dtype=np.int32)
    num_images = np.zeros(n, dtype=np.int32)
    reasons = np.full(n, -1, dtype=np.int8)
    truncated = np.zeros(n, dtype=bool)
    media: list[int] = []
    num_videos = np.zeros(n, dtype=np.int8)
    bad: list[dict[str, Any]] = []
    for part in parts:
        for r in part:
            lengths[r.row], num_images[r.row], truncated[r.row] = r.length, r.num_images, r.truncated
            media.extend(r.media_tokens)
            num_videos[r.row] = r.num_videos
            if r.reason is not None:
                reasons[r.row] = REASON_CODES.index(r.reason)
                bad.append({"row": r.row, "id": r.id, "reason": r.reason, "detail": r.detail})
    return SourceScan(lengths, num_images, reasons, truncated, np.asarray(media, dtype=np.int32), num_videos, bad)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the tokenizer's full definition (vocab, merges, normalizer, added tokens) and its pad/eos/bos."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    h.update(repr((type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)).encode())
    h.update(repr(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()[:20]


def scan_key(src: SourceConfig, ctx: SampleContext, check_images: bool) -> str:
    """Cache key of a source's scan: source files' mtime/size + tokenizer + template + image tokens + max length."""
    parts = [
        SCAN_VERSION,
        fingerprint_path(Path(src.path).resolve()),
        src.split,
        os.path.abspath(src.image_folder or "."),
        tokenizer_fingerprint(ctx.tokenizer),
        repr(ctx.template),
        ctx.image_token_id,
        repr(ctx.geometry),
        ctx.video_token_id,
        ctx.video_frames,
        ctx.max_length,
        check_images,
    ]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]


def cached_scan(
    src: SourceConfig,
    store: JsonRows | HFRows,
    ctx: SampleContext,
    cache_dir: str | None,
    num_workers: int = 1,
    check_images: bool = True,
) -> SourceScan:
    """`scan_source`, read from / written to `cache_dir` when set (key: `scan_key`); logs which it was.

    Written atomically (temporary names, then rename), so concurrent readers never see half a scan.
    """
    start = time.perf_counter()
    if cache_dir is None:
        scan = scan_source(store, ctx, num_workers, check_images)
        log.info(
            "scanned %s: %d rows in %.1f s (no cache: data.cache_dir is null)", src.name, len(store), _since(start)
        )
        return scan
    folder = Path(cache_dir)
    base = folder / f"scan-{scan_key(src, ctx, check_images)}"
    npz, bad_json = base.with_suffix(".npz"), base.with_suffix(".bad.json")
    if npz.exists() and bad_json.exists():
        with np.load(npz) as z:
            scan = SourceScan(
                z["lengths"], z["num_images"], z["reasons"], z["truncated"], z["media_tokens"], z["num_videos"]
            )
        scan.bad = json.loads(bad_json.read_text())
        scan.from_cache = True
        log.info("read the cached scan of %s (%d rows) from %s in %.2f s", src.name, len(store), npz, _since(start))
        return scan
    scan = scan_source(store, ctx, num_workers, check_images)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{base.name}.tmp{os.getpid()}"
    np.savez(
        tmp.with_suffix(".npz"),
        lengths=scan.lengths,
        num_images=scan.num_images,
        reasons=scan.reasons,
        truncated=scan.truncated,
        media_tokens=scan.media_tokens,
        num_videos=scan.num_videos,
    )
    tmp.with_suffix(".bad.json").write_text(json.dumps(scan.bad, default=str))
    os.replace(tmp.with_suffix(".bad.json"), bad_json)
    os.replace(tmp.with_suffix(".npz"), npz)
    log.info("scanned %s: %d rows in %.1f s, cached in %s", src.name, len(store), _since(start), npz)
    return scan


def _since(start: float) -> float:
    return time.perf_counter() - start


# -- the one per-source report -------------------------------------------------------------------


def percentiles(lengths: np.ndarray) -> dict[str, int]:
    """p50 / p90 / p99 / max of token lengths (nearest-rank: every value is a real sample's length)."""
    if len(lengths) == 0:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99], method="nearest")
    return {"p50": int(p50), "p90": int(p90), "p99": int(p99), "max": int(lengths.max())}


def source_report(
    src: SourceConfig, split: str, scan: SourceScan, used: int | None = None, weight: float | None = None
) -> dict[str, Any]:
    """One source's counts, the same in `data_report.json`, the run folder's `data_summary.json` and the logs.

    rows, good, bad, images (of good rows), text_only, truncated, token-length percentiles of the good
    rows (image tokens included), `image_tokens` percentiles of the LM tokens of each image / video of the
    good rows (anyres: from each image's size), bad rows by reason with their first ids; `used` (rows per epoch
    after the mixture weight) and `weight` when the source is part of a training mixture.
    """
    good = scan.reasons < 0
    by_reason: dict[str, dict[str, Any]] = {}
    for b in scan.bad:
        entry = by_reason.setdefault(b["reason"], {"count": 0, "first_ids": []})
        entry["count"] += 1
        if len(entry["first_ids"]) < FIRST_IDS:
            entry["first_ids"].append(b["id"])
    report: dict[str, Any] = {
        "name": src.name,
        "path": src.path,
        "split": split,
        "rows": int(len(scan.reasons)),
        "good": int(good.sum()),
        "bad": len(scan.bad),
        "images": int(scan.num_images[good].sum()),
        "text_only": int((good & (scan.num_images == 0)).sum()),
        "truncated": int(scan.truncated[good].sum()),
        "tokens": percentiles(scan.lengths[good]),
        "image_tokens": percentiles(scan.media_tokens),
        "bad_by_reason": {r: by_reason[r] for r in REASON_CODES if r in by_reason},
    }
    if used is not None:
        report.update(used=int(used), weight=weight)
    return report


def format_source_line(report: dict[str, Any]) -> str:
    """The one-line log form of a source report."""
    skipped = ", ".join(f"{r}={e['count']}" for r, e in report["bad_by_reason"].items()) or "none"
    used = f", {report['used']} used (weight {report['weight']})" if "used" in report else ""
    t = report["tokens"]
    return (
        f"data {report['split']} source {report['name']}: {report['rows']} rows, {report['good']} good{used}, "
        f"bad: {skipped}, truncated: {report['truncated']}, tokens p50/p90/max {t['p50']}/{t['p90']}/{t['max']}"
    )
