"""Datasets: LLaVA JSON/JSONL and HF sources as memory-mapped rows, cached exact lengths, weighted mixtures.

Rows are never held as a Python list of dicts: a LLaVA JSON list or JSONL file is converted once
into one uint8 buffer of JSON bytes plus int64 row offsets (saved as .npy in the cache folder and
memory-mapped, so DataLoader workers share the page cache); HF datasets are Arrow tables, already
memory-mapped. Each row is scanned once (normalise, render, tokenize, check images) to get its exact
length (text + image tokens), image count or bad-row reason; the scan is cached under a key made of
the source file's mtime/size, the tokenizer, the template, the image token count and the max length.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llava_train.config import DataConfig, SourceConfig
from llava_train.data.errors import BAD_REASONS, BadSample, BadSampleError
from llava_train.data.images import load_image, preprocess_images, resolve_image_path, verify_image
from llava_train.data.templates import Template, get_template
from llava_train.data.tokenize import TokenizedSample, check_template_consistency, tokenize_conversation
from llava_train.llava_format import DATA_IMAGE_TAG, normalize_conversation, record_id, record_images
from llava_train.utils.logging import get_logger

logger = get_logger(__name__)

# Bump when the scan's meaning changes so stale caches are not reused.
SCAN_VERSION = 2  # 2: the tokenizer template renders through its exported wrapper (BOS once)
REASON_CODES = tuple(BAD_REASONS)
HF_EXTENSIONS = {".parquet": "parquet", ".arrow": "arrow"}
HF_FOLDER_EXTENSIONS = {**HF_EXTENSIONS, ".json": "json", ".jsonl": "json"}


# -- row stores --------------------------------------------------------------------------------


class JsonRows:
    """Rows as JSON bytes in one uint8 buffer + int64 offsets (row i = buf[off[i]:off[i+1]]).

    `lines` holds each row's 1-based line number in its file (0 for rows of a JSON list), used in
    `malformed_json` details. Malformed JSONL lines are kept as raw bytes so that row numbers stay
    aligned with the file; `get` raises BadSample for them.
    """

    def __init__(self, buf: np.ndarray, offsets: np.ndarray, lines: np.ndarray, path: str) -> None:
        self.buf, self.offsets, self.lines, self.path = buf, offsets, lines, path

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getstate__(self) -> dict[str, Any]:
        # Memory-mapped arrays travel to scan processes as file names, not as copies of the data.
        state = dict(self.__dict__)
        for key in ("buf", "offsets", "lines"):
            filename = getattr(state[key], "filename", None)
            if filename:
                state[key] = ("mmap", filename)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key in ("buf", "offsets", "lines"):
            if isinstance(state[key], tuple):
                state[key] = np.load(state[key][1], mmap_mode="r")
        self.__dict__.update(state)

    def get(self, i: int) -> dict[str, Any]:
        """Row i as a dict (BadSample(malformed_json) for a malformed line or a non-object row)."""
        raw = self.buf[int(self.offsets[i]) : int(self.offsets[i + 1])].tobytes()
        where = f"line {int(self.lines[i])}" if int(self.lines[i]) else f"row {i}"
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadSample("malformed_json", f"{self.path} {where}: {e}") from e
        if not isinstance(record, dict):
            raise BadSample("malformed_json", f"{self.path} {where}: a row must be a JSON object")
        return record


class HFRows:
    """Rows of a `datasets.Dataset` (Arrow, memory-mapped)."""

    def __init__(self, dataset: Any, path: str) -> None:
        self.dataset, self.path = dataset, path

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, i: int) -> dict[str, Any]:
        """Row i as a dict; a `conversations` column stored as a JSON string is decoded."""
        record = dict(self.dataset[int(i)])
        conv = record.get("conversations")
        if isinstance(conv, str):
            try:
                record["conversations"] = json.loads(conv)
            except json.JSONDecodeError as e:
                raise BadSample("malformed_json", f"{self.path} row {i}: conversations is not JSON: {e}") from e
        return record


def _fingerprint_path(path: Path) -> str:
    """Hash of a file's (or a folder's files') name, size and mtime."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _is_hf_source(path: Path) -> bool:
    if path.is_dir():
        return True
    return path.suffix in HF_EXTENSIONS


