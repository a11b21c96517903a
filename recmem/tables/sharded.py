"""ID-sharded tables: every worker owns some of a table's rows; lookups travel by all-to-all.

A table meant to outgrow one machine is never replicated. Each worker keeps a *router* (raw IDs ->
routing keys, cheap, the same on every worker) and a *shard* (the rows of the keys it owns). One
forward pass of a :class:`ShardedTable` on W workers, each holding a local batch of b rows::

    raw-ID KJT [F * b bags] --router--> key per ID --dedup--> unique (feature, key, count) [U, 3]
        --all-to-all--> each owner gets the pairs it owns from every worker [R, 3]
        --shard--> one row per pair [R, D] --all-to-all back--> [U, D] --pool per bag--> [b, F, D]

Backward retraces the last exchange in reverse: each worker sends the gradients of the rows it asked
for to their owners, whose shard applies its fused row-wise Adagrad step inside backward as the
unsharded table would. Each worker's loss is a mean over its own b rows, so the gradient a row is
owed for the global batch of W * b rows is 1/W of what the owners receive; the exchange scales it, as
DDP does for dense gradients, and W workers train exactly like one worker on the global batch.

Duplicate keys cross the wire once, with their count: the owner feeds its shard a bag holding the key
``count`` times and divides the pooled row by the count. The shard so sees every occurrence (counts
drive the admission filters of collisionless tables) and the row's gradient is the sum over all
occurrences, exactly as unsharded.

A kind joins in one of two ways:

- a *row-keyed* kind (fixed rows per feature, like ``full`` and ``hash``) gives its class a
  ``row_keys_from_config`` classmethod (:class:`RowKeyedKind`): raw IDs -> global row numbers, and
  each feature's row count. Worker r then keeps rows ``r, r + W, r + 2W, ...`` in a :class:`RowShard`;
  the same description lets TorchRec's ``DistributedModelParallel`` shard the kind instead.
- a kind that maps raw IDs to rows itself (``collisionless``) gives its class a
  ``shard_from_config`` classmethod (:class:`ShardableKind`): it routes by raw ID and uses a smaller
  instance of itself as the shard.
"""

from __future__ import annotations

import math
from pathlib import Path
from collections.abc import Iterator
from typing import NamedTuple, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recmem.config import ConfigError, TableConfig
from recmem.tables.base import Evictable, Prefetchable
from recmem.tables.fused import FusedRowwiseAdagrad

# Rows generated at a time when a shard reproduces the unsharded table's initial values.
_INIT_CHUNK_ROWS = 1 << 16


