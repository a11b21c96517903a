"""ID-sharded tables on 2 gloo processes equal the unsharded tables: initial rows, forward, one step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.conftest import small_schema, write_learnable_root
from tests.ranks import run_ranks
from recmem.config import TableConfig
from recmem.data.dataset import iter_batches
from recmem.tables import build_tables
from recmem.tables.fused import FusedRowwiseAdagrad
from recmem.tables.sharded import RowShard, build_sharded_tables

WORLD = 2
LOCAL_BATCH = 48
BLOCKS = [
    TableConfig(kind="full", embedding_dim=8, feature_names=["C1"], learning_rate=0.1),
    # frequency-aware: the rarer IDs (and unseen ones) share 5 hashed rows, routed alike on every rank
    TableConfig(kind="full", embedding_dim=8, feature_names=["C2"], learning_rate=0.1,
                options={"min_count": 3, "oov_buckets": 5}),
    TableConfig(kind="hash", embedding_dim=8, feature_names=["C3", "C4"], num_embeddings=37, learning_rate=0.1),
]


@pytest.mark.parametrize("rows,world", [([5, 130_001], 3), ([2, 9], 4), ([70_000], 2)])
def test_row_shards_start_from_the_unsharded_rows(rows, world):
    whole = FusedRowwiseAdagrad(rows, 4, 0.1, seed=7)
    shards = [RowShard([f"f{t}" for t in range(len(rows))], rows, 4, 0.1, 7, r, world) for r in range(world)]
    for t, n in enumerate(rows):
        for r, shard in enumerate(shards):
            mine = whole.weights(t)[r::world]
            assert torch.equal(shard.rows.weights(t)[: len(mine)], mine)


def _batches(root: Path, size: int):
    """The first batches of ``size`` rows: global batch s holds local batches 2s and 2s + 1."""
    return list(iter_batches(root, "train", small_schema(), size, drop_last=True))[:4]


def _loss(pooled: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A loss whose gradient differs per row and feature: a mean over ``batch_size`` rows."""
    weights = torch.linspace(-1.0, 1.0, pooled[0].numel()).view(pooled.shape[1:])  # [F, D]
    return (pooled.tanh() * weights).sum() / batch_size


def _unsharded(root: Path) -> dict[str, torch.Tensor]:
    """Train the unsharded tables one step on global batch 0, then record outputs and rows."""
    tables = build_tables(BLOCKS, small_schema().sparse, root, seed=3)
    first, second = _batches(root, WORLD * LOCAL_BATCH)[:2]
    _loss(tables(first.sparse_features), len(first)).backward()
    with torch.no_grad():
        before = tables(second.sparse_features)
    _loss(tables(second.sparse_features), len(second)).backward()
    with torch.no_grad():
        after = tables(second.sparse_features)
    return {"before": before, "after": after, "tables": tables}


def _rank(rank: int, root: Path) -> dict[str, Any]:
    """One rank: build sharded tables, load the unsharded rows after step 1, run step 2."""
    reference = build_tables(BLOCKS, small_schema().sparse, root, seed=3)
    sharded = build_sharded_tables(BLOCKS, small_schema().sparse, root, seed=3, group=dist.group.WORLD)
    initial = sharded(_batches(root, LOCAL_BATCH)[rank].sparse_features)
    first = _batches(root, WORLD * LOCAL_BATCH)[0]
    _loss(reference(first.sparse_features), len(first)).backward()
    for ref, table in zip(reference.tables, sharded.tables):
        for t in range(len(ref.feature_names)):
            table.shard.load_global(t, ref.rows.weights(t), ref.rows.momentum(t))
    local = _batches(root, LOCAL_BATCH)[WORLD + rank]  # this rank's half of global batch 1
    with torch.no_grad():
        before = sharded(local.sparse_features)
    _loss(sharded(local.sparse_features), LOCAL_BATCH).backward()  # a mean over this rank's rows, as in training
    with torch.no_grad():
        after = sharded(local.sparse_features)
    return {"initial": initial, "before": before, "after": after, "stats": [t.stats() for t in sharded.tables]}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = write_learnable_root(tmp_path_factory.mktemp("sharded"), small_schema(), rows=1000, valid=200)
    out = tmp_path_factory.mktemp("ranks")
    return root, run_ranks(_rank, out, root, world=WORLD)


def test_sharded_forward_equals_unsharded_from_the_same_start(ranks):
    root, results = ranks
    tables = build_tables(BLOCKS, small_schema().sparse, root, seed=3)
    with torch.no_grad():
        whole = tables(_batches(root, WORLD * LOCAL_BATCH)[0].sparse_features)  # [2b, F, D]
    for r, result in enumerate(results):
        torch.testing.assert_close(result["initial"], whole[r * LOCAL_BATCH : (r + 1) * LOCAL_BATCH],
                                   atol=1e-6, rtol=0)


def test_sharded_forward_and_step_equal_unsharded_for_the_same_weights(ranks):
    root, results = ranks
    reference = _unsharded(root)
    for key in ("before", "after"):
        sharded = torch.cat([result[key] for result in results])  # [2b, F, D]
        assert (reference["after"] - reference["before"]).abs().max() > 1e-4  # the step moved rows
        torch.testing.assert_close(sharded, reference[key], atol=1e-5, rtol=0)


def test_sharded_tables_report_their_traffic(ranks):
    _, results = ranks
    for result in results:
        assert all(s["alltoall_bytes_per_step"] > 0 for s in result["stats"])
