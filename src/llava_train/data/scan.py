"""The scan: every row of a source once (normalise, render, tokenize, check images) -> exact lengths or a bad-row
reason (the cache of a scan: `data.scan_cache`; its report: `data.report`).
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llava_train.data.errors import BAD_REASONS, BadSample
from llava_train.data.images import ImageLimits, ImageRef, image_ref, load_image, verify_image, video_frame_paths
from llava_train.data.preference import check_pair, final_reply_only
from llava_train.data.rows import JsonRows, SourceRows
from llava_train.data.templates import Template
from llava_train.data.tokenize import TokenizedSample, tokenize_conversation
from llava_train.llava_format import normalize_conversation, preference_conversations, record_images, record_video
from llava_train.utils.logging import get_logger

log = get_logger(__name__)

# Bump when the scan's meaning changes so stale caches are not reused.
# 5: decoded images, symlink / size / format / row_error / tar_member reasons; 4: per-shard caches, embedded
# images, column mappings; 3: per-image token counts (anyres) and video rows.
SCAN_VERSION = 5
REASON_CODES = tuple(BAD_REASONS)
SCAN_ARRAYS = ("lengths", "num_images", "reasons", "truncated", "media_tokens", "num_videos")
SCAN_CHUNK = 2000  # rows per scan task
# Text tokens span a few characters each (long whitespace runs of code tokenizers: tens): a row with 100 per
# token of model_max_length could only be kept by cutting almost all of it, so it is refused untokenized.
MAX_CHARS_PER_TOKEN = 100


@dataclass
class SampleContext:
    """Everything needed to turn a record into a sample (picklable: sent once to scan workers).

    geometry: `model.vision.ImageGeometry` (tokens per image from its size; video tokens).
    video_token_id / video_frames: OneVision's video placeholder and frames per video (None / unused otherwise).
    image_limits: the bounds on image sides and aspect ratio (`data.max_image_side` / `max_image_aspect_ratio`).
    preference: rows are preference pairs (stage dpo): each gives a chosen and a rejected
        sample sharing its images.
    """

    tokenizer: Any
    template: Template
    image_token_id: int
    geometry: Any
    max_length: int | None
    image_folder: str | None = None
    video_token_id: int | None = None
    video_frames: int = 32
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    preference: bool = False


def image_refs(record: dict[str, Any], image_folder: str | None) -> list[ImageRef]:
    """The record's images as ImageRefs (`image` may be missing, a path, an embedded image or a list of them)."""
    return [image_ref(v, image_folder, f"image {k}") for k, v in enumerate(record_images(record))]


def check_characters(turns: list[Any], max_length: int | None) -> None:
    """BadSample(too_long) for a row of more than MAX_CHARS_PER_TOKEN characters per token of `max_length`,
    before it is tokenized (a 20 MB row would otherwise take gigabytes and half a minute to be found too long)."""
    chars = sum(len(t.text) for t in turns)
    if max_length is not None and chars > max_length * MAX_CHARS_PER_TOKEN:
        raise BadSample(
            "too_long",
            f"{chars} characters: more than {MAX_CHARS_PER_TOKEN} per token of model_max_length {max_length} "
            "(rejected before tokenizing)",
        )


@dataclass
class Processed:
    """A record made into a sample: the tokenized sample, its images (ImageRefs) and video frame files, the LM
    tokens per image / video (text order), and with `load` the decoded RGB images and video frames."""

    sample: TokenizedSample
    paths: list[ImageRef]
    frames: list[str]
    media_tokens: list[int]
    images: list[Any] = field(default_factory=list)
    video: list[Any] = field(default_factory=list)
    rejected: TokenizedSample | None = None  # a preference row's rejected side (`sample` is then the chosen one)

    @property
    def length(self) -> int:
        """Tokens of the row: the sample's, or both sides of a pair."""
        return len(self.sample.input_ids) + (len(self.rejected.input_ids) if self.rejected is not None else 0)


