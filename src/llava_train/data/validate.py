"""`data validate` and `data inspect`: scan every row of every source into a report; show samples' labels."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from llava_train.config import RunConfig, SourceConfig
from llava_train.data.dataset import REASON_CODES, make_context, open_source, process_record, scan_source
from llava_train.data.errors import BadSample
from llava_train.data.templates import run_template
from llava_train.data.tokenize import check_template_consistency, label_tokens
from llava_train.llava_format import normalize_conversation, record_id

FIRST_IDS = 5  # row ids listed per bad-row reason in the summary
GREEN, RESET = "\033[32;1m", "\033[0m"


def _sources(cfg: RunConfig) -> list[tuple[str, SourceConfig]]:
    return [("train", s) for s in cfg.data.train] + [("eval", s) for s in cfg.data.eval]


def _percentiles(lengths: np.ndarray) -> dict[str, int]:
    if len(lengths) == 0:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99], method="nearest")
    return {"p50": int(p50), "p90": int(p90), "p99": int(p99), "max": int(lengths.max())}


def validate(
    cfg: RunConfig,
    tokenizer: Any,
    image_processor: Any,
    num_image_tokens: int,
    image_token_id: int,
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Scan every row of every train and eval source (in parallel processes) and return the report.

    Each row is normalised, rendered, tokenized with exact labels and image tokens, and its images
    are checked for existence and decodability (PIL verify; not preprocessed). The report holds, per
    source, rows / good / bad / images / text_only / truncated counts, token-length percentiles of
    the good rows and bad rows by reason with the first few ids; `bad_rows` lists EVERY bad row as
    {"source", "row", "id", "reason", "detail"}. `image_processor` is unused (kept for a uniform
    signature with build_dataset; validation does not preprocess images).
    """
    del image_processor
    start = time.perf_counter()
    workers = num_workers or cfg.data.num_workers or os.cpu_count() or 1
    template = run_template(cfg)
    consistency = check_template_consistency(template, tokenizer)
    report: dict[str, Any] = {
        "template": template.name,
        "template_check": {
            "consistent": consistency.consistent,
            "first_diff": consistency.first_diff,
            "detail": consistency.detail,
        },
        "model_max_length": cfg.data.model_max_length,
        "num_image_tokens": num_image_tokens,
        "num_workers": workers,
        "sources": [],
        "bad_rows": [],
    }
    for split, src in _sources(cfg):
        store = open_source(src, cfg.data.cache_dir)
        ctx = make_context(cfg.data, src, tokenizer, num_image_tokens, image_token_id, cfg.model.image_token)
        scan = scan_source(store, ctx, num_workers=workers, check_images=True, chunk_size=500)
        good = scan.reasons < 0
        by_reason: dict[str, dict[str, Any]] = {}
        for b in scan.bad:
            entry = by_reason.setdefault(b["reason"], {"count": 0, "first_ids": []})
            entry["count"] += 1
            if len(entry["first_ids"]) < FIRST_IDS:
                entry["first_ids"].append(b["id"])
            report["bad_rows"].append({"source": src.name, **b})
        report["sources"].append(
            {
                "name": src.name,
                "path": src.path,
                "split": split,
                "rows": len(store),
                "good": int(good.sum()),
                "bad": len(scan.bad),
                "images": int(scan.num_images[good].sum()),
                "text_only": int((good & (scan.num_images == 0)).sum()),
                "truncated": int(scan.truncated[good].sum()),
                "tokens": _percentiles(scan.lengths[good]),
                "bad_by_reason": {r: by_reason[r] for r in REASON_CODES if r in by_reason},
            }
        )
    report["total_rows"] = sum(s["rows"] for s in report["sources"])
    report["total_bad"] = len(report["bad_rows"])
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report