def _read_json_rows(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse a LLaVA JSON list or a JSONL file into (buffer, offsets, line numbers)."""
    data = path.read_bytes()
    head = data.lstrip()[:1]
    chunks: list[bytes] = []
    lines: list[int] = []
    if path.suffix != ".jsonl" and head == b"[":
        try:
            rows = json.loads(data)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"malformed JSON in {path}: {e.msg} at line {e.lineno} column {e.colno} (char {e.pos})"
            ) from e
        for row in rows:
            chunks.append(json.dumps(row, ensure_ascii=False).encode())
            lines.append(0)
        del rows
    else:
        for lineno, line in enumerate(data.split(b"\n"), start=1):
            if line.strip():
                chunks.append(line.strip())
                lines.append(lineno)
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum([len(c) for c in chunks], out=offsets[1:])
    buf = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    return buf, offsets, np.asarray(lines, dtype=np.int64)


def open_source(src: SourceConfig, cache_dir: str | None = None) -> JsonRows | HFRows:
    """Open a source as a row store: JSON/JSONL converted once to memory-mapped .npy, HF via datasets."""
    path = Path(src.path)
    if not path.exists():
        raise FileNotFoundError(f"data source not found: {path}")
    if _is_hf_source(path):
        return HFRows(_load_hf(path, src.split), str(path))
    if cache_dir is None:
        return JsonRows(*_read_json_rows(path), str(path))
    folder = Path(cache_dir) / f"rows-{_fingerprint_path(path.resolve())}"
    names = ("buf.npy", "offsets.npy", "lines.npy")
    if not all((folder / n).exists() for n in names):
        arrays = _read_json_rows(path)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for n, a in zip(names, arrays):
            np.save(tmp / n, a)
        # Atomic publish: concurrent builders (several ranks) never see a half-written folder.
        try:
            os.replace(tmp, folder)
        except OSError:
            for n in names:
                (tmp / n).unlink(missing_ok=True)
            tmp.rmdir()
    buf, offsets, lines = (np.load(folder / n, mmap_mode="r") for n in names)
    return JsonRows(buf, offsets, lines, str(path))


def _load_hf(path: Path, split: str) -> Any:
    import datasets

    if path.is_dir() and any((path / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise KeyError(f"split {split!r} not in {path}; available: {', '.join(ds)}")
            ds = ds[split]
        return ds
    # A folder may hold parquet, arrow or json/jsonl shards (one format), read by datasets' builders.
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in HF_FOLDER_EXTENSIONS)
    if not files:
        raise ValueError(f"no parquet/arrow/json files (and no save_to_disk dataset) in {path}")
    builder = HF_FOLDER_EXTENSIONS[files[0].suffix]
    return datasets.load_dataset(builder, data_files={split: [str(f) for f in files]}, split=split)


# -- one row -----------------------------------------------------------------------------------


@dataclass
class SampleContext:
    """Everything needed to turn a record into a sample (picklable: sent once to scan workers)."""

    tokenizer: Any
    template: Template
    image_token_id: int
    num_image_tokens: int
    max_length: int | None
    image_folder: str | None = None


def image_paths(record: dict[str, Any], image_folder: str | None) -> list[str]:
    """The record's images as resolved paths (`image` may be missing, a string or a list)."""
    return [resolve_image_path(image_folder, p) for p in record_images(record)]


def process_record(record: dict[str, Any], ctx: SampleContext, row: Any = None) -> tuple[TokenizedSample, list[str]]:
    """Normalise + tokenize a record and resolve its image paths; BadSample on any problem (no image I/O)."""
    paths = image_paths(record, ctx.image_folder)
    turns = normalize_conversation(record.get("conversations"), ctx.template.image_token)
    sample = tokenize_conversation(
        turns, ctx.template, ctx.tokenizer, ctx.image_token_id, ctx.num_image_tokens, len(paths), ctx.max_length, row
    )
    return sample, paths


@dataclass
class RowResult:
    """Scan result of one row: exact length and image count, or the bad-row reason."""

    row: int
    id: Any
    length: int = 0
    num_images: int = 0
    truncated: bool = False
    reason: str | None = None
    detail: str = ""


def scan_row(store: JsonRows | HFRows, i: int, ctx: SampleContext, check_images: bool = True) -> RowResult:
    """Scan one row: tokenize, and check that its images exist and decode (PIL verify)."""
    sample_id: Any = i
    try:
        record = store.get(i)
        sample_id = record_id(record, i)
        sample, paths = process_record(record, ctx, i)
        if check_images:
            for p in paths:
                verify_image(p)
        return RowResult(i, sample_id, len(sample.input_ids), sample.num_images, sample.truncated)
    except BadSample as e:
        return RowResult(i, sample_id, reason=e.reason, detail=e.detail)


@dataclass
class SourceScan:
    """Per-row scan of a source: arrays indexed by row (length 0 and a reason code for bad rows)."""

    lengths: np.ndarray  # int32 [rows]
    num_images: np.ndarray  # int32 [rows]
    reasons: np.ndarray  # int8 [rows], -1 = good, else index into REASON_CODES
    truncated: np.ndarray  # bool [rows]
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
    bad: list[dict[str, Any]] = []
    for part in parts:
        for r in part:
            lengths[r.row], num_images[r.row], truncated[r.row] = r.length, r.num_images, r.truncated
            if r.reason is not None:
                reasons[r.row] = REASON_CODES.index(r.reason)
                bad.append({"row": r.row, "id": r.id, "reason": r.reason, "detail": r.detail})
    return SourceScan(lengths, num_images, reasons, truncated, bad)


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
        _fingerprint_path(Path(src.path).resolve()),
        src.split,
        os.path.abspath(src.image_folder or "."),
        tokenizer_fingerprint(ctx.tokenizer),
        repr(ctx.template),
        ctx.image_token_id,
        ctx.num_image_tokens,
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
    """`scan_source`, read from / written to `cache_dir` when set (key: `scan_key`)."""
    if cache_dir is None:
        return scan_source(store, ctx, num_workers, check_images)
    folder = Path(cache_dir)
    base = folder / f"scan-{scan_key(src, ctx, check_images)}"
    npz, bad_json = base.with_suffix(".npz"), base.with_suffix(".bad.json")
    if npz.exists() and bad_json.exists():
        with np.load(npz) as z:
            scan = SourceScan(z["lengths"], z["num_images"], z["reasons"], z["truncated"])
        scan.bad = json.loads(bad_json.read_text())
        scan.from_cache = True
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
    )
    tmp.with_suffix(".bad.json").write_text(json.dumps(scan.bad, default=str))
    os.replace(tmp.with_suffix(".bad.json"), bad_json)
    os.replace(tmp.with_suffix(".npz"), npz)
    return scan