def process_record(record: dict[str, Any], ctx: SampleContext, row: Any = None, io: str = "auto") -> Processed:
    """Normalise + tokenize a record with its exact image / video token counts; BadSample on any problem.

    io: how much image I/O: `auto` reads image headers only when the geometry needs sizes (anyres),
    `verify` reads every header and decodes every image and sampled frame in full (the scan), `load`
    decodes them and keeps them (training; the counts then come from the decoded images).
    """
    paths = image_refs(record, ctx.image_folder)
    video = record_video(record)
    frames: list[str] = []
    if video is not None:
        if ctx.video_token_id is None:
            raise BadSample(
                "bad_video", "the row has a `video` but the model has no video input (use llava_onevision)"
            )
        if paths:
            raise BadSample("bad_video", "a row with both `image` and `video` is not supported; split it")
        if ctx.preference:
            raise BadSample("bad_video", "preference rows with a video are not supported")
        frames = video_frame_paths(ctx.image_folder, video, ctx.video_frames)
    conversations = preference_conversations(record) if ctx.preference else (record.get("conversations"),)
    video_token = ctx.template.video_token if frames else None
    sides = [normalize_conversation(c, ctx.template.image_token, video_token) for c in conversations]
    for turns in sides:
        check_characters(turns, ctx.max_length)
    images: list[Any] = []
    loaded_frames: list[Any] = []
    sizes: list[tuple[int, int]] = []
    if io == "load":
        images = [load_image(p, ctx.image_limits) for p in paths]
        loaded_frames = [load_image(p, ctx.image_limits) for p in frames]
        sizes = [(img.height, img.width) for img in images]
    elif io == "verify":
        sizes = [verify_image(p, True, ctx.image_limits) for p in paths]
        for p in frames:
            verify_image(p, True, ctx.image_limits)
    elif ctx.geometry.size_dependent:
        sizes = [verify_image(p, False, ctx.image_limits) for p in paths]
    geometry = ctx.geometry
    if geometry.size_dependent:
        image_tokens: int | list[int] = [geometry.image_tokens(h, w, len(paths)) for h, w in sizes]
    else:
        image_tokens = geometry.base_tokens
    video_tokens = [geometry.video_tokens(len(frames))] if frames else []
    samples = [
        tokenize_conversation(
            turns,
            ctx.template,
            ctx.tokenizer,
            ctx.image_token_id,
            image_tokens,
            len(paths),
            None if ctx.preference else ctx.max_length,  # pairs are never truncated (`check_pair`)
            row,
            ctx.video_token_id,
            video_tokens,
        )
        for turns in sides
    ]
    rejected = None
    if ctx.preference:
        samples = [final_reply_only(s) for s in samples]
        check_pair(samples, ctx.max_length)
        rejected = samples[1]
    per_image = image_tokens if isinstance(image_tokens, list) else [image_tokens] * len(paths)
    return Processed(samples[0], paths, frames, per_image + video_tokens, images, loaded_frames, rejected)


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


def scan_row(store: SourceRows, i: int, ctx: SampleContext, check_images: bool = True) -> RowResult:
    """Scan one row: tokenize with exact image counts, and check that its images exist and decode (PIL verify).

    The id of a row without one is left None here and becomes its row number in the source (`concat_scans`),
    since a shard's cached scan numbers its rows from 0."""
    sample_id: Any = None
    try:
        record = store.get(i)
        sample_id = record.get("id")
        done = process_record(record, ctx, i, "verify" if check_images else "auto")
        sample = done.sample
        return RowResult(
            i,
            sample_id,
            done.length,
            sample.num_images + sample.num_videos,
            sample.truncated,
            media_tokens=done.media_tokens,
            num_videos=sample.num_videos,
        )
    except BadSample as e:
        return RowResult(i, sample_id, reason=e.reason, detail=e.detail)
    except Exception as e:  # one hostile row (nesting depth, lone surrogates, ...) never aborts the scan
        return RowResult(i, sample_id, reason="row_error", detail=row_error_detail(e))


