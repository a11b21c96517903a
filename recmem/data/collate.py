"""Columns -> :class:`~recmem.data.batch.Batch`: the one place raw columns become tensors.

Two front doors share one assembly: :func:`collate` takes Arrow (what pyarrow and Ray Data's
``batch_format="pyarrow"`` hand over), :func:`collate_numpy` takes a ``dict[str, np.ndarray]`` (Ray
Data's ``batch_format="numpy"``). Both turn every sparse column into ``(values, lengths)`` and every
other column into a flat array, then :func:`_assemble` builds the tensors. Nulls mean "missing":
a null ID becomes ``MISSING_ID``, a null dense value 0 (what the converter writes for a missing one).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recmem.config import SchemaConfig
from recmem.data.batch import Batch
from recmem.data.ids import MISSING_ID, Sparse, sparse_arrays

def collate(table: pa.Table | pa.RecordBatch, schema: SchemaConfig) -> Batch:
    """Turn B rows of Parquet columns into a Batch.

    Sparse columns may be scalar int64 (one ID per row) or ``list<int64>`` (a multi-hot bag per
    row; a null list is an empty bag). ``event_time`` and ``true_prob`` are used when the schema
    names them and the table has them.

    Args:
        table: B rows holding at least the schema's label, dense and sparse columns.
        schema: the column roles.

    Returns:
        A Batch: dense [B, n_dense] float32, KJT keyed by ``schema.sparse`` with lengths [F * B],
        labels [B] float32, event_time [B] int64 or None, true_prob [B] float32 or None.

    Raises:
        KeyError: a schema column is missing, naming it and the columns present.
    """

    def flat(name: str, dtype: type, fill: float) -> np.ndarray:
        column = _arrow_column(table, name)
        if column.null_count:
            column = pc.fill_null(column, fill)
        return column.to_numpy(zero_copy_only=False).astype(dtype)

    def sparse(name: str) -> Sparse:
        return sparse_arrays(_arrow_column(table, name))

    return _assemble(table.num_rows, schema, flat, sparse, table.column_names)


def collate_numpy(columns: dict[str, np.ndarray], schema: SchemaConfig) -> Batch:
    """The same as :func:`collate` for a dict of NumPy columns (Ray Data ``batch_format="numpy"``).

    Sparse columns may be [B] integer arrays, [B] float arrays with NaN for nulls (how Arrow nulls
    reach NumPy), [B, L] integer arrays (fixed-size bags), or [B] object arrays of ID arrays / None
    (variable bags; this last form costs a Python step per row, so prefer Arrow batches for it).
    """
    if not columns:
        raise KeyError("collate_numpy: no columns")
    rows = len(next(iter(columns.values())))

    def flat(name: str, dtype: type, fill: float) -> np.ndarray:
        values = _numpy_column(columns, name)
        if values.dtype.kind == "f":
            values = np.where(np.isnan(values), fill, values)
        return values.astype(dtype)

    def sparse(name: str) -> Sparse:
        return _sparse_from_numpy(_numpy_column(columns, name))

    return _assemble(rows, schema, flat, sparse, list(columns))


def _sparse_from_numpy(values: np.ndarray) -> Sparse:
    if values.dtype == object:
        bags = [np.zeros(0, np.int64) if bag is None else np.asarray(bag).reshape(-1) for bag in values]
        flat = np.concatenate(bags) if bags else np.zeros(0, np.int64)
        lengths = np.array([len(bag) for bag in bags], dtype=np.int32)
        values = flat
    elif values.ndim == 2:
        lengths = np.full(values.shape[0], values.shape[1], dtype=np.int32)
        values = values.reshape(-1)  # [B * L] row-major: row 0's bag, then row 1's
    else:
        lengths = np.ones(len(values), dtype=np.int32)
    if values.dtype.kind == "f":
        values = np.where(np.isnan(values), MISSING_ID, values)
    return values.astype(np.int64, copy=False), lengths


def _assemble(
    rows: int,
    schema: SchemaConfig,
    flat: Callable[[str, type, float], np.ndarray],
    sparse: Callable[[str], Sparse],
    present: list[str],
) -> Batch:
    """Build the Batch from column getters: ``flat(name, dtype, null_fill)`` and ``sparse(name)``."""
    dense = np.empty((rows, len(schema.dense)), dtype=np.float32)  # [B, n_dense]
    for j, name in enumerate(schema.dense):
        dense[:, j] = flat(name, np.float32, 0.0)
    bags = [sparse(name) for name in schema.sparse]
    # Key-major, as KJT wants: every row's C1 IDs, then every row's C2 IDs, ...
    values = np.concatenate([v for v, _ in bags]) if bags else np.zeros(0, np.int64)
    lengths = np.concatenate([n for _, n in bags]) if bags else np.zeros(0, np.int32)  # [F * B]
    kjt = KeyedJaggedTensor(
        keys=list(schema.sparse),
        values=torch.from_numpy(values),
        lengths=torch.from_numpy(lengths),
        stride=rows,
    )
    labels = flat(schema.label, np.float32, np.nan)
    if np.isnan(labels).any():
        raise ValueError(f"label column {schema.label!r} has nulls")

    def optional(name: str | None, dtype: type) -> torch.Tensor | None:
        return torch.from_numpy(flat(name, dtype, 0)) if name is not None and name in present else None

    return Batch(
        dense_features=torch.from_numpy(dense),
        sparse_features=kjt,
        labels=torch.from_numpy(labels),
        event_time=optional(schema.event_time, np.int64),
        true_prob=optional(schema.true_prob, np.float32),
    )


def _arrow_column(table: pa.Table | pa.RecordBatch, name: str) -> pa.Array | pa.ChunkedArray:
    index = table.schema.get_field_index(name)
    if index < 0:
        raise KeyError(f"column {name!r} is not in the data (columns: {table.column_names})")
    return table.column(index)


def _numpy_column(columns: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in columns:
        raise KeyError(f"column {name!r} is not in the data (columns: {sorted(columns)})")
    return np.asarray(columns[name])
