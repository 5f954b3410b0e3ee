"""Row stores: a source is a file, folder or glob of shards (JSON/JSONL, parquet, arrow, save_to_disk, webdataset
tar), read as one sequence of LLaVA records by `open_source`.

Rows are never held as a Python list of dicts: a LLaVA JSON list or JSONL file is converted once
into one uint8 buffer of JSON bytes plus int64 row offsets (saved as .npy in the cache folder and
memory-mapped, so DataLoader workers share the page cache); parquet is read by row group straight from
the shard (no arrow copy), arrow files and save_to_disk folders are memory-mapped, tar shards are read by
member offsets (`data.tar_rows`). Embedded images stay encoded bytes until a worker loads them.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from llava_train.config import SourceConfig
from llava_train.config_io import ConfigError
from llava_train.data.errors import BadSample
from llava_train.data.tar_rows import TarRows
from llava_train.llava_format import canonical_record


class JsonRows:
    """Rows as JSON bytes in one uint8 buffer + int64 offsets (row i = buf[off[i]:off[i+1]]).

    `lines` holds each row's 1-based line number in its file (0 for rows of a JSON list), used in
    `malformed_json` details. Malformed JSONL lines are kept as raw bytes so that row numbers stay
    aligned with the file; `get_raw` raises BadSample for them.
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

    def get_raw(self, i: int) -> dict[str, Any]:
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


