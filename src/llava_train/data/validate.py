"""`data validate` and `data inspect`: scan every row of every source into a report; show samples' labels."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from llava_train.config import RunConfig, SourceConfig
from llava_train.config_io import ConfigError
from llava_train.data.dataset import make_context
from llava_train.data.errors import BadSample
from llava_train.data.images import save_image
from llava_train.data.preference import SIDES
from llava_train.data.report import source_report
from llava_train.data.rows import open_source
from llava_train.data.scan import process_record, row_error_detail
from llava_train.data.scan_cache import cached_scan, data_cache_dir
from llava_train.data.tokenize import check_template_consistency, label_tokens
from llava_train.llava_format import normalize_conversation, preference_conversations, record_id, record_video
from llava_train.stages import get_stage

GREEN, RESET = "\033[32;1m", "\033[0m"


def _sources(cfg: RunConfig) -> list[tuple[str, SourceConfig]]:
    return [("train", s) for s in cfg.data.train] + [("eval", s) for s in cfg.data.eval]


def numbered_sources(cfg: RunConfig) -> tuple[list[tuple[SourceConfig, Any, int]], int]:
    """Samples are numbered 0.. over the rows of all train sources in order, then eval sources (`data inspect`,
    `trace`): [(source, its opened rows, number of its first row)] and the total."""
    opened, base = [], 0
    for _, src in _sources(cfg):
        store = open_source(src, data_cache_dir(cfg))
        opened.append((src, store, base))
        base += len(store)
    return opened, base


def check_index(index: int, total: int) -> None:
    """A sample index the user gave must name a row (ConfigError: a one-line CLI error, exit 2)."""

    if not 0 <= index < total:
        raise ConfigError(f"sample index {index} out of range: the sources hold {total} rows (0..{total - 1})")


def locate_sample(cfg: RunConfig, index: int) -> tuple[SourceConfig, Any, int]:
    """(source, its opened rows, row) of sample `index`; ConfigError when out of range."""
    opened, total = numbered_sources(cfg)
    check_index(index, total)
    src, store, base = next(entry for entry in opened if index < entry[2] + len(entry[1]))
    return src, store, index - base


def validate(cfg: RunConfig, parts: Any, num_workers: int | None = None) -> dict[str, Any]:
    """Scan every row of every train and eval source (in parallel processes) and return the report.

    Each row is normalised, rendered, tokenized with exact labels and image tokens, and its images
    are checked for existence and decodability (PIL verify; not preprocessed). The scan is the one
    training uses, read from / written to the same cache (`data.cache_dir`), so a second validate or
    the training start on unchanged data reads it instead of scanning again. The report holds, per
    source, `data.report.source_report` (rows, good, bad, images, text_only, truncated, token-length
    percentiles, bad rows by reason with the first ids); `bad_rows` lists EVERY bad row as
    {"source", "row", "id", "reason", "detail"}. `parts` is the run's `components.Components`.
    """
    start = time.perf_counter()
    workers = num_workers or cfg.data.num_workers or os.cpu_count() or 1
    consistency = check_template_consistency(parts.template, parts.tokenizer)
    cache_dir = data_cache_dir(cfg)
    report: dict[str, Any] = {
        "template": parts.template.name,
        "template_check": {
            "consistent": consistency.consistent,
            "first_diff": consistency.first_diff,
            "detail": consistency.detail,
        },
        "model_max_length": cfg.data.model_max_length,
        "image_tokens": parts.geometry.describe(),
        "num_workers": workers,
        "cache_dir": cache_dir,
        "sources": [],
        "bad_rows": [],
    }
    for split, src in _sources(cfg):
        store = open_source(src, cache_dir)
        scan = cached_scan(
            src,
            store,
            make_context(cfg.data, src, parts, get_stage(cfg.stage).preference),
            cache_dir,
            num_workers=workers,
        )
        report["bad_rows"].extend({"source": src.name, **b} for b in scan.bad)
        shards = {"shards": len(store.shards), "shards_scanned": scan.shards_scanned}
        report["sources"].append({**source_report(src, split, scan), "from_cache": scan.from_cache, **shards})
    report["total_rows"] = sum(s["rows"] for s in report["sources"])
    report["total_bad"] = len(report["bad_rows"])
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report


def format_report(report: dict[str, Any]) -> str:
    """The summary table of a `validate` report (plain text)."""
    cols = ("source", "split", "rows", "good", "bad", "images", "text_only", "trunc", "p50", "p90", "p99", "max")
    cols += ("img p50", "img p90", "img max")
    rows = []
    for s in report["sources"]:
        t, m = s["tokens"], s["image_tokens"]
        rows.append(
            (s["name"], s["split"], s["rows"], s["good"], s["bad"], s["images"], s["text_only"], s["truncated"])
            + (t["p50"], t["p90"], t["p99"], t["max"], m["p50"], m["p90"], m["max"])
        )
    widths = [max(len(str(c)), *(len(str(r[k])) for r in rows)) for k, c in enumerate(cols)]

    def fmt(r: tuple) -> str:
        # Names left-aligned, numbers right-aligned.
        return "  ".join(str(v).ljust(w) if k < 2 else str(v).rjust(w) for k, (v, w) in enumerate(zip(r, widths)))

    lines = [
        f"template {report['template']}, model_max_length {report['model_max_length']}, "
        f"image tokens {report['image_tokens']}; token lengths include image tokens",
        fmt(cols),
        fmt(tuple("-" * w for w in widths)),
    ]
    lines += [fmt(r) for r in rows]
    if not report["template_check"]["consistent"]:
        lines.append(f"note: {report['template_check']['detail']}")
    if report["total_bad"]:
        lines.append(f"bad rows: {report['total_bad']} of {report['total_rows']}")
        for s in report["sources"]:
            for reason, entry in s["bad_by_reason"].items():
                ids = ", ".join(map(str, entry["first_ids"]))
                more = ", ..." if entry["count"] > len(entry["first_ids"]) else ""
                lines.append(f"  {s['name']}: {reason}: {entry['count']} (ids: {ids}{more})")
    else:
        lines.append(f"no bad rows in {report['total_rows']} rows")
    cached = sum(1 for s in report["sources"] if s.get("from_cache"))
    if cached == len(report["sources"]):
        how = "read from the scan cache"
    else:
        how = f"scanned with {report['num_workers']} worker(s) ({cached} of {len(report['sources'])} sources cached)"
    lines.append(f"{how} in {report['seconds']} s (cache: {report.get('cache_dir') or 'off'})")
    # Ids come from the data: a lone surrogate ("\ud800") would make printing the report raise.
    return "\n".join(lines).encode("utf-8", "backslashreplace").decode("utf-8")


# -- inspect ------------------------------------------------------------------------------------


def render_labelled(
    record: dict[str, Any],
    parts: Any,
    color: bool,
    media_tokens: list[int] | None = None,
    conversation: Any = None,
) -> str:
    """A record's rendered prompt with trained spans marked (ANSI green, or `[[...]]`), images as `<image xN>`.

    media_tokens: LM tokens of each image / video in text order (anyres: from each image's size);
    None = the geometry's fixed count per image. conversation: one side of a preference pair (stage dpo), shown
    as DPO trains it: its final reply only.

    The text is cut from the rendered prompt by each token's character offsets (so spaces show
    exactly); tokens with no characters in the prompt (an added BOS) show as their token string.
    """
    template, tokenizer = parts.template, parts.tokenizer
    video_token = template.video_token if record_video(record) is not None else None
    conv = record.get("conversations") if conversation is None else conversation
    turns = normalize_conversation(conv, template.image_token, video_token)
    segments = template.render(turns, tokenizer)
    prompt = "".join(s.text for s in segments)
    enc = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=template.add_special_tokens)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    flags = label_tokens(prompt, segments, offsets, template.name)
    if conversation is not None:  # DPO trains the final reply only (`data.preference.final_reply_only`)
        last = max(i for i, f in enumerate(flags) if f)
        first = last
        while first > 0 and flags[first - 1]:
            first -= 1
        flags = [f and i >= first for i, f in enumerate(flags)]
    counts = iter(media_tokens or [])
    start_mark, end_mark = (GREEN, RESET) if color else ("[[", "]]")
    out: list[str] = []
    cursor, open_span = 0, False
    for tok_id, (start, end), trained in zip(enc["input_ids"], offsets, flags):
        if trained != open_span:
            out.append(start_mark if trained else end_mark)
            open_span = trained
        if tok_id in (parts.image_token_id, parts.video_token_id):
            kind = "image" if tok_id == parts.image_token_id else "video"
            text = f"<{kind} x{next(counts, parts.geometry.base_tokens)}>"
        elif end <= cursor or start == end:
            text = tokenizer.convert_ids_to_tokens(tok_id) if start == end else ""
        else:
            text = prompt[max(start, cursor) : end]
        # Text between tokens (skipped by the tokenizer) is shown too.
        gap = prompt[cursor:start] if start > cursor else ""
        out.append(gap + text)
        cursor = max(cursor, end)
    if open_span:
        out.append(end_mark)
    out.append(prompt[cursor:])
    return "".join(out)


def inspect_samples(
    cfg: RunConfig,
    parts: Any,
    indices: list[int] | None = None,
    jsonl_path: str | None = None,
    out: TextIO | None = None,
    color: bool | None = None,
    images_dir: str | None = None,
) -> int:
    """Show samples' prompts with trained spans highlighted and/or write them as JSONL.

    Samples are numbered 0.. over the rows of all train sources in order (then eval sources).
    `indices`: the samples to show/write (None: show sample 0 and write every sample). `color`:
    ANSI colour (None = when `out` is a TTY), else `[[...]]` markers. JSONL lines are
    {"id", "source", "input_ids", "labels", "num_images"} with image blocks fully expanded; bad rows
    are printed with their reason and not written. `images_dir`: write each shown sample's images there,
    as stored (`sample<index>_image<k>.<format>`, files and embedded bytes alike). Returns the number of
    JSONL lines written.
    `parts` is the run's `components.Components`.
    """
    stream = out if out is not None else sys.stdout
    use_color = color if color is not None else bool(getattr(stream, "isatty", lambda: False)())
    opened, total = numbered_sources(cfg)
    wanted = sorted(set(indices)) if indices is not None else None
    for i in wanted or []:
        check_index(i, total)
    show = set(wanted) if wanted is not None else {0}
    written = 0
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(Path(jsonl_path).open("w")) if jsonl_path else None
        write_all = wanted is None and sink is not None
        for src, store, base in opened:
            ctx = make_context(cfg.data, src, parts, get_stage(cfg.stage).preference)
            rows = range(len(store)) if write_all else [i - base for i in show if base <= i < base + len(store)]
            for row in rows:
                index = base + row
                sample_id: Any = row
                try:
                    record = store.get(row)
                    sample_id = record_id(record, row)
                    done = process_record(record, ctx, row)
                    sample = done.sample
                except Exception as e:  # a bad row (or one raising anything else) is shown, never a traceback
                    if index in show:
                        why = e if isinstance(e, BadSample) else f"row_error: {row_error_detail(e)}"
                        stream.write(f"# sample {index} ({src.name} row {row}, id {sample_id!r}): BAD {why}\n")
                    continue
                if index in show:
                    trained = sum(1 for label in sample.labels if label != -100)
                    stream.write(
                        f"# sample {index} ({src.name} row {row}, id {sample_id!r}): {len(sample.input_ids)} tokens, "
                        f"{trained} trained, {sample.num_images} image(s){', truncated' if sample.truncated else ''}\n"
                    )
                    if done.rejected is None:
                        stream.write(render_labelled(record, parts, use_color, done.media_tokens) + "\n")
                    else:  # a preference pair: both sides, each with its trained final reply
                        for side, conv in zip(SIDES, preference_conversations(record)):
                            text = render_labelled(record, parts, use_color, done.media_tokens, conv)
                            stream.write(f"# {side}\n{text}\n")
                    if images_dir is not None and done.paths:
                        Path(images_dir).mkdir(parents=True, exist_ok=True)
                        stem = Path(images_dir) / f"sample{index}_image"
                        try:
                            written_images = [save_image(ref, f"{stem}{k}") for k, ref in enumerate(done.paths)]
                            stream.write(f"# images of sample {index}: {', '.join(written_images)}\n")
                        except BadSample as e:  # not opened by the labels view: a disallowed format, say
                            stream.write(f"# images of sample {index}: BAD {e}\n")
                if sink is not None:
                    line = {
                        "id": sample_id,
                        "source": src.name,
                        "input_ids": sample.input_ids,
                        "labels": sample.labels,
                        "num_images": sample.num_images,
                    }
                    if done.rejected is not None:
                        line.update(rejected_input_ids=done.rejected.input_ids, rejected_labels=done.rejected.labels)
                    sink.write(json.dumps(line) + "\n")
                    written += 1
    return written
