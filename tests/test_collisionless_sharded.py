"""A collisionless table sharded by ID over 2 gloo processes trains like the unsharded table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recmem.config import TableConfig
from recmem.tables.collisionless import CollisionlessTable, IdRouter
from recmem.tables.sharded import sharded_table
from tests.ranks import run_ranks

WORLD, LOCAL, NAMES = 2, 8, ["C1", "C2"]
BLOCK = TableConfig(kind="collisionless", embedding_dim=4, learning_rate=0.1,
                    options={"capacity": 64, "initial_rows": 4, "ttl": 100})


def _bags(step: int) -> list[list[list[int]]]:
    """Per feature, the WORLD * LOCAL bags of global batch ``step`` (IDs repeat across and within bags)."""
    rng = np.random.default_rng(step)
    pool = np.array([-(2**63), -1, 0, 5, 2**40, 77, 2**63 - 1, 123456789])
    return [[rng.choice(pool, size=rng.integers(0, 4)).tolist() for _ in range(WORLD * LOCAL)] for _ in NAMES]


def _kjt(bags: list[list[list[int]]]) -> KeyedJaggedTensor:
    values = torch.tensor([v for feature in bags for bag in feature for v in bag], dtype=torch.int64)
    lengths = torch.tensor([len(bag) for feature in bags for bag in feature], dtype=torch.int64)
    return KeyedJaggedTensor.from_lengths_sync(keys=NAMES, values=values, lengths=lengths)


def _loss(pooled: torch.Tensor, batch_size: int) -> torch.Tensor:
    weights = torch.linspace(-1.0, 1.0, pooled[0].numel()).view(pooled.shape[1:])  # [F, D]
    return (pooled.tanh() * weights).sum() / batch_size


def _rank(rank: int) -> None:
    """One rank: compares itself with the unsharded table at every step (a failed check fails the test)."""
    reference = CollisionlessTable.from_config(BLOCK, NAMES, 3, Path("."), "model.tables.0")
    parts = CollisionlessTable.shard_from_config(BLOCK, NAMES, 3, Path("."), "model.tables.0", rank, WORLD)
    sharded = sharded_table(NAMES, 4, parts, dist.group.WORLD)
    mine = slice(rank * LOCAL, (rank + 1) * LOCAL)
    for step in range(4):
        bags = _bags(step)
        for table in (reference, sharded):
            table.observe_time(step)
        expected = reference(_kjt(bags))  # [WORLD * LOCAL, F, D]
        _loss(expected, WORLD * LOCAL).backward()
        got = sharded(_kjt([feature[mine] for feature in bags]))  # [LOCAL, F, D]
        _loss(got, LOCAL).backward()
        torch.testing.assert_close(got, expected[mine].detach(), atol=1e-6, rtol=1e-5)
    live = torch.tensor([sharded.shard.stats()["rows_live"]])
    dist.all_reduce(live)
    assert int(live) == reference.stats()["rows_live"] > 0  # every ID lives on exactly one shard
    freed = torch.tensor([sharded.evict(150)])  # data time 150: every row is idle > ttl = 100
    dist.all_reduce(freed)
    assert int(freed) == reference.evict(150) == int(live)


def test_sharded_collisionless_equals_unsharded(tmp_path: Path) -> None:
    run_ranks(_rank, tmp_path, world=WORLD)


def test_router_owners_are_stable_and_spread() -> None:
    keys = torch.arange(-5000, 5000, dtype=torch.int64) * 7919
    owners = IdRouter().owners(keys, 3)
    assert torch.equal(owners, IdRouter().owners(keys.clone(), 3))
    assert torch.bincount(owners, minlength=3).min() > 3000