class Router(Protocol):
    """The source side of a sharded table: held whole by every worker, so it must stay small."""

    def __call__(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Raw-ID KJT of the table's features -> [N] int64 routing keys, one per ID."""
        ...

    def owners(self, keys: torch.Tensor, world_size: int) -> torch.Tensor:
        """[N] int64 keys -> [N] int64 rank in ``[0, world_size)`` that holds each key's row."""
        ...


class RowKeys(NamedTuple):
    """What a row-keyed kind tells the distributed paths.

    The unsharded table must store its rows as ``FusedRowwiseAdagrad(rows, D, learning_rate, seed)``
    does, so shards can start from the same values.

    Attributes:
        router: raw IDs -> global row numbers (a :class:`RowRouter` module, held by every worker).
        rows: rows of each feature's table.
    """

    router: torch.nn.Module
    rows: list[int]


@runtime_checkable
class RowKeyedKind(Protocol):
    """A table kind (the class) whose IDs map to fixed rows, so it can be split by row."""

    @classmethod
    def row_keys_from_config(
        cls, cfg: TableConfig, feature_names: list[str], seed: int, data_root: Path, where: str,
    ) -> RowKeys:
        """The router and the row counts of the table ``from_config`` would build (no rows allocated)."""
        ...


class KindShard(NamedTuple):
    """What a table kind hands the sharded path: the router and this worker's shard.

    Attributes:
        router: raw IDs -> keys, and keys -> owning rank (a :class:`Router` module).
        shard: KJT of owned keys, one key per bag -> [B', F, D] pooled rows (an ``nn.Module`` that
            updates itself in backward, like every table).
    """

    router: torch.nn.Module
    shard: torch.nn.Module


@runtime_checkable
class ShardableKind(Protocol):
    """A table kind (the class) that can build one worker's part of itself without the rest."""

    @classmethod
    def shard_from_config(
        cls, cfg: TableConfig, feature_names: list[str], seed: int, data_root: Path, where: str,
        rank: int, world_size: int,
    ) -> KindShard:
        """Like ``from_config``, but only the rows ``rank`` of ``world_size`` owns."""
        ...


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` over dim 0; backward sends the gradients back along the same splits."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup,
                grad_scale: float) -> torch.Tensor:
        ctx.splits, ctx.group, ctx.grad_scale = (send, recv), group, grad_scale
        return _exchange(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        send, recv = ctx.splits
        return _exchange(grad * ctx.grad_scale, recv, send, ctx.group), None, None, None, None


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    return out


class ShardedTable(torch.nn.Module):
    """One table kind split over the workers of ``group`` (see the module docstring).

    Every worker must call forward (and backward) the same number of times, in the same order, as
    the exchanges are collective.

    Args:
        feature_names: the F features of the table.
        embedding_dim: D.
        router: raw IDs -> keys -> owners (held by every worker).
        shard: this worker's rows (KJT of owned keys -> pooled rows).
        group: the process group of the table exchanges (a gloo group on CPU).
    """

    def __init__(self, feature_names: list[str], embedding_dim: int, router: torch.nn.Module,
                 shard: torch.nn.Module, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.feature_names = list(feature_names)
        self.embedding_dim = embedding_dim
        self.router = router
        self.shard = shard
        self.group = group
        self.world_size = dist.get_world_size(group)
        self._sent_bytes = 0
        self._steps = 0

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Raw-ID KJT of ``feature_names`` (local batch b) -> [b, F, D] pooled embeddings."""
        num_features, batch = len(self.feature_names), features.stride()
        pairs, inverse, counts = _unique_per_feature(self.router(features), features.length_per_key())
        owners = self.router.owners(pairs[:, 1], self.world_size)  # [U]
        order = torch.argsort(owners, stable=True)
        send_counts = torch.bincount(owners, minlength=self.world_size)  # [W]
        recv_counts = _exchange(send_counts, [1] * self.world_size, [1] * self.world_size, self.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        request = torch.cat([pairs, counts[:, None]], dim=1)[order]  # [U, 3] (feature, key, count)
        received = _exchange(request.flatten(), [3 * n for n in send], [3 * n for n in recv], self.group)
        rows = self._lookup(received.view(-1, 3))  # [R, D]
        answered = _AllToAll.apply(rows, recv, send, self.group, 1.0 / self.world_size)  # [U, D]
        unique_rows = answered[torch.argsort(order)]  # [U, D] in `pairs` order
        bags = torch.repeat_interleave(torch.arange(num_features * batch), features.lengths())  # [N]
        pooled = unique_rows.new_zeros(num_features * batch, self.embedding_dim)
        pooled = pooled.index_add(0, bags, unique_rows[inverse])  # [F * b, D]
        if torch.is_grad_enabled() and self.training:
            self._count_traffic(send, recv)
        return pooled.view(num_features, batch, self.embedding_dim).transpose(0, 1)  # [b, F, D]

    def _lookup(self, pairs: torch.Tensor) -> torch.Tensor:
        """Owner side: [R, 3] (feature, key, count) from all workers -> [R, D] rows, in that order."""
        num_features = len(self.feature_names)
        by_feature = torch.argsort(pairs[:, 0], stable=True)
        feature, key, count = pairs[by_feature].unbind(1)  # each [R]
        per_feature = torch.bincount(feature, minlength=num_features)  # [F]
        stride = max(int(per_feature.max()) if len(feature) else 0, 1)
        starts = torch.cumsum(per_feature, 0) - per_feature  # [F]
        slot = torch.arange(len(feature)) - starts[feature]  # [R] bag of each pair in its feature
        lengths = torch.zeros(num_features, stride, dtype=torch.int64)
        lengths[feature, slot] = count
        bags = KeyedJaggedTensor(keys=self.feature_names, values=torch.repeat_interleave(key, count),
                                 lengths=lengths.flatten(), stride=stride)
        pooled = self.shard(bags)  # [stride, F, D]
        rows = pooled[slot, feature] / count[:, None].to(pooled.dtype)  # [R, D]
        return rows[torch.argsort(by_feature)]

    def _count_traffic(self, send: list[int], recv: list[int]) -> None:
        """Bytes this worker puts on the network in one training step (what it sends itself stays
        local): counts, requests (24 B each), answered rows, and the gradients of its rows back."""
        rank, row_bytes = dist.get_rank(self.group), self.embedding_dim * 4
        requested, answered = sum(send) - send[rank], sum(recv) - recv[rank]
        self._sent_bytes += 8 * (self.world_size - 1) + (24 + row_bytes) * requested + row_bytes * answered
        self._steps += 1

    def memory_bytes(self) -> int:
        """Bytes held by this worker: its shard plus the router."""
        router = sum(b.numel() * b.element_size() for b in self.router.buffers())
        return int(self.shard.memory_bytes()) + router

    def stats(self) -> dict[str, float]:
        """The shard's stats plus the network bytes this worker sent per training step since the
        last call."""
        out = dict(self.shard.stats())
        if self._steps:
            out["alltoall_bytes_per_step"] = self._sent_bytes / self._steps
        self._sent_bytes, self._steps = 0, 0
        return out


def _unique_per_feature(keys: torch.Tensor, per_feature: list[int]) -> tuple[torch.Tensor, ...]:
    """Distinct (feature, key) pairs of key-major ``keys`` [N].

    Returns:
        pairs [U, 2] (feature, key) sorted by feature then key, inverse [N] (each key's pair), counts [U].
    """
    pairs, inverses, counts, seen = [], [], [], 0
    # One 1-D unique per feature: torch.unique over [N, 2] rows is some 30x slower.
    for feature, part in enumerate(torch.split(keys, per_feature)):
        unique, inverse, count = torch.unique(part, return_inverse=True, return_counts=True)
        pairs.append(torch.stack([torch.full_like(unique, feature), unique], dim=1))
        inverses.append(inverse + seen)
        counts.append(count)
        seen += len(unique)
    return torch.cat(pairs), torch.cat(inverses), torch.cat(counts)


class EvictableShardedTable(ShardedTable):
    """A sharded table whose shard ages rows in data time: the clock reaches the shard."""

    def observe_time(self, now: int) -> None:
        """Stamp the data time of the batch about to be trained on the shard."""
        self.shard.observe_time(now)

    def evict(self, now: int) -> int:
        """Free the shard's rows idle longer than its TTL; returns rows freed on this worker."""
        return self.shard.evict(now)


class PrefetchingShardedTable(ShardedTable):
    """A sharded table whose shard prefetches (``ssd``): each worker prefetches the rows it owns.

    A batch's keys travel to their owners as a lookup's do (one all-to-all, so every worker must
    prefetch the same batches in the same order, as the loop's lookahead does on every rank); each
    owner pins the rows asked of it by any worker.
    """

    def prefetch(self, features: KeyedJaggedTensor) -> object:
        """Send the keys of an upcoming local batch to their owners; returns the owner's ticket for
        the keys every worker sent it."""
        pairs, _, _ = _unique_per_feature(self.router(features), features.length_per_key())  # [U, 2]
        owners = self.router.owners(pairs[:, 1], self.world_size)
        order = torch.argsort(owners, stable=True)
        send = torch.bincount(owners, minlength=self.world_size)
        recv = _exchange(send, [1] * self.world_size, [1] * self.world_size, self.group).tolist()
        send = send.tolist()
        received = _exchange(pairs[order].flatten(), [2 * n for n in send], [2 * n for n in recv], self.group)
        feature, key = received.view(-1, 2).unbind(1)  # [R] each
        by_feature = torch.argsort(feature, stable=True)
        per_feature = torch.bincount(feature, minlength=len(self.feature_names)).tolist()
        keys = KeyedJaggedTensor(keys=self.feature_names, values=key[by_feature],
                                 lengths=torch.tensor(per_feature, dtype=torch.int64), stride=1)
        return self.shard.prefetch(keys)

    def release(self, ticket: object) -> None:
        """Unpin the rows the shard pinned for one batch."""
        self.shard.release(ticket)


class EvictablePrefetchingShardedTable(EvictableShardedTable, PrefetchingShardedTable):
    """A sharded table whose shard both ages rows and prefetches them."""


def sharded_table(feature_names: list[str], embedding_dim: int, parts: KindShard,
                  group: dist.ProcessGroup) -> ShardedTable:
    """Wrap a kind's router and shard, keeping the optional capabilities the shard has."""
    classes = {(False, False): ShardedTable, (True, False): EvictableShardedTable,
               (False, True): PrefetchingShardedTable, (True, True): EvictablePrefetchingShardedTable}
    cls = classes[isinstance(parts.shard, Evictable), isinstance(parts.shard, Prefetchable)]
    return cls(feature_names, embedding_dim, parts.router, parts.shard, group)


class RowRouter(torch.nn.Module):
    """Base of routers whose keys are global row numbers: row k lives on worker ``k mod W``."""

    def owners(self, keys: torch.Tensor, world_size: int) -> torch.Tensor:
        """[N] row numbers -> [N] owning ranks (rows dealt round-robin, so shards stay even)."""
        return torch.remainder(keys, world_size)


class RowShard(torch.nn.Module):
    """Rank r's rows ``r, r + W, r + 2W, ...`` of F tables, trained by fused row-wise Adagrad.

    Starts from exactly the values the unsharded :class:`FusedRowwiseAdagrad` with the same ``rows``
    and ``seed`` starts from (its random stream is replayed and this rank's rows kept), so sharded
    and unsharded training begin alike.

    Args:
        feature_names: the F features (one table each).
        rows: global rows of each table.
        embedding_dim: D.
        learning_rate: row-wise Adagrad step size.
        seed: the unsharded table's seed.
        rank: this worker.
        world_size: W.
    """

    def __init__(self, feature_names: list[str], rows: list[int], embedding_dim: int,
                 learning_rate: float, seed: int, rank: int, world_size: int) -> None:
        super().__init__()
        self.feature_names = list(feature_names)
        self.embedding_dim = embedding_dim
        self.global_rows = list(rows)
        self.rank, self.world_size = rank, world_size
        # A table with fewer rows than workers leaves some ranks none; a TBE needs one, never read.
        local = [max(len(range(rank, n, world_size)), 1) for n in rows]
        self.rows = FusedRowwiseAdagrad(local, embedding_dim, learning_rate, seed, initialise=False)
        with torch.no_grad():
            for t, start, chunk in initial_rows(self.global_rows, embedding_dim, seed):
                mine = chunk[(rank - start) % world_size :: world_size]  # global rows = rank mod W
                first = -(-(start - rank) // world_size)  # local index of the first of them
                self.rows.weights(t)[first : first + len(mine)] = mine

    def forward(self, keys: KeyedJaggedTensor) -> torch.Tensor:
        """KJT of global row numbers owned here -> [B', F, D] pooled rows."""
        local = torch.div(keys.values(), self.world_size, rounding_mode="floor")
        return self.rows(local, keys.offsets())

    @torch.no_grad()
    def load_global(self, table: int, weights: torch.Tensor, momentum: torch.Tensor) -> None:
        """Take this rank's rows of an unsharded table: weights [n, D], Adagrad state [n]."""
        mine = torch.arange(self.rank, self.global_rows[table], self.world_size)
        self.rows.weights(table)[: len(mine)] = weights[mine]
        self.rows.momentum(table)[: len(mine)] = momentum[mine]

    def memory_bytes(self) -> int:
        """Bytes of this rank's rows and their optimizer state."""
        return self.rows.memory_bytes()

    def stats(self) -> dict[str, float]:
        """Rows held on this worker."""
        return {"rows": float(sum(self.rows.rows))}


def initial_rows(rows: list[int], embedding_dim: int, seed: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Replay the initial rows of ``FusedRowwiseAdagrad(rows, embedding_dim, lr, seed)`` in chunks.

    A shard keeps the part it owns, so no worker ever holds a whole table to start from the same
    values as one.

    Yields:
        (table, first row of the chunk, chunk [c, D]) in the unsharded table's generation order.
    """
    generator = torch.Generator().manual_seed(seed)
    for table, n in enumerate(rows):
        bound = math.sqrt(1.0 / n)
        for start in range(0, n, _INIT_CHUNK_ROWS):
            chunk = torch.empty(min(_INIT_CHUNK_ROWS, n - start), embedding_dim)
            yield table, start, chunk.uniform_(-bound, bound, generator=generator)


def kind_shard(kind: type, cfg: TableConfig, feature_names: list[str], seed: int, data_root: Path,
               where: str, rank: int, world_size: int) -> KindShard:
    """The router and ``rank``'s shard of one table block, built without the rest of the table.

    Raises:
        ConfigError: the kind can be neither row-split nor ID-sharded.
    """
    if isinstance(kind, ShardableKind):
        return kind.shard_from_config(cfg, feature_names, seed, data_root, where, rank, world_size)
    if isinstance(kind, RowKeyedKind):
        keys = kind.row_keys_from_config(cfg, feature_names, seed, data_root, where)
        shard = RowShard(feature_names, keys.rows, cfg.embedding_dim, cfg.learning_rate, seed, rank, world_size)
        return KindShard(keys.router, shard)
    raise ConfigError(f"{where}.kind: {cfg.kind!r} tables cannot be sharded "
                      "(the kind has neither row_keys_from_config nor shard_from_config)")


def build_sharded_tables(configs: list[TableConfig], sparse_features: list[str], data_root: Path,
                         seed: int, group: dist.ProcessGroup) -> torch.nn.Module:
    """``build_tables`` with every block ID-sharded over ``group``'s workers.

    Raises:
        ConfigError: as ``build_tables``, or a kind that cannot be sharded.
    """
    from recmem.tables import build_tables

    rank, world_size = dist.get_rank(group), dist.get_world_size(group)

    def make(kind: type, cfg: TableConfig, names: list[str], table_seed: int, root: Path, where: str):
        parts = kind_shard(kind, cfg, names, table_seed, root, where, rank, world_size)
        return sharded_table(names, cfg.embedding_dim, parts, group)

    return build_tables(configs, sparse_features, data_root, seed, make=make)
