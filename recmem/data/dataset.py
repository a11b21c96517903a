"""A split's Parquet parts as a stream of Batches: exact batch sizes, cheap resume, per-rank shares.

Rows are read in part order, row group by row group, so a split never has to fit in memory; the
reader knows every row group's size from the file footers, which is what lets a resume skip straight
to its batch without reading, let alone collating, the data before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recmem.config import SchemaConfig
from recmem.data.batch import Batch
from recmem.data.collate import collate
from recmem.data.layout import DataError, count_rows, part_files


def num_batches(root: Path, split: str, batch_size: int, *, drop_last: bool, rank: int = 0, world_size: int = 1) -> int:
    """How many batches :func:`iter_batches` yields to ``rank`` (from ``start_batch`` 0)."""
    return len(_batch_indices(count_rows(root, split), batch_size, drop_last, 0, rank, world_size))


def iter_batches(
    root: Path,
    split: str,
    schema: SchemaConfig,
    batch_size: int,
    *,
    drop_last: bool,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle_seed: int | None = None,
) -> Iterator[Batch]:
    """Stream a split as Batches of exactly ``batch_size`` rows (the last may be short unless ``drop_last``).

    The split is one sequence of batches; batch ``i`` goes to rank ``i % world_size``, so ranks get
    disjoint shares that together cover it (their counts differ by at most one).

    Args:
        root: the data root.
        split: ``"train"`` or ``"valid"``.
        schema: the column roles.
        batch_size: rows per batch (B).
        drop_last: drop a final batch shorter than ``batch_size``.
        start_batch: how many of *this rank's* batches to skip: a rank resuming after ``k`` steps
            passes ``k`` and gets exactly the batches it would have seen next. Skipped row groups
            are never read.
        rank: this worker's index in ``[0, world_size)``.
        world_size: number of workers sharing the split.
        shuffle_seed: None keeps the log's time order (what time-aware training and evaluation
            want). An int shuffles the order of row groups and the rows inside each, determined by
            the seed alone, so a resume with the same seed sees the same order.

    Yields:
        Batches with dense [B, n_dense], a KJT of B rows per key, labels [B].

    Raises:
        FileNotFoundError: the root or split is missing.
        DataError: a part lacks a schema column (naming the column and the file).
    """
    if batch_size < 1 or not 0 <= rank < world_size or start_batch < 0:
        raise ValueError(f"need batch_size >= 1, 0 <= rank < world_size, start_batch >= 0; got "
                         f"{batch_size=}, {rank=}, {world_size=}, {start_batch=}")
    groups, columns = _row_groups(part_files(root, split), schema)
    order = np.arange(len(groups))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(groups))
    starts = np.concatenate([[0], np.cumsum([groups[g].rows for g in order])])  # [G + 1]
    reader = _GroupReader(groups, columns, shuffle_seed)
    for index in _batch_indices(int(starts[-1]), batch_size, drop_last, start_batch, rank, world_size):
        begin, end = index * batch_size, min((index + 1) * batch_size, int(starts[-1]))
        pieces = []
        position = int(np.searchsorted(starts, begin, side="right")) - 1
        while begin < end:
            table = reader.read(int(order[position]))
            offset = begin - int(starts[position])
            take = min(end - begin, table.num_rows - offset)
            pieces.append(table.slice(offset, take))
            begin += take
            position += 1
        yield collate(pieces[0] if len(pieces) == 1 else pa.concat_tables(pieces), schema)


def _batch_indices(rows: int, batch_size: int, drop_last: bool, start_batch: int, rank: int, world_size: int) -> range:
    """Global indices of the batches ``rank`` reads, after skipping ``start_batch`` of them."""
    total = rows // batch_size if drop_last else -(-rows // batch_size)
    return range(rank + start_batch * world_size, total, world_size)


@dataclass(frozen=True)
class _RowGroup:
    path: Path
    index: int
    rows: int


def _row_groups(files: list[Path], schema: SchemaConfig) -> tuple[list[_RowGroup], list[str]]:
    """Every row group of the split in file order, and the columns to read (checked in every file).

    ``event_time`` / ``true_prob`` are read when the first part has them; then every part must.
    """
    first = pq.read_schema(files[0]).names
    optional = [c for c in (schema.event_time, schema.true_prob) if c is not None and c in first]
    columns = [schema.label, *schema.dense, *schema.sparse, *optional]
    groups = []
    for path in files:
        meta = pq.read_metadata(path)
        names = set(meta.schema.names)
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"{path}: column {missing[0]!r} of the schema is missing (columns: {sorted(names)})")
        groups.extend(_RowGroup(path, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups))
    return groups, columns


class _GroupReader:
    """Reads one row group at a time, keeping the last one: consecutive batches mostly share it."""

    def __init__(self, groups: list[_RowGroup], columns: list[str], shuffle_seed: int | None) -> None:
        self.groups = groups
        self.columns = columns
        self.shuffle_seed = shuffle_seed
        self._cached: tuple[int, pa.Table] | None = None
        self._file: tuple[Path, pq.ParquetFile] | None = None

    def read(self, group_id: int) -> pa.Table:
        """The rows of group ``group_id`` (in its shuffled order when a seed is set)."""
        if self._cached is not None and self._cached[0] == group_id:
            return self._cached[1]
        group = self.groups[group_id]
        if self._file is None or self._file[0] != group.path:
            self._file = (group.path, pq.ParquetFile(group.path))
        table = self._file[1].read_row_group(group.index, columns=self.columns)
        if self.shuffle_seed is not None:
            # Seeded by (seed, group) so the permutation does not depend on which groups were skipped.
            table = table.take(np.random.default_rng([self.shuffle_seed, group_id]).permutation(table.num_rows))
        self._cached = (group_id, table)
        return table