def fingerprint_path(path: Path) -> str:
    """Hash of a file's (or a folder's files') name, size and mtime."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


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
        except RecursionError:  # one row nested too deep for the parser: split the list, let that row fail alone
            rows = None
            chunks = split_json_list(data)
            lines = [0] * len(chunks)
        for row in rows or ():
            try:
                chunks.append(json.dumps(row, ensure_ascii=False).encode())
            except UnicodeEncodeError:  # a lone surrogate ("\ud800") has no UTF-8 form: keep it escaped
                chunks.append(json.dumps(row).encode())
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


_JSON_SYNTAX = re.compile(rb'[\\"\[\]{},]')


def split_json_list(data: bytes) -> list[bytes]:
    """The raw bytes of each element of a JSON list (already known to be well-formed up to nesting depth), found
    by tracking strings and brackets, so an element nested deeper than `json` can parse is one bad row."""
    chunks: list[bytes] = []
    depth, in_string, escaped, start = 0, False, -1, data.index(b"[") + 1
    for m in _JSON_SYNTAX.finditer(data, start - 1):
        c, pos = m.group(), m.start()
        if in_string:
            if c == b"\\" and escaped != pos:
                escaped = pos + 1  # the next character is escaped
            elif c == b'"' and escaped != pos:
                in_string = False
        elif c == b'"':
            in_string = True
        elif c in (b"[", b"{"):
            depth += 1
        elif c in (b"]", b"}") or c == b",":
            if depth == 1 and (c == b"," or c == b"]"):
                element = data[start:pos].strip()
                if element:
                    chunks.append(element)
                start = pos + 1
            if c != b",":
                depth -= 1
    return chunks


def _json_rows(path: Path, cache_dir: str | None) -> JsonRows:
    """A JSON list / JSONL file as JsonRows, converted once into `cache_dir` (memory-mapped after that)."""
    if cache_dir is None:
        return JsonRows(*_read_json_rows(path), str(path))
    folder = Path(cache_dir) / f"rows-{fingerprint_path(path.resolve())}"
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


class ArrowRows:
    """Rows of an Arrow table, read as plain values: HF `Image` columns come back as `{"bytes", "path"}` structs
    and are never decoded here (`data.images.image_ref` reads them).

    kind: `parquet` (random access by row group, from the footer's row counts; the last row group read is
    kept, so a sequential scan reads each once), `arrow` (an Arrow IPC file or stream, memory-mapped) or
    `hf_disk` (a `save_to_disk` folder, memory-mapped by `datasets`). The table opens lazily, so DataLoader
    workers and scan processes receive only the path.
    """

    def __init__(self, path: str, kind: str, split: str = "train") -> None:
        self.path, self.kind, self.split = path, kind, split
        self._table: Any = None
        self._group: tuple[int, Any] | None = None
        self._open()
        table = self._table
        schema = table.schema_arrow if kind == "parquet" else table.schema if kind == "arrow" else None
        self.columns: list[str] = list(table.column_names if schema is None else schema.names)
        self._length = table.metadata.num_rows if kind == "parquet" else table.num_rows

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_table": None, "_group": None}

    def _open(self) -> Any:
        if self._table is None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            if self.kind == "parquet":
                self._table = pq.ParquetFile(self.path, memory_map=True)
                self._starts = np.cumsum(
                    [0]
                    + [self._table.metadata.row_group(g).num_rows for g in range(self._table.metadata.num_row_groups)]
                )
            elif self.kind == "arrow":
                source = pa.memory_map(self.path)
                try:
                    self._table = pa.ipc.open_file(source).read_all()
                except pa.ArrowInvalid:  # datasets writes the IPC stream format
                    self._table = pa.ipc.open_stream(pa.memory_map(self.path)).read_all()
            else:
                self._table = _load_from_disk(Path(self.path), self.split)
        return self._table

    def __len__(self) -> int:
        return self._length

    def get_raw(self, i: int) -> dict[str, Any]:
        """Row i as a dict of plain Python values."""
        table = self._open()
        if self.kind == "parquet":
            g = int(np.searchsorted(self._starts, i, side="right")) - 1
            if self._group is None or self._group[0] != g:
                self._group = (g, table.read_row_group(g))
            return self._group[1].slice(i - int(self._starts[g]), 1).to_pylist()[0]
        if self.kind == "hf_disk":
            return table[int(i)].to_pylist()[0]
        return table.slice(int(i), 1).to_pylist()[0]


def _load_from_disk(path: Path, split: str) -> Any:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise KeyError(f"split {split!r} not in {path}; available: {', '.join(ds)}")
        ds = ds[split]
    # The arrow format gives each row's stored values (image bytes, not PIL) and honours select/shuffle indices.
    return ds.with_format("arrow")


SHARD_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow", ".tar")
HF_DISK_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
Shard = JsonRows | ArrowRows | TarRows


def _is_hf_disk(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in HF_DISK_FILES)


def shard_paths(path: str) -> list[Path]:
    """The shard files of a source path: the file itself, a save_to_disk folder (one shard), every
    .json/.jsonl/.parquet/.arrow/.tar file below a folder, or a glob's matches, sorted by path.
    FileNotFoundError when there is nothing to read."""
    p = Path(path)
    if any(c in path for c in "*?["):
        matches = sorted(Path(m) for m in glob.glob(path, recursive=True))
        files = [m for m in matches if (m.is_file() and m.suffix in SHARD_SUFFIXES) or _is_hf_disk(m)]
        if not files:
            raise FileNotFoundError(f"no {'/'.join(SHARD_SUFFIXES)} shards match {path}")
        return files
    if not p.exists():
        raise FileNotFoundError(f"data source not found: {path}")
    if p.is_file() or _is_hf_disk(p):
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SHARD_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no {'/'.join(SHARD_SUFFIXES)} shards (and no save_to_disk dataset) in {path}")
    return files


def open_shard(path: Path, split: str, cache_dir: str | None) -> Shard:
    """One shard file (or save_to_disk folder) as a row store, by its suffix."""
    if _is_hf_disk(path):
        return ArrowRows(str(path), "hf_disk", split)
    if path.suffix == ".parquet":
        return ArrowRows(str(path), "parquet")
    if path.suffix == ".arrow":
        return ArrowRows(str(path), "arrow")
    if path.suffix == ".tar":
        return TarRows(str(path), cache_dir, fingerprint_path(path.resolve()))
    return _json_rows(path, cache_dir)


class SourceRows:
    """A source's rows: its shards in order, numbered 0.. across them; `get` gives LLaVA records
    (`llava_format.canonical_record` with the source's column mapping).

    shards / shard_paths / fingerprints: per shard (the scan is cached per shard, keyed by its fingerprint).
    """

    def __init__(self, shards: list[Shard], paths: list[str], columns: dict[str, str | None], path: str) -> None:
        self.shards, self.shard_paths, self.columns, self.path = shards, paths, columns, path
        self.fingerprints = [fingerprint_path(Path(p).resolve()) for p in paths]
        self.starts = np.cumsum([0] + [len(s) for s in shards]).astype(np.int64)
        self.name_shards = len(shards) > 1  # bad-row details name the shard when the source has several

    def __len__(self) -> int:
        return int(self.starts[-1])

    def shard(self, k: int) -> SourceRows:
        """Shard k alone (its rows numbered from 0), what the per-shard scan reads."""
        view = SourceRows.__new__(SourceRows)
        view.shards, view.shard_paths, view.columns, view.path = (
            [self.shards[k]],
            [self.shard_paths[k]],
            self.columns,
            self.path,
        )
        view.fingerprints, view.starts = [self.fingerprints[k]], np.asarray([0, len(self.shards[k])], dtype=np.int64)
        view.name_shards = self.name_shards
        return view

    def locate(self, i: int) -> tuple[int, int]:
        """(shard, row in the shard) of row i."""
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return k, int(i - self.starts[k])

    def get(self, i: int) -> dict[str, Any]:
        """Row i as a LLaVA record; BadSample (malformed_json) for an unreadable row, naming its shard when the
        source has several."""
        k, j = self.locate(i)
        shard = self.shards[k]
        try:
            raw = shard.get_raw(j)
            record = canonical_record(raw, self.columns)
        except BadSample as e:
            if self.name_shards and self.shard_paths[k] not in e.detail:
                raise BadSample(e.reason, f"{self.shard_paths[k]} row {j}: {e.detail}") from e
            raise
        if isinstance(shard, TarRows):
            record["image"] = raw["__images__"]
        return record


def open_source(src: SourceConfig, cache_dir: str | None = None) -> SourceRows:
    """Open a source (a file, folder or glob of shards) as SourceRows; JSON shards are converted once into
    memory-mapped .npy files and tar shards indexed once, in `cache_dir`. An explicit column of
    `src.columns` missing from an Arrow shard is a ConfigError listing the shard's columns."""
    paths = shard_paths(src.path)
    shards = [open_shard(p, src.split, cache_dir) for p in paths]
    for p, shard in zip(paths, shards):
        if isinstance(shard, ArrowRows):
            for key, column in src.columns.as_dict().items():
                if column is not None and column not in shard.columns:
                    raise ConfigError(
                        f"data source {src.name}: columns.{key}={column!r} is not a column of {p}; "
                        f"its columns: {', '.join(shard.columns)}"
                    )
    return SourceRows(shards, [str(p) for p in paths], src.columns.as_dict(), src.path)
