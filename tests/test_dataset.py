"""iter_batches over the Parquet layout: batch sizes, order, resume, rank shares, shuffle, errors."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recmem.config import SchemaConfig
from recmem.data.dataset import iter_batches, num_batches
from recmem.data.layout import DataError, PartWriter, count_rows

SCHEMA = SchemaConfig(dense=["I1"], sparse=["C1"], event_time="event_time", true_prob=None)
ARROW_SCHEMA = pa.schema(
    [("label", pa.float32()), ("I1", pa.float32()), ("C1", pa.int64()), ("event_time", pa.int64())]
)


def _make_root(root: Path, rows: int, part_rows: int = 17, write_rows: int = 5) -> Path:
    """A train split whose event_time is the row number, in parts of 17 and row groups of <= 5 rows."""
    writer = PartWriter(root / "train", ARROW_SCHEMA, part_rows)
    for start in range(0, rows, write_rows):
        n = np.arange(start, min(start + write_rows, rows))
        writer.write({"label": (n % 2).astype(np.float32), "I1": n.astype(np.float32), "C1": n * 10, "event_time": n})
    writer.close()
    return root


def _rows(batches) -> list[list[int]]:
    return [b.event_time.tolist() for b in batches]


def test_exact_batch_sizes_in_order(tmp_path):
    root = _make_root(tmp_path, 103)
    assert count_rows(root, "train") == 103
    kept = _rows(iter_batches(root, "train", SCHEMA, 10, drop_last=False))
    assert [len(b) for b in kept] == [10] * 10 + [3]
    assert sum(kept, []) == list(range(103))
    dropped = _rows(iter_batches(root, "train", SCHEMA, 10, drop_last=True))
    assert dropped == kept[:10] and num_batches(root, "train", 10, drop_last=True) == 10
    batch = next(iter_batches(root, "train", SCHEMA, 4, drop_last=True))
    assert batch.sparse_features.values().tolist() == [0, 10, 20, 30] and batch.dense_features.shape == (4, 1)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch_size=st.integers(1, 40), world_size=st.integers(1, 4), start=st.integers(0, 12),
    drop_last=st.booleans(), seed=st.one_of(st.none(), st.integers(0, 3)),
)
def test_resume_and_rank_shares(tmp_path, batch_size, world_size, start, drop_last, seed):
    root = tmp_path / "d"
    if not root.exists():
        _make_root(root, 61)
    shares = []
    for rank in range(world_size):
        def run(start_batch: int) -> list[list[int]]:
            return _rows(iter_batches(root, "train", SCHEMA, batch_size, drop_last=drop_last, start_batch=start_batch,
                                      rank=rank, world_size=world_size, shuffle_seed=seed))

        full = run(0)
        assert run(start) == full[start:]  # resume == skip
        counted = num_batches(root, "train", batch_size, drop_last=drop_last, rank=rank, world_size=world_size)
        assert len(full) == counted
        shares.append(full)
    rows = [r for share in shares for batch in share for r in batch]
    assert len(rows) == len(set(rows))  # disjoint
    total = 61 if not drop_last else 61 // batch_size * batch_size
    assert len(rows) == total and (drop_last or sorted(rows) == list(range(61)))  # complete
    assert all(len(batch) == batch_size for share in shares for batch in share[:-1])


def test_shuffle_is_seeded_and_a_permutation(tmp_path):
    root = _make_root(tmp_path, 60)

    def order(seed):
        return sum(_rows(iter_batches(root, "train", SCHEMA, 7, drop_last=False, shuffle_seed=seed)), [])

    assert order(1) == order(1) and order(1) != order(2) and order(1) != list(range(60))
    assert sorted(order(1)) == list(range(60))


def test_missing_root_split_and_column_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="recmem prepare") as e:
        next(iter_batches(tmp_path / "nope", "train", SCHEMA, 4, drop_last=False))
    assert str(tmp_path / "nope") in str(e.value)
    root = _make_root(tmp_path / "d", 10)
    with pytest.raises(FileNotFoundError, match="valid"):
        count_rows(root, "valid")
    schema = SchemaConfig(dense=["I1", "I9"], sparse=["C1"], event_time=None, true_prob=None)
    with pytest.raises(DataError, match=r"'I9'.*") as e:
        next(iter_batches(root, "train", schema, 4, drop_last=False))
    assert "part-00000.parquet" in str(e.value)
