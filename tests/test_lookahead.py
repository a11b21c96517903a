"""The loop's lookahead window (recmem/train/lookahead.py): what is prefetched when, and released."""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recmem.data.batch import Batch
from recmem.tables import TableCollection
from recmem.tables.base import Prefetchable
from recmem.train.lookahead import lookahead


class _Recorder(torch.nn.Module):
    """A prefetching table that records calls: ('prefetch', first ID) and ('release', first ID)."""

    def __init__(self, calls: list) -> None:
        super().__init__()
        self.feature_names, self.embedding_dim, self.calls = ["a"], 1, calls

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return torch.zeros(features.stride(), 1, 1)

    def prefetch(self, features: KeyedJaggedTensor) -> int:
        self.calls.append(("prefetch", int(features.values()[0])))
        return int(features.values()[0])

    def release(self, ticket: int) -> None:
        self.calls.append(("release", ticket))


def _batches(n: int) -> list[Batch]:
    return [Batch(torch.zeros(1, 1), KeyedJaggedTensor(keys=["a"], values=torch.tensor([i]),
                                                       lengths=torch.tensor([1])), torch.zeros(1))
            for i in range(n)]


def test_window_prefetches_depth_ahead_and_releases_after_the_step():
    calls: list = []
    tables = TableCollection([_Recorder(calls)], ["a"])
    assert isinstance(tables.tables[0], Prefetchable)
    seen = []
    for batch in lookahead(_batches(4), tables, depth=2):
        seen.append(int(batch.sparse_features.values()[0]))
        calls.append(("step", seen[-1]))
    assert seen == [0, 1, 2, 3]
    assert calls == [("prefetch", 0), ("prefetch", 1), ("prefetch", 2), ("step", 0),
                     ("release", 0), ("prefetch", 3), ("step", 1),
                     ("release", 1), ("step", 2), ("release", 2), ("step", 3), ("release", 3)]


def test_depth_zero_prefetches_each_batch_as_it_comes():
    calls: list = []
    tables = TableCollection([_Recorder(calls)], ["a"])
    for batch in lookahead(_batches(2), tables, depth=0):
        calls.append(("step", int(batch.sparse_features.values()[0])))
    assert calls == [("prefetch", 0), ("step", 0), ("release", 0), ("prefetch", 1), ("step", 1), ("release", 1)]


def test_stopping_early_releases_the_whole_window():
    calls: list = []
    tables = TableCollection([_Recorder(calls)], ["a"])
    window = lookahead(_batches(5), tables, depth=2)
    next(window)
    window.close()  # what a `break` out of the loop does
    prefetched = [i for op, i in calls if op == "prefetch"]
    assert sorted(i for op, i in calls if op == "release") == prefetched == [0, 1, 2]


def test_no_prefetching_table_passes_batches_through():
    batches = _batches(3)
    plain = torch.nn.Identity()
    plain.feature_names, plain.embedding_dim = ["a"], 1
    tables = TableCollection([plain], ["a"])
    assert not tables.prefetching()
    assert list(lookahead(batches, tables, depth=2)) == batches
