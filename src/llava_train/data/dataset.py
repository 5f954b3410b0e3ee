"""The training dataset: a weighted mixture of scanned sources; item i is one good row, tokenized with its images.

Rows are read from their stores (`data.rows`), scanned once for exact lengths and bad rows
(`data.scan`, cached), mixed by weight, and built into samples at `__getitem__` time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from llava_train.config import DataConfig, SourceConfig
from llava_train.data.errors import BadSample, BadSampleError, DataFileError
from llava_train.data.images import ImageLimits, preprocess_anyres, preprocess_images, preprocess_video
from llava_train.data.report import format_source_line, source_report
from llava_train.data.rows import SourceRows, open_source
from llava_train.data.scan import SampleContext, SourceScan, process_record, row_error_detail
from llava_train.data.scan_cache import cached_scan
from llava_train.data.tokenize import check_template_consistency
from llava_train.llava_format import record_id
from llava_train.utils.logging import get_logger

logger = get_logger(__name__)

# Rows that may fail at load time per data process under `on_bad_sample: skip` before the run stops: a few are
# files changed or broken since the scan; many mean the data is not what was validated.
MAX_LOAD_SKIPS = 100


def make_context(data_cfg: DataConfig, src: SourceConfig, parts: Any, preference: bool = False) -> SampleContext:
    """The SampleContext of one source: the run's template, tokenizer and image facts (`parts`: Components);
    `preference`: the stage reads preference pairs (`StageSpec.preference`)."""
    return SampleContext(
        parts.tokenizer,
        parts.template,
        parts.image_token_id,
        parts.geometry,
        data_cfg.model_max_length,
        src.image_folder,
        parts.video_token_id,
        data_cfg.video_frames,
        ImageLimits(data_cfg.max_image_side, data_cfg.max_image_aspect_ratio),
        preference,
    )


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


class LlavaDataset(torch.utils.data.Dataset):
    """A weighted mixture of sources; item i is (source, row) of a pre-scanned good row.

    lengths: exact token counts (text + image tokens) per item.
    modality_lengths: the same, positive with an image and negative for text-only items (LLaVA's
        group_by_modality_length convention).
    skipped: bad rows excluded at build time, by reason (on_bad_sample: skip).
    load_skipped: items that failed at load time and were replaced (on_bad_sample: skip; per process).
    truncated: number of items cut at model_max_length (text after the last image only).
    reports: the per-source reports (`data.report.source_report`), in source order.
    has_video: whether any item has a video (OneVision): every micro-batch of such a run then runs the
        video path of the vision tower, real or keepalive (`training.trainer`).
    """

    def __init__(
        self,
        sources: list[SourceConfig],
        stores: list[SourceRows],
        scans: list[SourceScan],
        item_source: np.ndarray,
        item_row: np.ndarray,
        ctxs: list[SampleContext],
        image_processor: Any,
        geometry: Any,
        reports: list[dict[str, Any]],
        on_bad_sample: str = "error",
    ) -> None:
        self.sources, self.stores, self.scans, self.ctxs = sources, stores, scans, ctxs
        self.item_source, self.item_row = item_source, item_row
        self.image_processor, self.geometry = image_processor, geometry
        self.reports = reports
        lengths = np.zeros(len(item_row), dtype=np.int64)
        images = np.zeros(len(item_row), dtype=np.int64)
        truncated = np.zeros(len(item_row), dtype=bool)
        for k, scan in enumerate(scans):
            mask = item_source == k
            lengths[mask] = scan.lengths[item_row[mask]]
            images[mask] = scan.num_images[item_row[mask]]
            truncated[mask] = scan.truncated[item_row[mask]]
        # The samplers take Python lists (main process); __getitem__ checks against the array, so DataLoader
        # workers never touch (and copy-on-write) the list's int objects: at 10M rows that is ~360 MB a worker.
        self._length_array = lengths
        self.lengths: list[int] = lengths.tolist()
        self.modality_lengths: list[int] = np.where(images > 0, lengths, -lengths).tolist()
        self.skipped: dict[str, int] = {}
        for report in reports:
            for reason, entry in report["bad_by_reason"].items():
                self.skipped[reason] = self.skipped.get(reason, 0) + entry["count"]
        self.truncated = int(truncated.sum())
        self.has_video = any(bool(scan.num_videos[scan.good_rows].any()) for scan in scans)
        self.on_bad_sample = on_bad_sample
        self.load_skipped: set[int] = set()  # items that failed at load time in this process (skip)

    def __len__(self) -> int:
        return len(self.item_row)

    def summary(self) -> dict[str, Any]:
        """The built index for the run folder's `data_summary.json` and wandb: items, skipped rows by reason,
        truncated items, and the per-source reports (the same as `data validate` writes, plus used/weight)."""
        return {
            "items": len(self),
            "skipped": dict(self.skipped),
            "truncated": self.truncated,
            "sources": self.reports,
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        while True:
            try:
                return self._item(i)
            except BadSampleError as e:
                if self.on_bad_sample != "skip" or e.row is None:
                    raise
                i = self._skip(i, e)

    def _item(self, i: int) -> dict[str, Any]:
        s, row = int(self.item_source[i]), int(self.item_row[i])
        src, ctx = self.sources[s], self.ctxs[s]
        sample_id: Any = row
        try:
            record = self.stores[s].get(row)
            sample_id = record_id(record, row)
            done = process_record(record, ctx, row, io="load")
        except BadSample as e:
            # The scan passed it: the row or its image changed (or broke) underneath us; never dropped silently.
            raise BadSampleError(src.name or src.path, row, sample_id, e.reason, e.detail) from e
        except Exception as e:  # an unreadable file at load time is that row's failure, not a worker traceback
            raise BadSampleError(src.name or src.path, row, sample_id, "row_error", row_error_detail(e)) from e
        if done.length != int(self._length_array[i]):
            raise BadSampleError(
                f"{src.name} row {row} (id {sample_id!r}): {done.length} tokens but the cached length "
                f"is {int(self._length_array[i])}; the cache is stale (delete the cache folder)"
            )
        item = build_item(done, src.name, row, sample_id, self.image_processor, self.geometry)
        item["index"] = i  # the precomputed DPO reference is looked up by item
        return item

    def _skip(self, i: int, e: BadSampleError) -> int:
        """`on_bad_sample: skip` for a row failing at load time: one log line, then the next item of the same
        exact length and modality stands in (batches, packing and every rank's step stay as planned); past
        MAX_LOAD_SKIPS failures in this process the run stops (BadSampleError, one line)."""
        self.load_skipped.add(i)
        logger.warning("skipped at load time (%d): %s", len(self.load_skipped), e)
        if len(self.load_skipped) > MAX_LOAD_SKIPS:
            raise BadSampleError(
                f"more than {MAX_LOAD_SKIPS} rows failed at load time in one data process (last: {e}); the data "
                "changed since its scan: run `llava-train data validate` on it"
            ) from e
        modality = np.asarray(self.modality_lengths)
        same = np.flatnonzero(modality == modality[i])
        for j in np.concatenate([same[same > i], same[same < i]]):
            if int(j) not in self.load_skipped:
                return int(j)
        raise BadSampleError(f"no row of the same length can replace a row failing at load time ({e})") from e


def build_item(done: Any, source: str | None, row: int, sample_id: Any, image_processor: Any, geometry: Any) -> dict:
    """One dataset item from a processed row (`data.scan.Processed` loaded with io="load"): token tensors,
    bookkeeping, and the images preprocessed as the arch's model takes them (also `llava-train trace`'s)."""
    sample = done.sample
    item: dict[str, Any] = {
        "input_ids": torch.tensor(sample.input_ids, dtype=torch.long),  # [L]
        "labels": torch.tensor(sample.labels, dtype=torch.long),  # [L]
        "num_images": sample.num_images,
        "num_videos": sample.num_videos,
        "id": sample_id,
        "source": source,
        "row": row,
    }
    if done.rejected is not None:  # a preference pair: its rejected side shares the images
        item["rejected_input_ids"] = torch.tensor(done.rejected.input_ids, dtype=torch.long)  # [L']
        item["rejected_labels"] = torch.tensor(done.rejected.labels, dtype=torch.long)  # [L']
    if done.images:
        if geometry.arch == "llava":
            # [n, 3, S, S]
            item["pixel_values"] = preprocess_images(done.images, image_processor, geometry.aspect_ratio)
        else:
            # [sum of crops, 3, S, S] and [n, 2]: transformers' anyres input
            item["pixel_values"], item["image_sizes"] = preprocess_anyres(done.images, image_processor, geometry)
    if done.video:
        item["pixel_values_videos"] = preprocess_video(done.video, image_processor, geometry.crop)  # [1, F, 3, S, S]
    return item


def build_dataset(
    data_cfg: DataConfig,
    parts: Any,
    seed: int = 0,
    split: str = "train",
    cache_dir: str | None = None,
    preference: bool = False,
) -> LlavaDataset:
    """Open, scan (cached in `cache_dir`) and mix the `train` (or `eval`) sources of a data config.

    `parts` is the run's `components.Components` (tokenizer, template, processor, image facts). Bad rows
    raise BadSampleError (source, row, id, reason) with `on_bad_sample: error`; with `skip` they are
    left out of the index here and counted per reason in the log, never at __getitem__ time. `preference`: rows
    are preference pairs (stage dpo); an item then holds both sides.
    """
    if split not in ("train", "eval"):
        raise KeyError(f"unknown split {split!r}; valid: train, eval")
    sources = data_cfg.train if split == "train" else data_cfg.eval
    if not sources:
        raise ValueError(f"data.{split} has no sources")
    check_template_consistency(parts.template, parts.tokenizer)
    rng = np.random.default_rng(seed)
    stores, scans, ctxs, reports, item_source, item_row = [], [], [], [], [], []
    for k, src in enumerate(sources):
        store = open_source(src, cache_dir)
        ctx = make_context(data_cfg, src, parts, preference)
        workers = data_cfg.num_workers or 1
        scan = cached_scan(src, store, ctx, cache_dir, workers if len(store) > 5000 else 1)
        if scan.bad and data_cfg.on_bad_sample == "error":
            b = scan.bad[0]
            raise BadSampleError(src.name or src.path, b["row"], b["id"], b["reason"], b["detail"])
        rows = mixture_rows(scan.good_rows, src.weight, rng)
        report = source_report(src, split, scan, used=len(rows), weight=src.weight)
        logger.info(format_source_line(report))
        stores.append(store)
        scans.append(scan)
        ctxs.append(ctx)
        reports.append(report)
        item_source.append(np.full(len(rows), k, dtype=np.int32))
        item_row.append(rows.astype(np.int64))
    if sum(len(rows) for rows in item_row) == 0:
        raise DataFileError(f"data.{split}: no usable row (every row of its sources is bad; see `data validate`)")
    return LlavaDataset(
        list(sources),
        stores,
        scans,
        np.concatenate(item_source),
        np.concatenate(item_row),
        ctxs,
        parts.image_processor,
        parts.geometry,
        reports,
        data_cfg.on_bad_sample,
    )
