"""recmem's Parquet layout on disk: where a split's part files are, how they are written and counted.

A data root holds ``train/part-00000.parquet, part-00001.parquet, ...``, ``valid/part-*.parquet``
and ``stats/``, on a local disk or any pyarrow filesystem (``s3://bucket/data``). This module needs
only pyarrow, so the data preparation commands and a Ray driver can use it without importing torch
(reading Batches lives in :mod:`recmem.data.dataset`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import posixpath
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq

from recmem.config import SchemaConfig

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


@dataclass(frozen=True)
class SplitIndex:
    """Where a split's rows lie: its part files and their row groups in reading order, from the footers.

    Made without reading any data and small to pickle, so a Ray driver makes it once and every worker
    reads just its own rows from it.

    Attributes:
        root: the data root, a local folder or a pyarrow filesystem URI.
        paths: the split's part files, as paths on ``root``'s filesystem.
        groups: (index into ``paths``, row group, rows) of every row group, in reading order.
        columns: what to read: the schema's columns, plus event time and true probability when the
            first part has them.
        fingerprint: a digest of the parts' names and every row group's rows and stored bytes: it
            changes when the data is rewritten with other content (checkpoints record it, so a
            resume over changed data is noticed).
    """

    root: str
    paths: tuple[str, ...]
    groups: tuple[tuple[int, int, int], ...]
    columns: tuple[str, ...]
    fingerprint: str = ""

    @property
    def rows(self) -> int:
        """Rows in the split."""
        return sum(rows for _, _, rows in self.groups)

    def filesystem(self) -> pyarrow.fs.FileSystem:
        """The filesystem ``paths`` are on."""
        return _filesystem(self.root)[0]


def index_split(root: str | Path, split: str, schema: SchemaConfig) -> SplitIndex:
    """The :class:`SplitIndex` of ``root``'s ``split`` (local folder or filesystem URI).

    Raises:
        FileNotFoundError: the root or the split is missing.
        DataError: a part lacks a column of the schema (naming the column and the file), or lacks
            the event time / true probability column that the first part has.
    """
    fs, paths = split_files(root, split)
    first = pq.read_schema(paths[0], filesystem=fs).names
    optional = [c for c in (schema.event_time, schema.true_prob) if c is not None and c in first]
    columns = [schema.label, *schema.dense, *schema.sparse, *optional]
    groups = []
    digest = hashlib.sha256()
    for i, path in enumerate(paths):
        meta = pq.read_metadata(path, filesystem=fs)
        names = set(meta.schema.names)
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"{path}: column {missing[0]!r} of the schema is missing (columns: {sorted(names)})")
        groups.extend((i, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups))
        sizes = [(meta.row_group(g).num_rows, meta.row_group(g).total_byte_size) for g in range(meta.num_row_groups)]
        digest.update(f"{posixpath.basename(path)}:{sizes}\n".encode())
    return SplitIndex(str(root), tuple(paths), tuple(groups), tuple(columns), digest.hexdigest()[:16])


def check_trainable(splits: dict[str, SplitIndex], batch_size: int) -> None:
    """Fail before training when ``splits`` cannot give a run its steps and its validation: the
    training split holds less than one batch (``batch_size`` global rows), the validation split none.

    Raises:
        DataError: naming the split, its rows and its folder.
    """
    train, valid = splits.get("train"), splits.get("valid")
    if train is not None and train.rows < batch_size:
        raise DataError(f"{train.root}/train holds {train.rows:,} rows, less than one batch "
                        f"(data.batch_size={batch_size}): no step would train")
    if valid is not None and valid.rows == 0:
        raise DataError(f"{valid.root}/valid holds no rows: the run could not be validated")


def split_files(root: str | Path, split: str) -> tuple[pyarrow.fs.FileSystem, list[str]]:
    """The filesystem and part files of ``root``'s ``split``: :func:`part_files` for a local folder,
    the same listing through pyarrow for a filesystem URI.

    Raises:
        FileNotFoundError: the root or the split is missing.
    """
    fs, folder = _filesystem(str(root))
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        return fs, [str(p) for p in part_files(Path(folder), split)]
    infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{folder}/{split}", allow_not_found=True))
    paths = sorted(i.path for i in infos if fnmatch.fnmatch(i.base_name, PART_GLOB))
    if not paths:
        raise FileNotFoundError(f"{root}/{split}: no {PART_GLOB} files (split {split!r} missing): {_CREATE_HINT}")
    return fs, paths


def _filesystem(root: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """(filesystem, path on it) of a local folder or a filesystem URI."""
    if "://" not in root:
        return pyarrow.fs.LocalFileSystem(), root
    fs, folder = pyarrow.fs.FileSystem.from_uri(root.rstrip("/"))
    return fs, folder