def format_report(report: dict[str, Any]) -> str:
    """The summary table of a `validate` report (plain text)."""
    cols = ("source", "split", "rows", "good", "bad", "images", "text_only", "trunc", "p50", "p90", "p99", "max")
    rows = []
    for s in report["sources"]:
        t = s["tokens"]
        rows.append(
            (s["name"], s["split"], s["rows"], s["good"], s["bad"], s["images"], s["text_only"], s["truncated"])
            + (t["p50"], t["p90"], t["p99"], t["max"])
        )
    widths = [max(len(str(c)), *(len(str(r[k])) for r in rows)) for k, c in enumerate(cols)]

    def fmt(r: tuple) -> str:
        # Names left-aligned, numbers right-aligned.
        return "  ".join(str(v).ljust(w) if k < 2 else str(v).rjust(w) for k, (v, w) in enumerate(zip(r, widths)))

    lines = [
        f"template {report['template']}, model_max_length {report['model_max_length']}, "
        f"{report['num_image_tokens']} tokens per image; token lengths include image tokens",
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
    lines.append(f"scanned in {report['seconds']} s with {report['num_workers']} worker(s)")
    return "\n".join(lines)


# -- inspect ------------------------------------------------------------------------------------


def render_labelled(
    record: dict[str, Any], cfg: RunConfig, tokenizer: Any, num_image_tokens: int, image_token_id: int, color: bool
) -> str:
    """A record's rendered prompt with trained spans marked (ANSI green, or `[[...]]`), images as `<image xN>`.

    The text is cut from the rendered prompt by each token's character offsets (so spaces show
    exactly); tokens with no characters in the prompt (an added BOS) show as their token string.
    """
    template = run_template(cfg)
    turns = normalize_conversation(record.get("conversations"), template.image_token)
    segments = template.render(turns, tokenizer)
    prompt = "".join(s.text for s in segments)
    enc = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=template.add_special_tokens)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    flags = label_tokens(prompt, segments, offsets, template.name)
    start_mark, end_mark = (GREEN, RESET) if color else ("[[", "]]")
    out: list[str] = []
    cursor, open_span = 0, False
    for tok_id, (start, end), trained in zip(enc["input_ids"], offsets, flags):
        if trained != open_span:
            out.append(start_mark if trained else end_mark)
            open_span = trained
        if tok_id == image_token_id:
            text = f"<image x{num_image_tokens}>"
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
    tokenizer: Any,
    num_image_tokens: int,
    image_token_id: int,
    indices: list[int] | None = None,
    jsonl_path: str | None = None,
    out: TextIO | None = None,
    color: bool | None = None,
) -> int:
    """Show samples' prompts with trained spans highlighted and/or write them as JSONL.

    Samples are numbered 0.. over the rows of all train sources in order (then eval sources).
    `indices`: the samples to show/write (None: show sample 0 and write every sample). `color`:
    ANSI colour (None = when `out` is a TTY), else `[[...]]` markers. JSONL lines are
    {"id", "source", "input_ids", "labels", "num_images"} with image blocks fully expanded; bad rows
    are printed with their reason and not written. Returns the number of JSONL lines written.
    """
    stream = out if out is not None else sys.stdout
    use_color = color if color is not None else bool(getattr(stream, "isatty", lambda: False)())
    opened = [(src, open_source(src, cfg.data.cache_dir)) for _, src in _sources(cfg)]
    total = sum(len(store) for _, store in opened)
    wanted = sorted(set(indices)) if indices is not None else None
    for i in wanted or []:
        if not 0 <= i < total:
            raise IndexError(f"sample index {i} out of range: the sources hold {total} rows (0..{total - 1})")
    show = set(wanted) if wanted is not None else {0}
    written = 0
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(Path(jsonl_path).open("w")) if jsonl_path else None
        write_all = wanted is None and sink is not None
        base = 0
        for src, store in opened:
            ctx = make_context(cfg.data, src, tokenizer, num_image_tokens, image_token_id, cfg.model.image_token)
            rows = range(len(store)) if write_all else [i - base for i in show if base <= i < base + len(store)]
            for row in rows:
                index = base + row
                sample_id: Any = row
                try:
                    record = store.get(row)
                    sample_id = record_id(record, row)
                    sample, _ = process_record(record, ctx, row)
                except BadSample as e:
                    if index in show:
                        stream.write(f"# sample {index} ({src.name} row {row}, id {sample_id!r}): BAD {e}\n")
                    continue
                if index in show:
                    trained = sum(1 for label in sample.labels if label != -100)
                    stream.write(
                        f"# sample {index} ({src.name} row {row}, id {sample_id!r}): {len(sample.input_ids)} tokens, "
                        f"{trained} trained, {sample.num_images} image(s){', truncated' if sample.truncated else ''}\n"
                    )
                    stream.write(render_labelled(record, cfg, tokenizer, num_image_tokens, image_token_id, use_color))
                    stream.write("\n")
                if sink is not None:
                    line = {
                        "id": sample_id,
                        "source": src.name,
                        "input_ids": sample.input_ids,
                        "labels": sample.labels,
                        "num_images": sample.num_images,
                    }
                    sink.write(json.dumps(line) + "\n")
                    written += 1
            base += len(store)
    return written
