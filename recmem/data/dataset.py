"""A split's Parquet parts as a stream of Batches: exact batch sizes, cheap resume, per-rank shares.

Rows are read in part order, row group by row group, so a split never has to fit in memory; the
reader knows every row group's size from the file footers, which is what lets a resume skip straight
to its batch without reading, let alone collating, the data before it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recmem.config import SchemaConfig
from recmem.data.batch import Batch
from recmem.data.collate import collate
from recmem.data.layout import DataError, SplitIndex, count_rows, index_split


def num_batches(root: Path, split: str, batch_size: int, *, drop_last: bool, rank: int = 0, world_size: int = 1) -> int:
    """How many batches :func:`iter_batches` yields to ``rank`` (from ``start_batch`` 0)."""
    return len(_batch_indices(count_rows(root, split), batch_size, drop_last, 0, rank, world_size))


def iter_batches(
    root: str | Path,
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
        root: the data root (a local folder or a pyarrow filesystem URI).
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
    index = index_split(root, split, schema)
    rows = index.rows
    ranges = [(i * batch_size, min((i + 1) * batch_size, rows))
              for i in _batch_indices(rows, batch_size, drop_last, start_batch, rank, world_size)]
    yield from read_ranges(index, schema, ranges, shuffle_seed)


def read_ranges(index: SplitIndex, schema: SchemaConfig, ranges: Iterable[tuple[int, int]],
                shuffle_seed: int | None = None) -> Iterator[Batch]:
    """One Batch per ``(begin, end)`` row range of the split ``index`` describes, in the order given.

    Row ``n`` is the ``n``-th of the split in reading order (part files in order, row groups in
    order), or of its shuffled order under ``shuffle_seed`` (see :func:`iter_batches`). Only the row
    groups that a range overlaps are read, each once for consecutive ranges that share it.

    Args:
        index: the split, from :func:`~recmem.data.layout.index_split`.
        schema: the column roles.
        ranges: half-open row ranges, each non-empty and within the split.
        shuffle_seed: None for the split's own order, else the seed of its shuffled order.

    Yields:
        Batches of ``end - begin`` rows each.

    Raises:
        DataError: a row group read holds a label outside [0, 1] or a NaN or infinite dense value.
    """
    order = np.arange(len(index.groups))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(index.groups))
    starts = np.concatenate([[0], np.cumsum([index.groups[g][2] for g in order])])  # [G + 1]
    reader = _GroupReader(index, schema, shuffle_seed)
    for begin, end in ranges:
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


class _GroupReader:
    """Reads one row group at a time, keeping the last one: consecutive batches mostly share it."""

    def __init__(self, index: SplitIndex, schema: SchemaConfig, shuffle_seed: int | None) -> None:
        self.index = index
        self.schema = schema
        self.shuffle_seed = shuffle_seed
        self._fs = index.filesystem()
        self._cached: tuple[int, pa.Table] | None = None
        self._file: tuple[int, pq.ParquetFile] | None = None

    def read(self, group_id: int) -> pa.Table:
        """The rows of group ``group_id`` (in its shuffled order when a seed is set)."""
        if self._cached is not None and self._cached[0] == group_id:
            return self._cached[1]
        part, group, _ = self.index.groups[group_id]
        if self._file is None or self._file[0] != part:
            self._file = (part, pq.ParquetFile(self.index.paths[part], filesystem=self._fs))
        table = self._file[1].read_row_group(group, columns=list(self.index.columns))
        self._check_values(table, part, group)
        if self.shuffle_seed is not None:
            # Seeded by (seed, group) so the permutation does not depend on which groups were skipped.
            table = table.take(np.random.default_rng([self.shuffle_seed, group_id]).permutation(table.num_rows))
        self._cached = (group_id, table)
        return table

    def _check_values(self, table: pa.Table, part: int, group: int) -> None:
        """Refuse a row group whose values :func:`bad_values` finds wrong.

        Raises:
            DataError: naming the file, the row (0-based, within the file), the column and the value.
        """
        bad = bad_values(table, self.schema)
        if bad is not None:
            row, message = bad
            before = sum(self._file[1].metadata.row_group(g).num_rows for g in range(group))
            raise DataError(f"{self.index.paths[part]}: row {before + row} (row group {group}), {message} "
                            "in this row group")


def bad_values(table: pa.Table, schema: SchemaConfig) -> tuple[int, str] | None:
    """The first row of ``table`` whose label leaves [0, 1] (or is missing) or whose dense feature holds
    NaN or infinity, as ``(row, "column ... holds ...; n such rows")``, or None when all are good: the
    loss would be garbage or NaN far from the file that caused it."""
    for name, dense in ((schema.label, False), *((d, True) for d in schema.dense)):
        column = table.column(name)
        if dense and not pa.types.is_floating(column.type):
            continue  # integers are finite
        values = column.to_numpy(zero_copy_only=False)  # nulls -> NaN
        ok = np.isfinite(values) if dense else (values >= 0) & (values <= 1)
        if dense and column.null_count:
            ok |= column.is_null().to_numpy(zero_copy_only=False)  # a missing dense value reads as 0
        if not ok.all():
            row = int(np.argmin(ok))
            what = "NaN or infinity" if dense else "a label outside [0, 1] (or missing)"
            return row, f"column {name!r} holds {values[row].item()!r}: {what}; {int((~ok).sum())} such rows"
    return None
