"""Row stores: LLaVA JSON/JSONL as memory-mapped JSON bytes, HF datasets as Arrow tables; `open_source` picks one.

Rows are never held as a Python list of dicts: a LLaVA JSON list or JSONL file is converted once
into one uint8 buffer of JSON bytes plus int64 row offsets (saved as .npy in the cache folder and
memory-mapped, so DataLoader workers share the page cache); HF datasets are Arrow tables, already
memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from llava_train.config import SourceConfig
from llava_train.data.errors import BadSample

HF_EXTENSIONS = {".parquet": "parquet", ".arrow": "arrow"}
HF_FOLDER_EXTENSIONS = {**HF_EXTENSIONS, ".json": "json", ".jsonl": "json"}


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


def fingerprint_path(path: Path) -> str:
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
