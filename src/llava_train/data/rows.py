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
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from llava_train.config import SourceConfig
from llava_train.config_io import ConfigError
from llava_train.data.arrow_rows import ArrowRows
from llava_train.data.errors import BadSample, DataFileError
from llava_train.data.tar_rows import TarRows
from llava_train.llava_format import canonical_record

JSON_ARRAYS = ("buf.npy", "offsets.npy", "lines.npy")
# Shards of a source kept open at once (memory maps, parquet files): the rest are closed and reopened on use.
MAX_OPEN_SHARDS = 64


class JsonRows:
    """Rows as JSON bytes in one uint8 buffer + int64 offsets (row i = buf[off[i]:off[i+1]]).

    `lines` holds each row's 1-based line number in its file (0 for rows of a JSON list), used in
    `malformed_json` details. Malformed JSONL lines are kept as raw bytes so that row numbers stay
    aligned with the file; `get_raw` raises BadSample for them. With `folder` (the cache's .npy files) the
    arrays are memory-mapped on first use and let go by `close` (each map holds a file descriptor: thousands
    of open shards would exhaust `ulimit -n`).
    """

    def __init__(self, arrays: tuple[np.ndarray, ...] | None, path: str, folder: str | None = None) -> None:
        self.path, self.folder = path, folder
        self._arrays = arrays
        self._length = len(self._open()[1]) - 1
        self.close()

    def _open(self) -> tuple[np.ndarray, ...]:
        if self._arrays is None:
            self._arrays = tuple(np.load(Path(self.folder or "") / n, mmap_mode="r") for n in JSON_ARRAYS)
        return self._arrays

    def close(self) -> None:
        """Let go of the memory maps (reopened on the next row); in-memory arrays stay."""
        if self.folder is not None:
            self._arrays = None

    @property
    def buf(self) -> np.ndarray:
        return self._open()[0]

    @property
    def offsets(self) -> np.ndarray:
        return self._open()[1]

    @property
    def lines(self) -> np.ndarray:
        return self._open()[2]

    def __len__(self) -> int:
        return self._length

    def __getstate__(self) -> dict[str, Any]:
        # Memory-mapped arrays travel to scan processes as the folder's name, not as copies of the data.
        return {**self.__dict__, "_arrays": None} if self.folder is not None else dict(self.__dict__)

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
    if data.startswith(UTF8_BOM):  # written by Windows tools; json reads it as garbage before the first row
        data = data[len(UTF8_BOM) :]
    head = data.lstrip()[:1]
    chunks: list[bytes] = []
    lines: list[int] = []
    if path.suffix == ".json" and head == b"{":
        single = _single_object(data)
        if single is not None:  # a .json holding one record, not JSONL
            return _arrays([single], [0])
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
    return _arrays(chunks, lines)


