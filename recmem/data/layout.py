"""recmem's Parquet layout on disk: where a split's part files are, how they are written and counted.

A data root holds ``train/part-00000.parquet, part-00001.parquet, ...``, ``valid/part-*.parquet``
and ``stats/``. This module needs only pyarrow, so the data preparation commands and a Ray driver can
use it without importing torch (reading Batches lives in :mod:`recmem.data.dataset`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PART_GLOB = "part-*.parquet"
_CREATE_HINT = (
    "create it with `recmem prepare --config ...` (raw logs) or `recmem generate --config ...` (synthetic data)"
)


class DataError(ValueError):
    """Parquet data that does not match the schema: the message names the file and the column."""


class PartWriter:
    """Writes one split directory as ``part-00000.parquet, ...`` of at most ``part_rows`` rows each.

    Each :meth:`write` call becomes (at least) one row group. The first part is created at once,
    so a split with no rows is still a readable, empty split.

    Args:
        directory: the split directory (created).
        schema: the Arrow schema of every part.
        part_rows: the most rows one part file holds.
    """

    def __init__(self, directory: Path, schema: pa.Schema, part_rows: int) -> None:
        if part_rows < 1:
            raise ValueError(f"part_rows must be >= 1, got {part_rows}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.part_rows = part_rows
        self.rows = 0
        self._parts = 0
        self._in_part = 0
        self._writer = self._next_part()

    def write(self, columns: dict[str, np.ndarray] | pa.Table) -> None:
        """Append rows: a table with the writer's schema, or a dict of equal-length columns."""
        table = columns if isinstance(columns, pa.Table) else pa.table(columns, schema=self.schema)
        while table.num_rows:
            if self._in_part == self.part_rows:
                self._writer.close()
                self._writer = self._next_part()
            piece = table.slice(0, self.part_rows - self._in_part)
            self._writer.write_table(piece)
            self._in_part += piece.num_rows
            self.rows += piece.num_rows
            table = table.slice(piece.num_rows)

    def close(self) -> int:
        """Finish the last part; returns the rows written."""
        self._writer.close()
        return self.rows

    def _next_part(self) -> pq.ParquetWriter:
        path = self.directory / f"part-{self._parts:05d}.parquet"
        self._parts += 1
        self._in_part = 0
        return pq.ParquetWriter(path, self.schema)


def part_files(root: Path, split: str) -> list[Path]:
    """The split's part files in order.

    Raises:
        FileNotFoundError: the root or the split is missing, saying which path and what creates it.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist: {_CREATE_HINT}")
    files = sorted((root / split).glob(PART_GLOB))
    if not files:
        raise FileNotFoundError(f"{root / split}: no {PART_GLOB} files (split {split!r} missing): {_CREATE_HINT}")
    return files


def count_rows(root: Path, split: str) -> int:
    """Rows in a split, from the Parquet footers (no data read)."""
    return sum(pq.read_metadata(path).num_rows for path in part_files(root, split))


