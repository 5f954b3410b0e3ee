"""Parquet, Arrow IPC and `save_to_disk` shards as random-access rows of plain values (`data.rows` opens them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llava_train.config_io import ConfigError


class ArrowRows:
    """Rows of an Arrow table, read as plain values: HF `Image` columns come back as `{"bytes", "path"}` structs
    and are never decoded here (`data.images.image_ref` reads them).

    kind: `parquet` (random access by row group, from the footer's row counts; the last row group read is
    kept, so a sequential scan reads each once), `arrow` (an Arrow IPC file or stream, memory-mapped) or
    `hf_disk` (a `save_to_disk` folder, memory-mapped by `datasets`). The table opens lazily, so DataLoader
    workers and scan processes receive only the path, and `close` lets go of it (a file descriptor each).
    """

    def __init__(self, path: str, kind: str, split: str = "train") -> None:
        self.path, self.kind, self.split = path, kind, split
        self._table: Any = None
        self._group: tuple[int, Any] | None = None
        self._source: Any = None  # the memory map of an arrow file
        self._open()
        table = self._table
        schema = table.schema_arrow if kind == "parquet" else table.schema if kind == "arrow" else None
        self.columns: list[str] = list(table.column_names if schema is None else schema.names)
        self._length = table.metadata.num_rows if kind == "parquet" else table.num_rows
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_table": None, "_group": None, "_source": None}

    def close(self) -> None:
        """Let go of the open file (reopened on the next row)."""
        if self.kind == "parquet" and self._table is not None:
            self._table.close()
        if self._source is not None:
            self._source.close()
        self._table = self._group = self._source = None

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
                self._source = pa.memory_map(self.path)
                try:
                    self._table = pa.ipc.open_file(self._source).read_all()
                except pa.ArrowInvalid:  # datasets writes the IPC stream format
                    self._source.seek(0)
                    self._table = pa.ipc.open_stream(self._source).read_all()
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
            raise ConfigError(f"split {split!r} not in {path}; available: {', '.join(ds)}")
        ds = ds[split]
    # The arrow format gives each row's stored values (image bytes, not PIL) and honours select/shuffle indices.
    return ds.with_format("arrow")
