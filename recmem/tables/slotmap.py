"""The bookkeeping of a collisionless table: which raw ID holds which row, and when rows come and go.

`SlotMap` owns the flat arrays the kernels in ``idmap.py`` work on (their layout is described there)
and decides what the kernels cannot: growing a feature's rows (doubling, up to ``capacity``), evicting
by LRU or LFU when a feature is full, expiring idle rows, snapshotting everything for a checkpoint.
Row *values* live elsewhere (the fused embedding kernel); ``assign`` reaches them through a callback
that returns flat views and resizes them when the row allocation changes.
"""

from __future__ import annotations

from typing import Callable, Literal

import numpy as np
import torch

from recmem.tables import idmap
from recmem.tables.admission import DEPTH, new_sketch, sketch_width
from recmem.tables.idhash import feature_salts
from recmem.tables.idmap import (
    ADMITTED, BUCKET_BASE, BUCKET_MASK, COUNT, DIRTY, EMPTY, EVICTED, EXPIRED, FREE_TOP, KEY, LIVE,
    REJECTED, REJECTED_FULL, ROW_ALLOC, ROW_BASE, TIME,
)

Eviction = Literal["none", "lru", "lfu"]
# Buckets per feature are a power of two kept at most this full, so probe runs stay short.
MAX_LOAD = 0.7
# Evicting for room frees this share of capacity at once: one scan of the feature then pays for many
# insertions instead of one.
EVICT_FRACTION = 0.01
# Rows of flat storage views: (weights [R, D] float32, momentum [R] float32) for given allocations.
RowViews = Callable[[list[int]], tuple[np.ndarray, np.ndarray]]


class ArrayRows:
    """``RowViews`` over plain NumPy arrays, re-made (zeroed) when the allocation changes.

    For exercising a ``SlotMap`` without a fused kernel behind it: tests and the map benchmark.
    """

    def __init__(self, dim: int) -> None:
        self.weights, self.momentum = np.zeros((0, dim), np.float32), np.zeros(0, np.float32)

    def __call__(self, allocations: list[int]) -> tuple[np.ndarray, np.ndarray]:
        if sum(allocations) != len(self.momentum):
            self.weights = np.zeros((sum(allocations), self.weights.shape[1]), np.float32)
            self.momentum = np.zeros(sum(allocations), np.float32)
        return self.weights, self.momentum


_COUNTER_NAMES = {ADMITTED: "admitted", REJECTED: "rejected", REJECTED_FULL: "rejected_full",
                  EXPIRED: "expired", EVICTED: "evicted"}


