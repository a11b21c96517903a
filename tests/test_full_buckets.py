"""Frequency-aware `full` (``options.oov_buckets``): IDs seen at least ``min_count`` times own a row,
the rest (rare and unseen IDs) land in the ``oov_buckets`` rows after the vocabulary, at the bucket
their hash picks, the same in every table built with that seed; exact memory; the config's ranges.
(Contract and export parity: ``test_tables_contract.py``, ``test_serving_bundle.py``; training and
resume: ``test_memory_kinds.py``; 2 workers: ``test_distributed_tables.py``, ``test_distributed_dmp.py``.)"""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recmem.config import ConfigError, TableConfig
from recmem.data.stats import load_counts
from recmem.serving.hashing import buckets, hash_params
from recmem.tables import build_tables
from tests.conftest import small_schema

SPARSE = small_schema().sparse
MIN_COUNT, BUCKETS, SEED = 10, 7, 5
UNSEEN = torch.arange(1, 2001, dtype=torch.int64) * 7_919_113 - 10**9  # none of the tiny data's 64-bit IDs


def _table(root, buckets_=BUCKETS, seed=SEED):
    cfg = TableConfig(kind="full", embedding_dim=4, options={"min_count": MIN_COUNT, "oov_buckets": buckets_})
    return build_tables([cfg], SPARSE, root, seed=seed).tables[0]


def _one_feature(ids: torch.Tensor, feature: int) -> KeyedJaggedTensor:
    """KJT with ``ids`` (one per bag) in ``feature`` and empty bags elsewhere."""
    lengths = torch.zeros(len(SPARSE), len(ids), dtype=torch.int32)
    lengths[feature] = 1
    return KeyedJaggedTensor.from_lengths_sync(SPARSE, ids, lengths.flatten())


def test_frequent_ids_own_rows_and_the_tail_is_hashed_into_the_buckets(tiny_root):
    table = _table(tiny_root)
    for f, name in enumerate(SPARSE):
        ids, counts = (torch.from_numpy(a.copy()) for a in load_counts(tiny_root, name))
        frequent, rare = ids[counts >= MIN_COUNT], ids[counts < MIN_COUNT]
        assert len(frequent) and len(rare), "the tiny data has both a head and a tail"
        vocab = len(frequent)
        torch.testing.assert_close(table.remap(_one_feature(frequent, f)), torch.arange(vocab))
        mult, offset = hash_params(SEED, f)
        for tail in (rare, UNSEEN):
            rows = table.remap(_one_feature(tail, f))
            assert bool(((rows >= vocab) & (rows < vocab + BUCKETS)).all())
            torch.testing.assert_close(rows, vocab + buckets(tail, mult, offset, BUCKETS))
        assert len(torch.unique(table.remap(_one_feature(UNSEEN, f)))) == BUCKETS  # the tail spreads


def test_buckets_are_deterministic_for_a_seed(tiny_root):
    first, again, other = _table(tiny_root), _table(tiny_root), _table(tiny_root, seed=SEED + 1)
    kjt = _one_feature(UNSEEN, 2)
    torch.testing.assert_close(first.remap(kjt), again.remap(kjt))
    assert not torch.equal(first.remap(kjt), other.remap(kjt))  # another table, another hash


def test_rows_and_memory_are_exact(tiny_root):
    table = _table(tiny_root)
    vocabs = [int((load_counts(tiny_root, f)[1] >= MIN_COUNT).sum()) for f in SPARSE]
    assert table.rows.rows == [v + BUCKETS for v in vocabs]
    rows = sum(v + BUCKETS for v in vocabs) * (4 + 1) * 4  # D = 4 floats and one Adagrad float per row
    assert table.memory_bytes() == rows + 8 * sum(vocabs) + 8 * 2 * len(SPARSE)  # + vocabularies, hashes
    single = _table(tiny_root, buckets_=1)
    assert single.oov_hash is None and "oov_hash" not in single.state_dict()  # one OOV row: state as before
    assert single.to_serving()[0].lookup == "keyed" and table.to_serving()[0].lookup == "composed"


def test_config_ranges(tiny_root):
    with pytest.raises(ConfigError, match="model.tables.0.options.oov_buckets: 0 is out of range"):
        build_tables([TableConfig(kind="full", options={"oov_buckets": 0})], SPARSE, tiny_root)
    with pytest.raises(ConfigError, match="model.tables.0.options.min_count: -1 is out of range"):
        build_tables([TableConfig(kind="full", options={"min_count": -1})], SPARSE, tiny_root)
