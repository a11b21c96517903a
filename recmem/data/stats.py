"""Feature statistics of a split: the distinct IDs of every sparse field and how often each occurs.

Written once after data preparation (``recmem prepare`` / ``recmem generate``) under ``root/stats/``:

- ``<field>.parquet``: columns ``id`` int64, ``count`` int64, sorted by ``id``. ``MISSING_ID`` is not
  an ID: missing values are counted in the summary instead.
- ``summary.json``: ``rows``, ``positive_rate`` and per field ``distinct``, ``missing``,
  ``top10_share`` (the share of non-missing values taken by the 10 most frequent IDs).

``full`` tables build their vocabulary from :func:`load_ids`; :func:`load_counts` gives the counts
beside the IDs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recmem.config import SchemaConfig
from recmem.data.ids import MISSING_ID, sparse_arrays
from recmem.data.layout import part_files

_READ_ROWS = 65_536
_MISSING_HINT = "run `recmem prepare` (raw logs) or `recmem generate` (synthetic data) first"


class IdCounter:
    """Exact per-ID counts of a stream of ID arrays, in memory proportional to the distinct IDs.

    Each added array is reduced to its own ``(unique, counts)`` at once; those are merged into the
    running totals only when they add up to as many entries as the totals hold, so the merge cost
    stays amortised linear however many small arrays arrive.

    Args:
        merge_at: the fewest pending entries worth a merge (bounds the memory they take early on).
    """

    def __init__(self, merge_at: int = _READ_ROWS) -> None:
        self.merge_at = merge_at
        self._ids = np.zeros(0, np.int64)
        self._counts = np.zeros(0, np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_size = 0

    def add(self, ids: np.ndarray) -> None:
        """Count every value of ``ids`` [N] int64."""
        unique, counts = np.unique(ids, return_counts=True)
        self._pending.append((unique, counts.astype(np.int64)))
        self._pending_size += len(unique)
        if self._pending_size >= max(len(self._ids), self.merge_at):
            self._merge()

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids [D] int64 sorted, counts [D] int64)`` of everything added."""
        self._merge()
        return self._ids, self._counts

    def _merge(self) -> None:
        if not self._pending:
            return
        ids = np.concatenate([self._ids, *(u for u, _ in self._pending)])
        counts = np.concatenate([self._counts, *(c for _, c in self._pending)])
        self._ids, inverse = np.unique(ids, return_inverse=True)
        self._counts = np.bincount(inverse, weights=counts, minlength=len(self._ids)).astype(np.int64)
        self._pending, self._pending_size = [], 0


def write_stats(root: Path, schema: SchemaConfig, split: str = "train") -> dict:
    """Count every sparse field's IDs over ``root/split`` and write ``root/stats/``.

    Streams the split's parts in batches, so memory is bounded by the distinct IDs, not the rows.
    The old ``stats/`` is replaced only once the new one is complete.

    Args:
        root: the data root.
        schema: the label and sparse columns to count.
        split: the split to count (``train``: the IDs a model can learn).

    Returns:
        The summary, as written to ``summary.json``.
    """
    root = Path(root)
    counters = {name: IdCounter() for name in schema.sparse}
    rows, positives = 0, 0.0
    for path in part_files(root, split):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_READ_ROWS, columns=[schema.label, *schema.sparse]):
            rows += batch.num_rows
            positives += float(np.nansum(batch.column(schema.label).to_numpy(zero_copy_only=False)))
            for name, counter in counters.items():
                counter.add(sparse_arrays(batch.column(name))[0])
    tmp = root / "stats.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fields = {name: _write_field(tmp / f"{name}.parquet", *counter.result()) for name, counter in counters.items()}
    summary = {"split": split, "rows": rows, "positive_rate": positives / rows if rows else 0.0, "fields": fields}
    (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
    shutil.rmtree(root / "stats", ignore_errors=True)
    tmp.rename(root / "stats")
    return summary


def _write_field(path: Path, ids: np.ndarray, counts: np.ndarray) -> dict:
    """Write one field's ``id, count`` table (without MISSING_ID); return its summary entry."""
    is_missing = ids == MISSING_ID
    missing = int(counts[is_missing].sum())
    ids, counts = ids[~is_missing], counts[~is_missing]
    pq.write_table(pa.table({"id": ids, "count": counts}), path)
    top10 = np.sort(counts)[-10:].sum()
    return {"distinct": len(ids), "missing": missing, "top10_share": float(top10 / counts.sum()) if len(ids) else 0.0}


def load_counts(root: Path, field: str) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [D] int64 sorted, counts [D] int64)`` of ``field`` in the split the stats were written for.

    Raises:
        FileNotFoundError: no stats for ``field`` (naming the path and the command that writes them).
    """
    path = Path(root) / "stats" / f"{field}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no feature statistics for {field!r}; {_MISSING_HINT}")
    table = pq.read_table(path)
    return table.column("id").to_numpy(), table.column("count").to_numpy()


def load_ids(root: Path, field: str, min_count: int = 1) -> np.ndarray:
    """The sorted unique IDs [D'] int64 of ``field`` seen at least ``min_count`` times."""
    ids, counts = load_counts(root, field)
    return ids[counts >= min_count]


def load_summary(root: Path) -> dict:
    """The ``summary.json`` written by :func:`write_stats`.

    Raises:
        FileNotFoundError: no stats under ``root`` (naming the path and the command that writes them).
    """
    path = Path(root) / "stats" / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no feature statistics; {_MISSING_HINT}")
    return json.loads(path.read_text())
