"""`collisionless`: every raw 64-bit ID gets its own row (Monolith semantics), memory bounded by
admission (an ID needs ``min_count`` sightings) and expiry (rows idle longer than ``ttl`` in data time).

The ID -> row map, the frequency filter and the expiry clock live in a :class:`SlotMap` (numba
kernels); the rows and their row-wise Adagrad state live in one fused fbgemm kernel, updated sparsely
inside backward. A feature's rows start small and double as IDs are admitted, up to ``capacity``;
there the ``eviction`` policy makes room.

Data time, never the wall clock, drives expiry: the trainer stamps each batch's event time with
:meth:`observe_time`, so replaying or backfilling old logs ages rows as the data did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recmem.config import ConfigError, TableConfig, from_dict
from recmem.lock import LockedError
from recmem.tables.base import ServingForm, check_width
from recmem.tables.fused import FusedRowwiseAdagrad
from recmem.tables.idhash import shard_of
from recmem.tables.sharded import KindShard
from recmem.tables.slotmap import Eviction, SlotMap
from recmem.tables.ssd import SSDOptions
from recmem.tables.ssd.keyed import KeyedDiskRows
from recmem.tables.ssd.rows import DiskRows
from recmem.tables.ssd.store import RowStore, StoreError


@dataclass
class CollisionlessOptions:
    """``options`` of a ``collisionless`` table block.

    Attributes:
        capacity: most rows per feature.
        min_count: sightings before an ID gets a row; 0 or 1 admits at once.
        ttl: free rows not updated for more than this many data-time seconds; None keeps them.
        eviction: at capacity, "lru" / "lfu" evict the least recently / often updated rows for a new
            ID, "none" leaves the new ID without a row.
        initial_rows: rows allocated per feature before any growth.
        filter_width: counters per hash row of the frequency filter (4 rows of uint8: 4x this many
            bytes); see ``admission.py`` for its false-admission rate.
        track_changes: record freed IDs too, so ``take_changes`` reports them (the input of row
            deltas for serving, which are not built yet).
        storage: ``ram``, or ``ssd``: the rows and their Adagrad state on local disk behind a RAM
            cache, prefetched ahead of the step (``recmem/tables/ssd/``); the ID map stays in RAM.
        ssd: where and how (``path``, ``cache_rows``, ...: the ``ssd`` kind's options); needed with
            ``storage: ssd``. Each Ray worker keeps its rows in ``<path>/rank-<r>-of-<W>``.
    """

    capacity: int = 1_000_000
    min_count: int = 1
    ttl: int | None = None
    eviction: Eviction = "lru"
    initial_rows: int = 4096
    filter_width: int = 1 << 20
    track_changes: bool = False
    storage: Literal["ram", "ssd"] = "ram"
    ssd: SSDOptions | None = None


class CollisionlessTable(torch.nn.Module):
    """One collisionless table per feature, all in one fused kernel.

    Args:
        feature_names: the F features.
        embedding_dim: D.
        learning_rate: row-wise Adagrad step size.
        capacity, min_count, ttl, eviction, initial_rows, filter_width, track_changes: as in
            :class:`CollisionlessOptions`.
        seed: salts the per-ID row initialisation (a new row's values depend on the seed, the
            feature's position and the ID only, so they do not depend on batch order or sharding).
        init_bound: new rows are uniform in +-init_bound; None: sqrt(1 / capacity), torchrec's scale
            for a table of ``capacity`` rows (a shard passes the whole table's).
        disk: ``capacity`` rows per feature on disk (``options.storage: ssd``); None: rows in RAM.
    """

    def __init__(self, feature_names: list[str], embedding_dim: int, learning_rate: float,
                 capacity: int, min_count: int = 1, ttl: int | None = None, eviction: Eviction = "lru",
                 initial_rows: int = 4096, filter_width: int = 1 << 20, track_changes: bool = False,
                 seed: int = 0, init_bound: float | None = None, disk: DiskRows | None = None) -> None:
        super().__init__()
        if ttl is not None and ttl < 0:
            raise ValueError(f"ttl must be >= 0 or None, got {ttl}")
        self.feature_names = list(feature_names)
        self.embedding_dim = embedding_dim
        self.ttl = ttl
        self.seed = seed
        self.slots = SlotMap(len(feature_names), capacity, min(initial_rows, capacity), min_count,
                             filter_width, eviction, seed, track_changes)
        # No initial draw: a row gets its values when an ID is admitted to it (``_init_row``).
        self.disk = None if disk is None else KeyedDiskRows(disk, capacity)
        if disk is None:
            self.rows = FusedRowwiseAdagrad(self.slots.allocations(), embedding_dim, learning_rate, seed,
                                            initialise=False)
        self._init_bound = math.sqrt(1.0 / capacity) if init_bound is None else init_bound
        self._now = 0

    @classmethod
    def from_config(cls, cfg: TableConfig, feature_names: list[str], seed: int, data_root: Path,
                    where: str, output_dim: int | None = None) -> "CollisionlessTable":
        """Build from a table block; the knobs are in ``options`` (:class:`CollisionlessOptions`)."""
        check_width(cfg, where, output_dim)
        return _build(cls, cfg, feature_names, seed, where, world_size=1)

    @classmethod
    def shard_from_config(cls, cfg: TableConfig, feature_names: list[str], seed: int, data_root: Path,
                          where: str, rank: int, world_size: int) -> KindShard:
        """This worker's part for the ID-sharded path: the IDs a hash assigns it, in a table of
        ``capacity / world_size`` rows per feature that initialises rows as the whole table would."""
        return KindShard(router=IdRouter(), shard=_build(cls, cfg, feature_names, seed, where, world_size, rank))

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Pool each bag's rows; IDs without a row (not admitted, or no room) contribute nothing.

        In training mode unknown IDs are counted and admitted and rows are stamped with the data
        time; in eval mode the map is only read.

        Args:
            features: KJT with keys ``feature_names``, lengths [F * B], values raw int64 IDs.

        Returns:
            [B, F, D] sum-pooled embeddings.
        """
        if features.keys() != self.feature_names:
            raise ValueError(f"expected features {self.feature_names}, got {features.keys()}")
        values = features.values().to(torch.int64).contiguous().numpy()
        offsets = features.offsets().to(torch.int64)  # [F * B + 1]
        bounds = offsets[:: max(features.stride(), 1)].numpy()  # [F + 1] feature segments of values
        if self.disk is not None:
            if self.training:
                rows = self.disk.assign(self.slots, values, bounds, self._now, self._init_bound)
            else:
                rows = self.disk.flat(self.slots.find(values, bounds), bounds)
            indices, offsets = drop_missing(rows, offsets)
            pooled = self.disk.disk.pool(indices.numpy(), offsets, self.training)  # [F * B, 1, D]
            return pooled.view(len(self.feature_names), features.stride(), self.embedding_dim).transpose(0, 1)
        if self.training:
            local = self.slots.assign(values, bounds, self._now, self._init_bound, self._flat_rows)
        else:
            local = self.slots.find(values, bounds)
        indices, offsets = drop_missing(local, offsets)
        return self.rows(indices, offsets)

    def observe_time(self, now: int) -> None:
        """Stamp the data time of the batch about to be trained; rows it updates record it."""
        self._now = int(now)

    def evict(self, now: int) -> int:
        """Free rows idle for more than ``ttl`` at data time ``now`` (idle == ttl stays); on disk
        their rows are deleted too."""
        if self.ttl is None:
            return 0
        if self.disk is not None:
            return self.disk.expire(self.slots, int(now), self.ttl)
        return self.slots.expire(int(now), self.ttl)

    def _weights(self, feature: int, local: np.ndarray) -> torch.Tensor:
        """[n, D] rows of feature ``feature``'s local rows (a copy), from RAM or from disk."""
        if self.disk is not None:
            return self.disk.rows(feature, local)
        return self.rows.weights(feature)[torch.as_tensor(local, dtype=torch.int64)].detach().clone()

    def memory_bytes(self) -> int:
        """Rows (or, on disk, the cache), Adagrad state, ID map and filter."""
        rows = self.rows.memory_bytes() if self.disk is None else self.disk.disk.memory_bytes()
        return rows + sum(self.slots.memory_bytes().values())

    def stats(self) -> dict[str, float]:
        """Rows live and allocated, IDs admitted / rejected by the filter / refused for lack of room,
        rows expired (TTL) and evicted (capacity), and memory by part."""
        out = self.slots.stats()
        rows = int(out["rows_allocated"])
        out.update({k: float(v) for k, v in self.slots.memory_bytes().items()})
        out.update(row_bytes=float(rows * self.embedding_dim * 4), optimizer_bytes=float(rows * 4),
                   memory_bytes=float(self.memory_bytes()))
        if self.disk is not None:  # rows and state are on disk: the RAM is the cache's
            out.update(self.disk.disk.stats(), row_bytes=0.0, optimizer_bytes=0.0)
        return out

    def take_changes(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per feature: rows updated since the last call and IDs freed (what a serving delta will hold).

        Returns:
            ``{feature: {"ids": [n] int64, "weights": [n, D], "freed": [m] int64}}``; apply frees first.
        """
        out = {}
        for f, name in enumerate(self.feature_names):
            ids, local, freed = self.slots.take_changes(f)
            out[name] = {"ids": torch.from_numpy(ids), "weights": self._weights(f, local),
                         "freed": torch.from_numpy(freed)}
        return out

    def to_serving(self) -> list[ServingForm]:
        """Per feature: its live IDs (ascending) and their rows; other IDs get a zero row, as an ID
        without a row pools to nothing here."""
        out = []
        for f in range(len(self.feature_names)):
            ids, local = self.slots.live(f)
            order = np.argsort(ids, kind="stable")
            rows = self._weights(f, local[order])
            out.append(ServingForm("keyed", {"keys": torch.from_numpy(ids[order].copy()), "rows": rows,
                                             "default": torch.zeros(self.embedding_dim)}))
        return out

    def to_inference(self) -> "CollisionlessLookup":
        """A read-only ID -> row lookup of the live rows, with no optimizer state or filter."""
        keys, weights = [], []
        for f in range(len(self.feature_names)):
            ids, local = self.slots.live(f)
            order = np.argsort(ids, kind="stable")
            keys.append(torch.from_numpy(ids[order]))
            weights.append(self._weights(f, local[order]))
        return CollisionlessLookup(self.feature_names, keys, weights)

    def get_extra_state(self) -> dict[str, Any]:
        """The ID map, filter, counters and clock; rows and Adagrad state are the fused kernel's (in
        RAM) or the disk's, committed here with a row map of four bytes a row (``RowStore.commit``)."""
        state = {"slots": self.slots.state(), "now": self._now}
        return state if self.disk is None else {**state, "disk": self.disk.disk.commit()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the map and re-size the fused kernel to it (``load_state_dict`` fills it next)."""
        self.slots.load_state(state["slots"])
        if max(self.slots.allocations()) > self.slots.capacity:
            raise ValueError(f"snapshot holds {max(self.slots.allocations())} rows in a feature, "
                             f"more than this table's capacity {self.slots.capacity}")
        self._now = int(state["now"])
        if self.disk is not None:
            self.disk.disk.restore(state["disk"])
            return
        self._resize(self.slots.allocations())

    def _flat_rows(self, allocations: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Writable flat views of all rows [R, D] and Adagrad accumulators [R], resized if needed."""
        self._resize(allocations)
        return _flat(self.rows)

    def _resize(self, allocations: list[int]) -> None:
        """Swap in a fused kernel with ``allocations`` rows per table, keeping existing rows and state."""
        if allocations == self.rows.rows:
            return
        old = self.rows
        new = FusedRowwiseAdagrad(allocations, self.embedding_dim, old.tbe.get_learning_rate(), self.seed,
                                  initialise=False)
        (old_w, old_m), (new_w, new_m) = _flat(old), _flat(new)
        old_base, new_base = np.cumsum([0] + old.rows), np.cumsum([0] + allocations)
        for t, n in enumerate(old.rows):
            keep = min(n, allocations[t])
            new_w[new_base[t]:new_base[t] + keep] = old_w[old_base[t]:old_base[t] + keep]
            new_m[new_base[t]:new_base[t] + keep] = old_m[old_base[t]:old_base[t] + keep]
        self.rows = new


def _flat(fused: FusedRowwiseAdagrad) -> tuple[np.ndarray, np.ndarray]:
    """All rows [R, D] and accumulators [R] of a fused kernel as writable numpy views."""
    tbe = fused.tbe
    # fbgemm stores same-width tables back to back on CPU; the map's ROW_BASE relies on it.
    base = np.cumsum([0] + fused.rows[:-1])
    if not np.array_equal(tbe.weights_offsets.numpy(), base * fused.embedding_dim):
        raise RuntimeError("fbgemm's table layout is not back to back; collisionless needs it")
    weights = tbe.weights_host.detach().numpy().reshape(-1, fused.embedding_dim)
    return weights, tbe.momentum1_host.detach().numpy()


def _build(cls: type[CollisionlessTable], cfg: TableConfig, feature_names: list[str], seed: int, where: str,
           world_size: int, rank: int = 0) -> CollisionlessTable:
    """A table (or shard ``rank`` of ``world_size``) from a config block; errors name the key."""
    if cfg.num_embeddings:
        raise ConfigError(f"{where}.num_embeddings: collisionless tables are sized by options.capacity")
    o = from_dict(CollisionlessOptions, cfg.options, f"{where}.options")
    if (o.storage == "ssd") != (o.ssd is not None):
        raise ConfigError(f"{where}.options.ssd: give the disk's options (path, cache_rows) with "
                          f"options.storage: ssd, and only then (storage is {o.storage!r})")
    capacity = -(-o.capacity // world_size)
    disk = None
    if o.ssd is not None:
        path = Path(o.ssd.path) if world_size == 1 else Path(o.ssd.path) / f"rank-{rank}-of-{world_size}"
        try:
            store = RowStore(path, [capacity] * len(feature_names), cfg.embedding_dim, seed, o.ssd.io_threads,
                             o.ssd.direct_io, initialise=False, io_depth=o.ssd.io_depth)
        except (OSError, StoreError, LockedError) as e:
            raise ConfigError(f"{where}.options.ssd.path: {e}") from None
        disk = DiskRows(store, max(-(-o.ssd.cache_rows // world_size), 1), cfg.learning_rate)
    kind = cls if disk is None else DiskCollisionlessTable
    try:
        return kind(feature_names, cfg.embedding_dim, cfg.learning_rate, capacity, o.min_count, o.ttl, o.eviction,
                   o.initial_rows, o.filter_width, o.track_changes, seed, math.sqrt(1.0 / max(o.capacity, 1)), disk)
    except ValueError as e:
        raise ConfigError(f"{where}.options: {e}") from None


class DiskCollisionlessTable(CollisionlessTable):
    """A collisionless table with its rows on disk (``options.storage: ssd``): it also prefetches
    (``base.Prefetchable``), which an in-RAM one has no use for."""

    def prefetch(self, features: KeyedJaggedTensor) -> np.ndarray:
        """Pin the rows of an upcoming batch's known IDs (a lookup: no sighting is counted) and start
        reading them; returns the ticket for :meth:`release`."""
        offsets = features.offsets().to(torch.int64)
        bounds = offsets[:: max(features.stride(), 1)].numpy()  # [F + 1]
        return self.disk.prefetch(self.slots, features.values().to(torch.int64).contiguous().numpy(), bounds)

    def release(self, ticket: np.ndarray) -> None:
        """Unpin the rows of one :meth:`prefetch`."""
        self.disk.disk.release(ticket)


class IdRouter(torch.nn.Module):
    """Routes a sharded collisionless table: the key is the raw ID, owned by a hash of it."""

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Raw-ID KJT -> [N] int64 keys (the IDs themselves)."""
        return features.values().to(torch.int64)

    def owners(self, keys: torch.Tensor, world_size: int) -> torch.Tensor:
        """[N] raw IDs -> [N] int64 owning ranks (:func:`~recmem.tables.idhash.shard_of`)."""
        return torch.from_numpy(shard_of(keys.contiguous().numpy(), world_size))


class CollisionlessLookup(torch.nn.Module):
    """The read-only form of a collisionless table: sorted IDs and their rows, nothing else.

    Args:
        feature_names: the F features.
        keys: per feature, [n_f] int64 IDs in ascending order.
        weights: per feature, [n_f, D] rows matching ``keys``.
    """

    def __init__(self, feature_names: list[str], keys: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
        super().__init__()
        self.feature_names = list(feature_names)
        self.embedding_dim = int(weights[0].shape[1])
        sizes = torch.tensor([0] + [len(k) for k in keys])
        self.register_buffer("key_bounds", torch.cumsum(sizes, 0))  # [F + 1] feature segments
        self.register_buffer("keys", torch.cat(keys))  # [N] ascending within each segment
        self.register_buffer("weights", torch.cat(weights))  # [N, D]

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Raw-ID KJT of ``feature_names`` -> [B, F, D]; unknown IDs pool to nothing, as in training."""
        values, offsets, b = features.values(), features.offsets(), features.stride()
        bounds = offsets[:: max(b, 1)].tolist()
        rows = torch.full_like(values, -1)
        for f in range(len(self.feature_names)):
            lo, hi = int(self.key_bounds[f]), int(self.key_bounds[f + 1])
            if lo == hi:
                continue
            ids = values[bounds[f]:bounds[f + 1]]
            pos = torch.searchsorted(self.keys[lo:hi], ids).clamp_(max=hi - lo - 1)
            hit = self.keys[lo:hi][pos] == ids
            rows[bounds[f]:bounds[f + 1]] = torch.where(hit, pos + lo, -1)
        indices, offsets = drop_missing(rows.numpy(), offsets)
        pooled = torch.nn.functional.embedding_bag(
            indices, self.weights, offsets, mode="sum", include_last_offset=True
        )  # [F * B, D]
        return pooled.view(len(self.feature_names), b, self.embedding_dim).transpose(0, 1)  # [B, F, D]

    def memory_bytes(self) -> int:
        """Bytes of IDs and rows."""
        return self.keys.nbytes + self.weights.nbytes


def drop_missing(rows: np.ndarray, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove the -1 entries of a jagged index array and shrink its bags to match.

    Args:
        rows: [N] int64 row per ID, -1 for IDs without a row.
        offsets: [bags + 1] int64 bag boundaries into ``rows``.

    Returns:
        ([M] int64 rows, [bags + 1] int64 offsets), M = number of entries >= 0.
    """
    keep = rows >= 0
    if keep.all():
        return torch.from_numpy(rows), offsets
    kept = np.zeros(rows.shape[0] + 1, dtype=np.int64)
    np.cumsum(keep, out=kept[1:])  # kept[i] = surviving entries before position i
    return torch.from_numpy(rows[keep]), torch.from_numpy(kept[offsets.numpy()])