def _arrays(chunks: list[bytes], lines: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum([len(c) for c in chunks], out=offsets[1:])
    buf = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    return buf, offsets, np.asarray(lines, dtype=np.int64)


def _single_object(data: bytes) -> bytes | None:
    """The bytes of a file holding exactly one JSON object, else None (JSONL: "Extra data" after the first line,
    found without reading further)."""
    try:
        record = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return data.strip() if isinstance(record, dict) else None


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
        return JsonRows(_read_json_rows(path), str(path))
    folder = Path(cache_dir) / f"rows-{fingerprint_path(path.resolve())}"
    names = JSON_ARRAYS
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
    return JsonRows(None, str(path), str(folder))


UTF8_BOM = b"\xef\xbb\xbf"
COMPRESSED_SUFFIXES = (".gz", ".tgz", ".bz2", ".xz", ".zst", ".zip", ".7z")
SHARD_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow", ".tar")
HF_DISK_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
Shard = JsonRows | ArrowRows | TarRows


def _is_hf_disk(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in HF_DISK_FILES)


def _refuse_compressed(path: str, compressed: list[str]) -> None:
    """Compressed files of a source are never skipped silently (their rows would vanish): DataFileError."""
    if compressed:
        more = f" and {len(compressed) - 3} more" if len(compressed) > 3 else ""
        raise DataFileError(
            f"{path} holds compressed shards ({', '.join(compressed[:3])}{more}): decompress them, or move them out"
        )


def shard_paths(path: str) -> list[Path]:
    """The shard files of a source path: the file itself, a save_to_disk folder (one shard), every
    .json/.jsonl/.parquet/.arrow/.tar file below a folder, or a glob's matches, sorted by path.
    FileNotFoundError when there is nothing to read."""
    p = Path(path)
    if any(c in path for c in "*?["):
        matches = sorted(Path(m) for m in glob.glob(path, recursive=True))
        _refuse_compressed(path, [str(m) for m in matches if m.name.lower().endswith(COMPRESSED_SUFFIXES)])
        files = [m for m in matches if (m.is_file() and m.suffix in SHARD_SUFFIXES) or _is_hf_disk(m)]
        if not files:
            raise FileNotFoundError(f"no {'/'.join(SHARD_SUFFIXES)} shards match {path}")
        return files
    if not p.exists():
        raise FileNotFoundError(f"data source not found: {path}")
    if p.is_file() or _is_hf_disk(p):
        return [p]
    _refuse_compressed(path, sorted(str(f) for f in p.rglob("*") if f.name.lower().endswith(COMPRESSED_SUFFIXES)))
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SHARD_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no {'/'.join(SHARD_SUFFIXES)} shards (and no save_to_disk dataset) in {path}")
    return files


def open_shard(path: Path, split: str, cache_dir: str | None) -> Shard:
    """One shard file (or save_to_disk folder) as a row store, by its suffix; a compressed file is DataFileError
    (it would read as garbage JSON lines)."""
    if path.name.lower().endswith(COMPRESSED_SUFFIXES):
        raise DataFileError(f"{path} is compressed: decompress it (tar shards must be plain .tar files)")
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
        self._recent: OrderedDict[int, None] = OrderedDict()  # shards possibly open, least recently used first

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
        view.name_shards, view._recent = self.name_shards, OrderedDict()
        return view

    def close(self) -> None:
        """Close every shard (they reopen on use)."""
        for shard in self.shards:
            shard.close()
        self._recent.clear()

    def _use(self, k: int) -> None:
        """Mark shard k used; close the least recently used beyond MAX_OPEN_SHARDS (bounded open files)."""
        self._recent[k] = None
        self._recent.move_to_end(k)
        if len(self._recent) > MAX_OPEN_SHARDS:
            old, _ = self._recent.popitem(last=False)
            self.shards[old].close()

    def locate(self, i: int) -> tuple[int, int]:
        """(shard, row in the shard) of row i."""
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return k, int(i - self.starts[k])

    def get(self, i: int) -> dict[str, Any]:
        """Row i as a LLaVA record; BadSample (malformed_json) for an unreadable row, naming its shard when the
        source has several."""
        k, j = self.locate(i)
        shard = self.shards[k]
        self._use(k)
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
    shards = [_open_or_explain(p, src, cache_dir) for p in paths]
    for p, shard in zip(paths, shards):
        if isinstance(shard, ArrowRows):
            for key, column in src.columns.as_dict().items():
                if column is not None and column not in shard.columns:
                    raise ConfigError(
                        f"data source {src.name}: columns.{key}={column!r} is not a column of {p}; "
                        f"its columns: {', '.join(shard.columns)}"
                    )
    rows = SourceRows(shards, [str(p) for p in paths], src.columns.as_dict(), src.path)
    if len(rows) == 0:
        raise DataFileError(f"data source {src.name}: {src.path} holds no rows ({len(paths)} shard(s) read)")
    return rows


def _open_or_explain(path: Path, src: SourceConfig, cache_dir: str | None) -> Shard:
    """open_shard, a file that cannot be read at all being DataFileError (one line naming it), not a traceback."""
    try:
        return open_shard(path, src.split, cache_dir)
    except (ConfigError, DataFileError):
        raise
    except Exception as e:
        kind = "save_to_disk folder" if _is_hf_disk(path) else f"{path.suffix or 'unknown'} shard"
        detail = " ".join(str(e).split())[:300]
        raise DataFileError(
            f"data source {src.name}: cannot read {kind} {path}: {type(e).__name__}: {detail} (fix or remove the file)"
        ) from e