# -- mixture -----------------------------------------------------------------------------------


def mixture_rows(good_rows: np.ndarray, weight: float, rng: np.random.Generator) -> np.ndarray:
    """Rows of one source used per epoch for `weight`: floor(weight) full copies + a seeded random part.

    E.g. 0.5 -> a random half (sorted), 2.0 -> every row twice, 1.5 -> every row once + a random half.
    """
    whole = int(np.floor(weight))
    frac = weight - whole
    parts = [good_rows] * whole
    extra = int(round(frac * len(good_rows)))
    if extra:
        parts.append(np.sort(rng.choice(good_rows, size=extra, replace=False)))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


# -- the dataset -------------------------------------------------------------------------------


class LlavaDataset(torch.utils.data.Dataset):
    """A weighted mixture of sources; item i is (source, row) of a pre-scanned good row.

    lengths: exact token counts (text + image tokens) per item.
    modality_lengths: the same, positive with an image and negative for text-only items (LLaVA's
        group_by_modality_length convention).
    skipped: bad rows excluded at build time, by reason (on_bad_sample: skip).
    truncated: number of items cut at model_max_length (text after the last image only).
    """

    def __init__(
        self,
        sources: list[SourceConfig],
        stores: list[JsonRows | HFRows],
        scans: list[SourceScan],
        item_source: np.ndarray,
        item_row: np.ndarray,
        ctxs: list[SampleContext],
        image_processor: Any,
        image_aspect_ratio: str,
    ) -> None:
        self.sources, self.stores, self.scans, self.ctxs = sources, stores, scans, ctxs
        self.item_source, self.item_row = item_source, item_row
        self.image_processor, self.image_aspect_ratio = image_processor, image_aspect_ratio
        lengths = np.zeros(len(item_row), dtype=np.int64)
        images = np.zeros(len(item_row), dtype=np.int64)
        truncated = np.zeros(len(item_row), dtype=bool)
        for k, scan in enumerate(scans):
            mask = item_source == k
            lengths[mask] = scan.lengths[item_row[mask]]
            images[mask] = scan.num_images[item_row[mask]]
            truncated[mask] = scan.truncated[item_row[mask]]
        self.lengths: list[int] = lengths.tolist()
        self.modality_lengths: list[int] = np.where(images > 0, lengths, -lengths).tolist()
        self.skipped: dict[str, int] = {}
        for scan in scans:
            for b in scan.bad:
                self.skipped[b["reason"]] = self.skipped.get(b["reason"], 0) + 1
        self.truncated = int(truncated.sum())
        self._summary: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.item_row)

    def summary(self) -> dict[str, Any]:
        """Per-source counts of the built index (rows, used items, images, text-only, truncated, skipped by
        reason, token-length percentiles): written to the run folder and logged to wandb. Computed once."""
        if self._summary is not None:
            return self._summary
        sources = []
        for k, (src, scan) in enumerate(zip(self.sources, self.scans)):
            good = scan.reasons < 0
            used = self.item_source == k
            lengths = scan.lengths[good]
            pct = np.percentile(lengths, [50, 90, 99]).astype(int).tolist() if len(lengths) else [0, 0, 0]
            skipped: dict[str, int] = {}
            for b in scan.bad:
                skipped[b["reason"]] = skipped.get(b["reason"], 0) + 1
            sources.append(
                {
                    "name": src.name,
                    "path": src.path,
                    "rows": int(len(scan.reasons)),
                    "good": int(good.sum()),
                    "used": int(used.sum()),
                    "weight": src.weight,
                    "images": int(scan.num_images[good].sum()),
                    "text_only": int((good & (scan.num_images == 0)).sum()),
                    "truncated": int(scan.truncated[good].sum()),
                    "skipped": skipped,
                    "tokens_p50": pct[0],
                    "tokens_p90": pct[1],
                    "tokens_p99": pct[2],
                    "tokens_max": int(lengths.max()) if len(lengths) else 0,
                }
            )
        self._summary = {
            "items": len(self),
            "skipped": dict(self.skipped),
            "truncated": self.truncated,
            "sources": sources,
        }
        return self._summary

    def __getitem__(self, i: int) -> dict[str, Any]:
        s, row = int(self.item_source[i]), int(self.item_row[i])
        src, ctx = self.sources[s], self.ctxs[s]
        sample_id: Any = row
        try:
            record = self.stores[s].get(row)
            sample_id = record_id(record, row)
            sample, paths = process_record(record, ctx, row)
            images = [load_image(p) for p in paths]
        except BadSample as e:
            # Validated at build time: a row failing now changed underneath us; never drop it silently.
            raise BadSampleError(src.name or src.path, row, sample_id, e.reason, e.detail) from e
        if len(sample.input_ids) != self.lengths[i]:
            raise RuntimeError(
                f"{src.name} row {row} (id {sample_id!r}): {len(sample.input_ids)} tokens but the cached length "
                f"is {self.lengths[i]}; the cache is stale (delete the cache folder)"
            )
        item: dict[str, Any] = {
            "input_ids": torch.tensor(sample.input_ids, dtype=torch.long),  # [L]
            "labels": torch.tensor(sample.labels, dtype=torch.long),  # [L]
            "num_images": sample.num_images,
            "id": sample_id,
            "source": src.name,
            "row": row,
        }
        if images:
            item["pixel_values"] = preprocess_images(
                images, self.image_processor, self.image_aspect_ratio
            )  # [n,3,H,W]
        return item


