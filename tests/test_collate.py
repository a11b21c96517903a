"""collate / collate_numpy: shapes, dtypes, key-major KJT values, nulls -> MISSING_ID, bags."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from recmem.config import SchemaConfig
from recmem.data.collate import collate, collate_numpy
from recmem.data.ids import MISSING_ID

SCHEMA = SchemaConfig(dense=["I1", "I2"], sparse=["C1", "C2"], event_time="event_time", true_prob="true_prob")


def _table() -> pa.Table:
    return pa.table({
        "label": pa.array([1.0, 0.0, 1.0], pa.float32()),
        "I1": pa.array([0.5, None, 2.0], pa.float32()),
        "I2": pa.array([1.0, 2.0, 3.0], pa.float32()),
        "C1": pa.array([10, None, 30], pa.int64()),
        "C2": pa.array([7, 8, None], pa.int64()),
        "event_time": pa.array([100, 200, 300], pa.int64()),
    })


def test_scalar_columns_shapes_values_and_nulls():
    batch = collate(_table(), SCHEMA)
    assert len(batch) == 3
    assert batch.dense_features.dtype == torch.float32 and batch.dense_features.shape == (3, 2)
    assert batch.dense_features.tolist() == [[0.5, 1.0], [0.0, 2.0], [2.0, 3.0]]
    kjt = batch.sparse_features
    assert kjt.keys() == ["C1", "C2"] and kjt.stride() == 3
    assert kjt.values().dtype == torch.int64
    assert kjt.values().tolist() == [10, MISSING_ID, 30, 7, 8, MISSING_ID]  # key-major
    assert kjt.lengths().tolist() == [1] * 6
    assert batch.labels.dtype == torch.float32 and batch.labels.tolist() == [1.0, 0.0, 1.0]
    assert batch.event_time.dtype == torch.int64 and batch.event_time.tolist() == [100, 200, 300]
    assert batch.true_prob is None  # named by the schema, absent from the data


def test_record_batch_and_optional_columns_off():
    schema = SchemaConfig(dense=["I1", "I2"], sparse=["C1", "C2"], event_time=None, true_prob=None)
    batch = collate(_table().to_batches()[0], schema)
    assert batch.event_time is None and batch.sparse_features.values().tolist()[:3] == [10, MISSING_ID, 30]


def test_multi_hot_list_columns():
    table = _table().set_column(4, "C2", pa.array([[1, 2], None, [3, None, 5]], pa.list_(pa.int64())))
    kjt = collate(table, SCHEMA).sparse_features
    assert kjt.lengths().tolist() == [1, 1, 1, 2, 0, 3]
    assert kjt["C2"].values().tolist() == [1, 2, 3, MISSING_ID, 5]
    assert kjt["C1"].values().tolist() == [10, MISSING_ID, 30]


def test_numpy_columns_give_the_same_batch():
    table = _table()
    numpy_columns = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}
    assert numpy_columns["C1"].dtype.kind == "f"  # nulls reach NumPy as NaN floats
    want, got = collate(table, SCHEMA), collate_numpy(numpy_columns, SCHEMA)
    for name in ("dense_features", "labels", "event_time"):
        assert torch.equal(getattr(want, name), getattr(got, name)), name
    assert torch.equal(want.sparse_features.values(), got.sparse_features.values())
    assert torch.equal(want.sparse_features.lengths(), got.sparse_features.lengths())


def test_numpy_bags_fixed_and_ragged():
    base = {"label": np.zeros(2, np.float32), "I1": np.ones(2, np.float32), "I2": np.ones(2, np.float32)}
    bags = np.empty(2, dtype=object)
    bags[:] = [np.array([4, 5, 6]), None]
    batch = collate_numpy({**base, "C1": np.array([[1, 2], [3, 4]]), "C2": bags}, SCHEMA)
    assert batch.sparse_features.lengths().tolist() == [2, 2, 3, 0]
    assert batch.sparse_features.values().tolist() == [1, 2, 3, 4, 4, 5, 6]


def test_missing_column_and_null_label_are_errors():
    with pytest.raises(KeyError, match="'C2'"):
        collate(_table().drop_columns(["C2"]), SCHEMA)
    with pytest.raises(KeyError, match="'I1'"):
        collate_numpy({"label": np.zeros(1)}, SCHEMA)
    with pytest.raises(ValueError, match="nulls"):
        collate(_table().set_column(0, "label", pa.array([1.0, None, 0.0], pa.float32())), SCHEMA)
