"""The Ray workers' data: W workers read exactly the global batches one worker reads, resume skips exactly
what was trained, every worker gets as many batches as the others, from a local folder or a URI; and
since a worker reads its own data, the threads it takes share nothing with separate readers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from recmem.config import ConfigError
from recmem.train.distributed.data import plan_splits, shard_source, worker_ranges
from tests.conftest import small_schema, tiny_config, write_learnable_root


@given(rows=st.integers(0, 5000), local=st.integers(1, 64), world=st.integers(1, 5))
def test_workers_share_each_global_batch_and_get_as_many_batches(rows, local, world):
    batch = local * world
    one = worker_ranges(rows, batch, 1, 0, train=True)
    shares = [worker_ranges(rows, batch, world, r, train=True) for r in range(world)]
    assert {len(s) for s in shares} == {len(one)} == {rows // batch}
    for step, (begin, end) in enumerate(one):
        pieces = [s[step] for s in shares]
        assert pieces[0][0] == begin and pieces[-1][1] == end
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:])), "contiguous, in rank order"


@given(rows=st.integers(0, 5000), local=st.integers(1, 64), world=st.integers(1, 5))
def test_validation_covers_all_but_fewer_than_w_rows_in_equal_counts(rows, local, world):
    shares = [worker_ranges(rows, local * world, world, r, train=False) for r in range(world)]
    assert len({len(s) for s in shares}) == 1
    covered = sorted(row for share in shares for begin, end in share for row in range(begin, end))
    assert covered == list(range(len(covered))) and rows - len(covered) < world
    assert all(end > begin for share in shares for begin, end in share), "no empty batch"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_learnable_root(tmp_path_factory.mktemp("split"), small_schema(), rows=1000, valid=300)


def _batches(cfg, world, rank, split="train", start=0):
    return list(shard_source(cfg, world, rank, plan_splits(cfg, world))(split, 0, start))


def _rows(batches):
    return torch.cat([b.dense_features for b in batches]), torch.cat([b.labels for b in batches])


@pytest.mark.parametrize("as_uri", [False, True])
def test_two_workers_read_the_global_batches_of_one(root, tmp_path, as_uri):
    cfg = tiny_config(root.as_uri() if as_uri else root, tmp_path, "data.batch_size=128")
    one = _batches(cfg, 1, 0)
    two = [_batches(cfg, 2, r) for r in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) == 1000 // 128
    for step, batch in enumerate(one):
        dense, labels = _rows([two[0][step], two[1][step]])
        assert torch.equal(dense, batch.dense_features) and torch.equal(labels, batch.labels)
        assert len(two[0][step]) == 64


def test_a_resumed_worker_gets_exactly_the_batches_it_had_left(root, tmp_path):
    cfg = tiny_config(root, tmp_path, "data.batch_size=128")
    whole = _batches(cfg, 2, 1)
    rest = _batches(cfg, 2, 1, start=3)
    assert len(rest) == len(whole) - 3
    for a, b in zip(whole[3:], rest):
        assert torch.equal(a.dense_features, b.dense_features) and torch.equal(a.labels, b.labels)


def test_validation_batches_are_as_many_on_every_worker(root, tmp_path):
    cfg = tiny_config(root, tmp_path, "data.batch_size=128")
    shares = [_batches(cfg, 2, r, "valid") for r in range(2)]
    assert [len(s) for s in shares] == [3, 3]  # 300 rows: 2 global batches of 128, then 22 each
    assert [len(b) for b in shares[0]] == [64, 64, 22]
    assert sum(len(b) for s in shares for b in s) == 300


def test_the_plan_fails_before_any_worker_starts(root, tmp_path):
    with pytest.raises(ConfigError, match="do not split evenly over ray.num_workers=3"):
        plan_splits(tiny_config(root, tmp_path, "data.batch_size=128"), 3)
    with pytest.raises(FileNotFoundError, match="no part-"):
        plan_splits(tiny_config(tmp_path, tmp_path), 1)


def test_a_worker_alone_on_its_node_takes_every_core(monkeypatch):
    from recmem.train.distributed.worker import torch_threads

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert torch_threads(0, 1) == (4, "4 cores on this node, 1 worker on it")
    assert torch_threads(0, 3)[0] == 1 and torch_threads(0, 8)[0] == 1
    assert torch_threads(6, 1) == (6, "ray.torch_threads=6")