class SlotMap:
    """ID -> row maps for the F features of one table, with admission, growth, eviction and expiry.

    Args:
        num_features: F.
        capacity: most rows one feature may hold.
        initial_rows: rows allocated per feature at first; a full feature doubles up to ``capacity``.
        min_count: sightings before an ID gets a row (0 or 1: at once).
        filter_width: counters per row of the frequency filter (unused when ``min_count <= 1``).
        eviction: what a full feature at ``capacity`` does with a new ID: "none" refuses it, "lru"
            frees the least recently updated rows, "lfu" the least often updated.
        seed: salts the per-feature hashes (row initialisation, filter).
        track_changes: keep the IDs freed since the last :meth:`take_changes` (for row deltas).
    """

    def __init__(self, num_features: int, capacity: int, initial_rows: int, min_count: int,
                 filter_width: int, eviction: Eviction, seed: int, track_changes: bool) -> None:
        if not 1 <= initial_rows <= capacity < 2**31:
            raise ValueError(f"need 1 <= initial_rows ({initial_rows}) <= capacity ({capacity}) < 2**31")
        if not 0 <= min_count <= 255:
            raise ValueError(f"min_count must be in [0, 255] (8-bit filter counters), got {min_count}")
        sketch_width(filter_width)
        self.capacity, self.min_count, self.eviction = capacity, min_count, eviction
        self.track_changes = track_changes
        self.salts = feature_salts(seed, num_features)
        self.layout = np.zeros((num_features, 6), dtype=np.int64)
        self.counters = np.zeros((num_features, 5), dtype=np.int64)
        self.rows = np.zeros((0, 4), dtype=np.int64)
        self.free = np.zeros(0, dtype=np.int32)
        self.buckets = np.zeros((0, 2), dtype=np.int64)
        if min_count > 1:
            self.sketch, self.sketch_adds = new_sketch(filter_width)
        else:
            self.sketch, self.sketch_adds = np.zeros((DEPTH, 0), dtype=np.uint8), np.zeros(1, dtype=np.int64)
        self._freed: list[list[np.ndarray]] = [[] for _ in range(num_features)]
        self._relayout(np.full(num_features, initial_rows, dtype=np.int64))

    def allocations(self) -> list[int]:
        """Rows allocated per feature (what the row storage must hold)."""
        return [int(a) for a in self.layout[:, ROW_ALLOC]]

    def find(self, values: np.ndarray, bounds: np.ndarray) -> np.ndarray:
        """Local rows of ``values`` ([N] int64, feature segments ``bounds`` [F + 1]); -1 where none."""
        out = np.empty(values.shape[0], dtype=np.int64)
        idmap.find_rows(values, bounds, self.layout, self.buckets, out)
        return out

    def assign(self, values: np.ndarray, bounds: np.ndarray, now: int, init_bound: float,
               views: RowViews) -> np.ndarray:
        """Find-or-insert a training batch: like :meth:`find`, but touches rows and admits new IDs.

        ``views`` is called with the allocations before the first insert and after each growth.
        """
        out = np.empty(values.shape[0], dtype=np.int64)
        full = np.zeros(len(self.salts), dtype=bool)
        start = 0
        weights, momentum = views(self.allocations())
        while True:
            can_stop = ((self.layout[:, ROW_ALLOC] < self.capacity) | (self.eviction != "none")) & ~full
            start = idmap.assign_rows(
                values, bounds, start, can_stop.astype(np.uint8), now, self.min_count, self.salts,
                init_bound, self.layout, self.counters, self.buckets, self.rows, self.free,
                self.sketch, self.sketch_adds, weights, momentum, out,
            )
            if start == values.shape[0]:
                return out
            f = int(np.searchsorted(bounds, start, side="right")) - 1
            if self.layout[f, ROW_ALLOC] < self.capacity:
                self._grow(f, values[start:], np.maximum(bounds - start, 0))
                weights, momentum = views(self.allocations())
            elif self._make_room(f, out[bounds[f]:start]) == 0:
                full[f] = True

    def expire(self, now: int, ttl: int) -> int:
        """Free every row idle longer than ``ttl`` at data time ``now``; returns how many."""
        total = 0
        for f in range(len(self.salts)):
            idle = idmap.idle_rows(f, now, ttl, self.layout, self.rows)
            if idle.size:
                self._release(f, idle, EXPIRED)
                total += idle.size
        return total

    def live(self, f: int) -> tuple[np.ndarray, np.ndarray]:
        """Feature ``f``'s live IDs and their local rows, both [n] int64, in row order."""
        seg = self._segment(f)
        local = np.flatnonzero(seg[:, COUNT] > 0)
        return seg[local, KEY].copy(), local

    def take_changes(self, f: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Feature ``f``'s rows updated and IDs freed since the last call; clears both records.

        Returns:
            (touched IDs [n] int64, their local rows [n] int64, freed IDs [m] int64). An ID freed and
            re-admitted since the last call is in both: apply the frees first. Freed IDs are only
            recorded with ``track_changes``.
        """
        seg = self._segment(f)
        local = np.flatnonzero(seg[:, DIRTY] > 0)
        seg[local, DIRTY] = 0
        freed = np.concatenate(self._freed[f]) if self._freed[f] else np.zeros(0, dtype=np.int64)
        self._freed[f] = []
        return seg[local, KEY].copy(), local, freed

    def stats(self) -> dict[str, float]:
        """Totals over features: rows live and allocated, cumulative filter and eviction counts."""
        out = {"rows_live": float(self.layout[:, LIVE].sum()),
               "rows_allocated": float(self.layout[:, ROW_ALLOC].sum())}
        out.update({name: float(self.counters[:, c].sum()) for c, name in _COUNTER_NAMES.items()})
        return out

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of the ID map (buckets, per-row metadata, free stacks) and of the filter."""
        keys = self.buckets.nbytes + self.rows.nbytes + self.free.nbytes + self.layout.nbytes
        return {"key_bytes": keys, "filter_bytes": self.sketch.nbytes}

    def state(self) -> dict[str, torch.Tensor]:
        """A copy of everything, as tensors (``torch.load(weights_only=True)`` reads them back)."""
        freed = [np.concatenate(x) if x else np.zeros(0, dtype=np.int64) for x in self._freed]
        arrays = {"salts": self.salts, "layout": self.layout, "counters": self.counters, "rows": self.rows,
                  "free": self.free, "buckets": self.buckets, "sketch": self.sketch, "sketch_adds": self.sketch_adds,
                  "freed": np.concatenate(freed), "freed_counts": np.array([x.size for x in freed])}
        return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a :meth:`state` snapshot exactly (its allocations may differ from the current ones)."""
        arrays = {k: v.numpy().copy() for k, v in state.items()}
        if arrays["layout"].shape != self.layout.shape:
            raise ValueError(f"snapshot has {arrays['layout'].shape[0]} features, table has {len(self.salts)}")
        self.salts, self.layout, self.counters = arrays["salts"], arrays["layout"], arrays["counters"]
        self.rows, self.free, self.buckets = arrays["rows"], arrays["free"], arrays["buckets"]
        self.sketch, self.sketch_adds = arrays["sketch"], arrays["sketch_adds"]
        cuts = np.cumsum(arrays["freed_counts"])[:-1]
        self._freed = [[x] if x.size else [] for x in np.split(arrays["freed"], cuts)]

    def _segment(self, f: int) -> np.ndarray:
        base = self.layout[f, ROW_BASE]
        return self.rows[base:base + self.layout[f, ROW_ALLOC]]

    def _grow(self, f: int, rest: np.ndarray, rest_bounds: np.ndarray) -> None:
        """Grow full feature ``f`` and every feature that may run out of rows in the ``rest`` of the batch.

        Each growth re-lays all row storage, so one growth should cover the batch: a feature whose
        free rows are fewer than its unknown IDs still to come grows to at least double, and to fit them.
        """
        alloc, live = self.layout[:, ROW_ALLOC], self.layout[:, LIVE]
        missing = self.find(rest, rest_bounds) == EMPTY
        unknown = np.array([np.unique(rest[lo:hi][missing[lo:hi]]).size  # [F] most rows still to admit
                            for lo, hi in zip(rest_bounds[:-1], rest_bounds[1:])])
        short = (alloc - live < unknown) | (np.arange(len(alloc)) == f)
        target = np.where(short, np.maximum(alloc * 2, live + unknown), alloc)
        self._relayout(np.minimum(target, self.capacity))

    def _make_room(self, f: int, batch_rows: np.ndarray) -> int:
        """Evict the least recently (LRU) or least often (LFU) updated rows of full feature ``f``,
        sparing ``batch_rows`` (rows this batch already uses); returns how many were freed."""
        seg = self._segment(f)
        candidates = seg[:, COUNT] > 0
        candidates[batch_rows[batch_rows >= 0]] = False
        local = np.flatnonzero(candidates)
        k = min(local.size, max(1, int(self.capacity * EVICT_FRACTION)))
        if k == 0:
            return 0
        score = seg[local, TIME if self.eviction == "lru" else COUNT]
        victims = local if k == local.size else local[np.argpartition(score, k - 1)[:k]]
        self._release(f, victims, EVICTED)
        return k

    def _release(self, f: int, local: np.ndarray, counter: int) -> None:
        keys = idmap.free_rows(f, local.astype(np.int64), self.layout, self.buckets, self.rows, self.free)
        self.counters[f, counter] += local.size
        if self.track_changes:
            self._freed[f].append(keys)

    def _relayout(self, allocs: np.ndarray) -> None:
        """Move every feature's segments into fresh flat arrays sized for ``allocs`` (never smaller)."""
        old_layout, old_rows, old_free, old_buckets = self.layout, self.rows, self.free, self.buckets
        layout = old_layout.copy()
        nbuckets = np.array([_bucket_count(a) for a in allocs], dtype=np.int64)
        layout[:, ROW_ALLOC], layout[:, ROW_BASE] = allocs, np.cumsum(allocs) - allocs
        layout[:, BUCKET_MASK], layout[:, BUCKET_BASE] = nbuckets - 1, np.cumsum(nbuckets) - nbuckets
        rows, free = np.zeros((allocs.sum(), 4), dtype=np.int64), np.zeros(allocs.sum(), dtype=np.int32)
        buckets = np.zeros((nbuckets.sum(), 2), dtype=np.int64)
        buckets[:, 1] = EMPTY
        for f in range(layout.shape[0]):
            old_base, base, old_alloc = old_layout[f, ROW_BASE], layout[f, ROW_BASE], old_layout[f, ROW_ALLOC]
            rows[base:base + old_alloc] = old_rows[old_base:old_base + old_alloc]
            top = old_layout[f, FREE_TOP]
            free[base:base + top] = old_free[old_base:old_base + top]
            # New rows go on top of the stack, lowest first, so a growing table fills rows in order.
            free[base + top:base + top + allocs[f] - old_alloc] = np.arange(allocs[f] - 1, old_alloc - 1, -1)
            layout[f, FREE_TOP] = top + allocs[f] - old_alloc
            if old_layout[f, BUCKET_MASK] == layout[f, BUCKET_MASK]:
                ob, nb = old_layout[f, BUCKET_BASE], layout[f, BUCKET_BASE]
                buckets[nb:nb + nbuckets[f]] = old_buckets[ob:ob + nbuckets[f]]
        self.layout, self.rows, self.free, self.buckets = layout, rows, free, buckets
        for f in range(layout.shape[0]):
            if old_layout[f, BUCKET_MASK] != layout[f, BUCKET_MASK]:
                idmap.rehash(f, self.layout, self.buckets, self.rows)


def _bucket_count(rows: int) -> int:
    """The smallest power of two (at least 8) that holds ``rows`` keys at most MAX_LOAD full."""
    return max(8, 1 << int(np.ceil(rows / MAX_LOAD) - 1).bit_length())
