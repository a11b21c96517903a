"""`multihash` from the definitions: each ID's embedding is the sum (or concatenation) of the k rows
its k seeded hashes pick in one shared table per feature, composed before the bag is summed; the
hashes are the same in another process; k hashes tell IDs apart far better than one; exact memory;
the serving form of concat; the config's refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recmem.config import ConfigError, TableConfig
from recmem.serving.hashing import buckets, hash_params
from recmem.serving.lookup import lookup_from_tensors
from recmem.tables import build_tables
from recmem.tables.multihash import MultiHashTable
from tests.conftest import small_schema, tiny_config

NAMES = ["C1", "C2"]
IDS = torch.tensor([0, -1, 5, 2**62, -(2**63), 123456789, 42, 987654321987], dtype=torch.int64)


def _kjt(bags: list[list[list[int]]]) -> KeyedJaggedTensor:
    """Per feature, per row, a bag of raw IDs."""
    values = [i for feature in bags for bag in feature for i in bag]
    lengths = [len(bag) for feature in bags for bag in feature]
    return KeyedJaggedTensor.from_lengths_sync(NAMES, torch.tensor(values, dtype=torch.int64),
                                               torch.tensor(lengths, dtype=torch.int32))


def _embedding(table: MultiHashTable, f: int, x: int) -> torch.Tensor:
    """e(x) from the definition: the rows W[h_j(x)], j = 1..k, of hash j = hash_params(seed, f * k + j)."""
    n, k, seed = table.rows.rows[f], table.num_hashes, 3
    ids = torch.tensor([x])
    rows = [table.rows.weights(f)[int(buckets(ids, *hash_params(seed, f * k + j), n)[0])] for j in range(k)]
    return sum(rows, torch.zeros_like(rows[0])) if table.combine == "sum" else torch.cat(rows)


@pytest.mark.parametrize("combine, k", [("sum", 1), ("sum", 3), ("concat", 2), ("concat", 4)])
def test_each_id_combines_its_k_rows_before_the_bag_is_summed(combine, k):
    table = MultiHashTable(NAMES, [13, 7], 16, 0.1, num_hashes=k, combine=combine, seed=3)
    bags = [[[5], [5, 42, 5], [], [-1]], [[0], [], [2**62, -(2**63)], [123456789]]]
    out = table(_kjt(bags))  # [4, 2, 16]
    assert out.shape == (4, 2, 16)
    for f in range(2):
        for b, bag in enumerate(bags[f]):
            expected = sum((_embedding(table, f, x) for x in bag), torch.zeros(16))
            torch.testing.assert_close(out[b, f], expected)


def test_hashes_are_the_same_in_another_process():
    table = MultiHashTable(NAMES, [1000, 17], 4, 0.1, num_hashes=3, seed=11)
    here = table.slots(_kjt([[IDS.tolist()], [IDS.tolist()]])).tolist()
    script = f"""
import json, torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from recmem.tables.multihash import MultiHashTable
ids = {IDS.tolist()!r}
kjt = KeyedJaggedTensor.from_lengths_sync({NAMES!r}, torch.tensor(ids + ids), torch.tensor([len(ids)] * 2))
print(json.dumps(MultiHashTable({NAMES!r}, [1000, 17], 4, 0.1, num_hashes=3, seed=11).slots(kjt).tolist()))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert json.loads(done.stdout.strip().splitlines()[-1]) == here


def test_k_hashes_tell_ids_apart_where_one_hash_collides():
    """2000 IDs in 1000 rows: about 1000 share their one hashed row, but under 3 hashes nearly all
    have a row triple of their own (a pair shares all three with probability 1e-9)."""
    table = MultiHashTable(["C1"], [1000], 4, 0.1, num_hashes=3, seed=0)
    ids = torch.arange(2000, dtype=torch.int64) * 1_000_003
    slots = table.slots(KeyedJaggedTensor.from_lengths_sync(["C1"], ids, torch.ones(2000, dtype=torch.int32)))
    assert not torch.equal(slots[:, 0], slots[:, 1]) and not torch.equal(slots[:, 1], slots[:, 2])
    one = len(ids) - len(torch.unique(slots[:, 0]))
    triples = len(ids) - len(torch.unique(slots, dim=0))
    assert one > 500 and triples <= 2


def test_exact_memory_and_rows(tiny_root):
    table = MultiHashTable(NAMES, [13, 7], 8, 0.1, num_hashes=2, combine="concat")
    assert table.storage_dim == 4 and table.embedding_dim == 8
    assert table.memory_bytes() == (13 + 7) * (4 + 1) * 4 + 2 * 2 * 2 * 8  # rows + Adagrad, hash params
    from recmem.data.stats import load_ids

    sparse = small_schema().sparse
    cfg = TableConfig(kind="multihash", embedding_dim=8, options={"num_hashes": 2, "compression": 4})
    built = build_tables([cfg], sparse, tiny_root).tables[0]
    assert built.rows.rows == [-(-len(load_ids(tiny_root, f)) // 4) for f in sparse]


def test_concat_serving_form_answers_as_the_table():
    table = MultiHashTable(NAMES, [13, 7], 8, 0.1, num_hashes=2, combine="concat", seed=5)
    bags = [[[5], [5, 42, 5], [], [-1]], [[0], [], [2**62, -(2**63)], [123456789]]]
    table(_kjt(bags)).sum().backward()
    expected = table(_kjt(bags))
    for f, form in enumerate(table.to_serving()):
        lookup = lookup_from_tensors(form.lookup, form.tensors)
        values = torch.tensor([x for bag in bags[f] for x in bag], dtype=torch.int64)
        lengths = torch.tensor([len(bag) for bag in bags[f]])
        torch.testing.assert_close(lookup(values, lengths), expected[:, f], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="a multiple of 4"):
        MultiHashTable(NAMES, [13, 7], 8, 0.1, num_hashes=4, combine="concat")
    with pytest.raises(ValueError, match="params"):
        lookup_from_tensors("multihash", {**form.tensors, "params": form.tensors["params"][:3]})


def test_config_errors_name_the_key(tiny_root, tmp_path):
    sparse = small_schema().sparse
    with pytest.raises(ConfigError, match="model.tables.0.num_embeddings: a multihash table needs either"):
        build_tables([TableConfig(kind="multihash")], sparse, tiny_root)
    with pytest.raises(ConfigError, match="exactly one"):
        build_tables([TableConfig(kind="multihash", num_embeddings=9, options={"compression": 2})], sparse, tiny_root)
    with pytest.raises(ConfigError, match=r"model.tables.0.embedding_dim: 8 gives multihash \(concat of 2\) rows "
                                          r"of width 16"):
        build_tables([TableConfig(kind="multihash", embedding_dim=8, num_embeddings=9,
                                  options={"combine": "concat"})], sparse, tiny_root, output_dim=8)
    with pytest.raises(ConfigError, match="model.tables.0.options.num_hashes: 0 is out of range"):
        build_tables([TableConfig(kind="multihash", num_embeddings=9, options={"num_hashes": 0})], sparse, tiny_root)
    tiny_config(tiny_root, tmp_path, "model.tables.0.kind=multihash", "model.tables.0.num_embeddings=9",
                "ray.num_workers=2")  # replicated on each worker