def row_error_detail(e: BaseException) -> str:
    """`Type: message` of an unexpected per-row error, cut to one short line."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" + ("..." if len(text) > 300 else "")


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
    shards_scanned: int = 0  # shards of the source scanned by this call (the others were read from the cache)
    shards_cached: int = 0

    @property
    def good_rows(self) -> np.ndarray:
        """Row indices without a bad-row reason."""
        return np.flatnonzero(self.reasons < 0)


def _scan_chunk(args: tuple[SourceRows, SampleContext, int, int, bool]) -> list[RowResult]:
    store, ctx, start, stop, check_images = args
    return [scan_row(store, i, ctx, check_images) for i in range(start, stop)]


def worker_init() -> None:
    import torch

    # Each scan process is single-threaded; the Rust tokenizer's own thread pool would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(1)


def _in_memory(store: SourceRows) -> bool:
    shard = store.shards[0] if len(store.shards) == 1 else None
    return isinstance(shard, JsonRows) and shard.folder is None


def scan_source(
    store: SourceRows,
    ctx: SampleContext,
    num_workers: int = 1,
    check_images: bool = True,
    chunk_size: int = 2000,
    pool: Any = None,
    progress: Any = None,
) -> SourceScan:
    """Scan every row (in `num_workers` spawned processes, by chunks, when > 1; or in `pool`, a process pool
    shared by the shards of a source). `progress(rows, bad)` is called after each chunk."""
    n = len(store)
    if (num_workers > 1 or pool is not None) and _in_memory(store):
        # An in-memory buffer is pickled with every chunk: use one chunk per worker.
        chunk_size = max(chunk_size, -(-n // max(num_workers, 2)))
    chunks = [(store, ctx, s, min(n, s + chunk_size), check_images) for s in range(0, n, chunk_size)]
    results: list[RowResult] = []

    def collect(parts: Any) -> None:
        for part in parts:
            results.extend(part)
            if progress is not None:
                progress(len(part), sum(r.reason is not None for r in part))

    if pool is not None and len(chunks) > 1:
        collect(pool.imap(_scan_chunk, chunks, chunksize=1))
    elif num_workers > 1 and len(chunks) > 1:
        with multiprocessing.get_context("spawn").Pool(min(num_workers, len(chunks)), worker_init) as own:
            collect(own.imap(_scan_chunk, chunks, chunksize=1))
    else:
        collect(_scan_chunk(c) for c in chunks)
    return _assemble(n, results)


def _assemble(n: int, results: list[RowResult]) -> SourceScan:
    lengths = np.zeros(n, dtype=np.int32)
    num_images = np.zeros(n, dtype=np.int32)
    reasons = np.full(n, -1, dtype=np.int8)
    truncated = np.zeros(n, dtype=bool)
    media: list[int] = []
    num_videos = np.zeros(n, dtype=np.int8)
    bad: list[dict[str, Any]] = []
    for r in results:
        lengths[r.row], num_images[r.row], truncated[r.row] = r.length, r.num_images, r.truncated
        media.extend(r.media_tokens)
        num_videos[r.row] = r.num_videos
        if r.reason is not None:
            reasons[r.row] = REASON_CODES.index(r.reason)
            bad.append({"row": r.row, "id": r.id, "reason": r.reason, "detail": r.detail})
    return SourceScan(lengths, num_images, reasons, truncated, np.asarray(media, dtype=np.int32), num_videos, bad)


def concat_scans(scans: list[SourceScan]) -> SourceScan:
    """The scans of a source's shards, in order, as one scan: bad rows renumbered to the source's rows (and a
    row without an id takes that number as its id)."""
    bad, start = [], 0
    for scan in scans:
        for b in scan.bad:
            row = b["row"] + start
            bad.append({**b, "row": row, "id": row if b["id"] is None else b["id"]})
        start += len(scan.reasons)
    if len(scans) == 1:
        scans[0].bad = bad
        return scans[0]
    arrays = [np.concatenate([getattr(s, k) for s in scans]) for k in SCAN_ARRAYS]
    return SourceScan(*arrays, bad=bad)
