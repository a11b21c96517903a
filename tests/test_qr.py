"""`qr` from the paper's definitions: complementary partitions (unique (quotient, remainder) pairs over
the whole row range), exact parameter counts, per-ID composition before pooling, mixed-sign products
at initialisation, and the config's refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recmem.config import ConfigError, TableConfig
from recmem.tables import build_tables
from recmem.tables.qr import QRTable, qr_rows
from tests.conftest import small_schema, tiny_config


@pytest.mark.parametrize("rows, c", [(1, 1), (10, 3), (1001, 4), (4096, 64), (99_991, 317)])
def test_quotient_remainder_pairs_are_unique_over_the_row_range(rows, c):
    q, r = qr_rows(torch.arange(rows), c)
    assert int(q.max()) == -(-rows // c) - 1 and int(q.min()) == 0  # every quotient row is used
    assert int(r.max()) <= c - 1 and int(r.min()) == 0
    pairs = q * c + r
    assert len(torch.unique(pairs)) == rows  # complementary partitions: r -> (q, r) is one-to-one


def _table(op="mult", vocab_sizes=(1000, 10, 4097), threshold=50, c=4, oov=1, dim=8, seed=0):
    rng = np.random.default_rng(0)
    vocabs = [np.sort(rng.choice(1 << 40, size=n, replace=False)) for n in vocab_sizes]
    names = [f"C{i + 1}" for i in range(len(vocab_sizes))]
    return QRTable(names, vocabs, dim, 0.1, c, op, threshold, oov, seed), vocabs


def test_exact_parameter_counts():
    table, vocabs = _table(oov=2)
    # R = 1002 -> 251 quotient rows + 4; R = 12 <= threshold -> one full table of 12; R = 4099 -> 1025 + 4
    assert table.composed == [0, 2] and table.plain == [1]
    assert table.parts.rows == [251, 4, 1025, 4] and table.full.rows == [12]
    d = 8
    rows = (251 + 4 + 1025 + 4) * (d + 1) * 4 + 12 * (d + 1) * 4  # rows + row-wise Adagrad state
    maps = 8 * (1000 + 10 + 4097) + 8 * 2 * 3  # vocabularies + OOV hash parameters
    assert table.memory_bytes() == rows + maps
    concat, _ = _table(op="concat", dim=8)
    assert concat.storage_dim == 4 and concat.parts.embedding_dim == 4 and concat.full.embedding_dim == 8


def _bags(vocabs, bags_per_feature):
    """KJT of per-feature bags of vocabulary positions (-1: an unseen ID)."""
    values, lengths = [], []
    for vocab, bags in zip(vocabs, bags_per_feature):
        for bag in bags:
            values += [int(vocab[p]) if p >= 0 else 123456789 for p in bag]
            lengths.append(len(bag))
    names = [f"C{i + 1}" for i in range(len(vocabs))]
    return KeyedJaggedTensor.from_lengths_sync(names, torch.tensor(values, dtype=torch.int64),
                                               torch.tensor(lengths, dtype=torch.int32))


@pytest.mark.parametrize("op", ["mult", "add", "concat"])
def test_each_id_is_composed_before_its_bag_is_summed(op):
    table, vocabs = _table(op=op)
    c = table.collisions
    bags = [[[5], [5, 998], []], [[3], [1, 2], [4]], [[4096 - 7], [0, 17, 33], [-1]]]
    out = table(_bags(vocabs, bags))  # [3, 3, 8]

    def embedding(f, r):
        k = table.composed.index(f)
        q, rem = table.parts.weights(2 * k)[r // c], table.parts.weights(2 * k + 1)[r % c]
        return {"mult": q * rem, "add": q + rem, "concat": torch.cat([q, rem])}[op]

    for f in (0, 2):
        for b, bag in enumerate(bags[f]):
            rows = [p if p >= 0 else len(vocabs[f]) for p in bag]  # one OOV bucket: row n
            expected = sum((embedding(f, r) for r in rows), torch.zeros(8))
            torch.testing.assert_close(out[b, f], expected)
    full = table.full.weights(0)
    torch.testing.assert_close(out[1, 1], full[1] + full[2])


def test_initial_products_take_both_signs():
    table, _ = _table(vocab_sizes=(20_000,), threshold=0, c=16)
    q, r = table.parts.weights(0), table.parts.weights(1)  # [1251, 8], [16, 8]
    products = q[:, None, :] * r[None, :, :]
    negative = float((products < 0).float().mean())
    assert 0.4 < negative < 0.6


def test_config_errors_name_the_key(tiny_root, tmp_path):
    sparse = small_schema().sparse
    with pytest.raises(ConfigError, match=r"model.tables.0.embedding_dim: 8 gives qr \(concat\) rows of width 16"):
        build_tables([TableConfig(kind="qr", embedding_dim=8, options={"operation": "concat"})], sparse, tiny_root,
                     output_dim=8)
    concat = build_tables([TableConfig(kind="qr", embedding_dim=4, options={"operation": "concat"})], sparse,
                          tiny_root, output_dim=8)
    assert concat.embedding_dim == 8
    with pytest.raises(ConfigError, match="model.tables.0.options.collisions: 0 is out of range"):
        build_tables([TableConfig(kind="qr", options={"collisions": 0})], sparse, tiny_root)
    tiny_config(tiny_root, tmp_path, "model.tables.0.kind=qr", "ray.num_workers=2")  # replicated on each worker


@pytest.mark.parametrize("op", ["mult", "concat"])
def test_one_id_per_bag_takes_the_same_math(op):
    """The fast path (every bag one ID, as in Criteo) composes exactly as the general one."""
    table, vocabs = _table(op=op)
    bags = [[[5], [998]], [[3], [4]], [[7], [-1]]]
    fast = table(_bags(vocabs, bags))
    general = table(_bags(vocabs, [feature + [[]] for feature in bags]))[:2]  # an empty bag: general path
    torch.testing.assert_close(fast, general)
