"""Replicated tables on 2 gloo processes train exactly as the single-process table on the global batch."""

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
from recmem.tables import TABLE_KINDS, build_tables
from recmem.tables.replicated import ReplicatedTable

WORLD = 2
LOCAL_BATCH = 40
BLOCKS = [  # kinds whose rows are shared between IDs: neither row- nor ID-shardable
    TableConfig(kind="qr", embedding_dim=8, feature_names=["C1"], learning_rate=0.1,
                options={"collisions": 3, "threshold": 1}),
    TableConfig(kind="multihash", embedding_dim=8, feature_names=["C2", "C3"], num_embeddings=23,
                learning_rate=0.1, options={"num_hashes": 2}),
    TableConfig(kind="mixed_dim", embedding_dim=4, feature_names=["C4"], learning_rate=0.1),  # narrow rows behind a learned projection (a dense parameter)
]


def _batches(root: Path, size: int):
    return list(iter_batches(root, "train", small_schema(), size, drop_last=True))[:4]


def _loss(pooled: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A mean over ``batch_size`` rows whose gradient differs per row and feature."""
    weights = torch.linspace(-1.0, 1.0, pooled[0].numel()).view(pooled.shape[1:])
    return (pooled.tanh() * weights).sum() / batch_size


def _build(root: Path, group=None):
    def make(kind, cfg, names, seed, data_root, where):
        table = kind.from_config(cfg, names, seed, data_root, where, output_dim=8)
        return ReplicatedTable(table, group) if group is not None else table
    return build_tables(BLOCKS, small_schema().sparse, root, seed=3, make=make, output_dim=8)


def _two_steps(tables, batches: list, batch_size: int) -> list[torch.Tensor]:
    """Two training steps, then the pooled rows of the last batch before and after the second."""
    _loss(tables(batches[0].sparse_features), batch_size).backward()
    with torch.no_grad():
        before = tables(batches[1].sparse_features)
    _loss(tables(batches[1].sparse_features), batch_size).backward()
    with torch.no_grad():
        after = tables(batches[1].sparse_features)
    return [before, after]


def _rank(rank: int, root: Path) -> dict[str, Any]:
    torch.manual_seed(100 + rank)  # replicas must not depend on each process's random state
    tables = _build(root, dist.group.WORLD)
    local = _batches(root, LOCAL_BATCH)
    mine = [local[rank], local[WORLD + rank]]  # this rank's halves of global batches 0 and 1
    before, after = _two_steps(tables, mine, LOCAL_BATCH)
    return {"before": before, "after": after, "state": tables.state_dict(),
            "grads": [p.grad for p in tables.dense_parameters()], "stats": [t.stats() for t in tables.tables]}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = write_learnable_root(tmp_path_factory.mktemp("replicated"), small_schema(), rows=800, valid=200)
    return root, run_ranks(_rank, tmp_path_factory.mktemp("ranks"), root, world=WORLD)


def test_replicas_step_as_the_single_table_on_the_global_batch(ranks):
    root, results = ranks
    whole = _build(root)
    reference = dict(zip(("before", "after"), _two_steps(whole, _batches(root, WORLD * LOCAL_BATCH), WORLD * LOCAL_BATCH)))
    assert (reference["after"] - reference["before"]).abs().max() > 1e-4  # the step moved rows
    for key in ("before", "after"):
        torch.testing.assert_close(torch.cat([r[key] for r in results]), reference[key], atol=1e-5, rtol=0)
    grads = [p.grad for p in whole.dense_parameters()]  # the projection's, summed over both steps
    assert grads and all(g is not None and g.abs().max() > 0 for g in grads)
    for result in results:  # every replica holds the global batch's gradient: no all-reduce needed
        for mine, expected in zip(result["grads"], grads, strict=True):
            torch.testing.assert_close(mine, expected, atol=1e-6, rtol=1e-5)


def test_replicas_stay_identical(ranks):
    _, (first, second) = ranks
    assert first["state"].keys() == second["state"].keys()
    for name, value in first["state"].items():
        assert torch.equal(value, second["state"][name]), name


def test_replicas_report_their_traffic(ranks):
    _, results = ranks
    for result in results:
        assert all(s["replicated_gather_bytes_per_step"] > 0 for s in result["stats"])


def test_the_replicated_kinds_are_the_ones_that_cannot_be_split():
    from recmem.tables.sharded import RowKeyedKind, ShardableKind

    unsplittable = {name for name, kind in TABLE_KINDS.items() if not isinstance(kind, (RowKeyedKind, ShardableKind))}
    assert {"qr", "multihash", "mixed_dim"} <= unsplittable
    assert not {"full", "hash", "collisionless"} & unsplittable