def make_context(
    data_cfg: DataConfig,
    src: SourceConfig,
    tokenizer: Any,
    num_image_tokens: int,
    image_token_id: int,
    image_token: str = DATA_IMAGE_TAG,
) -> SampleContext:
    """The SampleContext of one source under a data config (`image_token`: `model.image_token`)."""
    template = get_template(data_cfg.template, data_cfg.system_prompt, image_token)
    return SampleContext(
        tokenizer, template, image_token_id, num_image_tokens, data_cfg.model_max_length, src.image_folder
    )


def build_dataset(
    data_cfg: DataConfig,
    tokenizer: Any,
    image_processor: Any,
    num_image_tokens: int,
    image_token_id: int,
    seed: int = 0,
    split: str = "train",
    image_token: str = DATA_IMAGE_TAG,
) -> LlavaDataset:
    """Open, scan (cached) and mix the `train` (or `eval`) sources of a data config.

    Bad rows raise BadSampleError (source, row, id, reason) with `on_bad_sample: error`; with `skip`
    they are left out of the index here and counted per reason in the log, never at __getitem__ time.
    """
    if split not in ("train", "eval"):
        raise KeyError(f"unknown split {split!r}; valid: train, eval")
    sources = data_cfg.train if split == "train" else data_cfg.eval
    if not sources:
        raise ValueError(f"data.{split} has no sources")
    template = get_template(data_cfg.template, data_cfg.system_prompt, image_token)
    check_template_consistency(template, tokenizer)
    rng = np.random.default_rng(seed)
    stores, scans, ctxs, item_source, item_row = [], [], [], [], []
    for k, src in enumerate(sources):
        store = open_source(src, data_cfg.cache_dir)
        ctx = make_context(data_cfg, src, tokenizer, num_image_tokens, image_token_id, image_token)
        workers = data_cfg.num_workers or 1
        scan = cached_scan(src, store, ctx, data_cfg.cache_dir, workers if len(store) > 5000 else 1)
        if scan.bad and data_cfg.on_bad_sample == "error":
            b = scan.bad[0]
            raise BadSampleError(src.name or src.path, b["row"], b["id"], b["reason"], b["detail"])
        rows = mixture_rows(scan.good_rows, src.weight, rng)
        stores.append(store)
        scans.append(scan)
        ctxs.append(ctx)
        item_source.append(np.full(len(rows), k, dtype=np.int32))
        item_row.append(rows.astype(np.int64))
        counts: dict[str, int] = {}
        for b in scan.bad:
            counts[b["reason"]] = counts.get(b["reason"], 0) + 1
        skipped = ", ".join(f"{r}={c}" for r, c in sorted(counts.items())) or "none"
        logger.info(
            f"data {split} source {src.name}: {len(store)} rows, {len(scan.good_rows)} good, {len(rows)} used "
            f"(weight {src.weight}), skipped: {skipped}, truncated: {int(scan.truncated.sum())}"
            f"{' (cached scan)' if scan.from_cache else ''}"
        )
    return LlavaDataset(
        list(sources),
        stores,
        scans,
        np.concatenate(item_source),
        np.concatenate(item_row),
        ctxs,
        image_processor,
        data_cfg.image_aspect_ratio,
    )
