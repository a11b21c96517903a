"""A collisionless table's rows on disk (``options.storage: ssd``): the ID map stays in RAM, the rows
and their Adagrad state move to a :class:`~recmem.tables.ssd.rows.DiskRows`.

Feature f's local row r (what the table's :class:`~recmem.tables.slotmap.SlotMap` assigns) is disk
row ``f * capacity + r``. The map's kernel initialises a newly admitted row in place; here the row
lives on disk, so the kernel gets empty views and the new rows' values are computed from the same
hash (:func:`initial_records`) and handed to the cache, never read (a row is new when the map's
update count shows no update older than this batch). Freed rows (TTL expiry) are
deleted from the cache and the disk. Prefetch only *finds* IDs, so it counts no sightings.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from recmem.tables.idhash import salted, unit_float
from recmem.tables.idmap import COUNT, KEY, ROW_BASE
from recmem.tables.slotmap import SlotMap
from recmem.tables.ssd.rows import DiskRows


@njit(cache=True)
def initial_records(keys: np.ndarray, salts: np.ndarray, dim: int, bound: float) -> np.ndarray:
    """[n] IDs with their features' salts [n] -> [n, D + 1] fresh records: the uniform draw in
    +-``bound`` that the map's kernel gives an admitted row (``idmap._init_row``), and a zero
    accumulator."""
    out = np.zeros((keys.shape[0], dim + 1), dtype=np.float32)
    for i in range(keys.shape[0]):
        h = salted(keys[i], salts[i])
        for d in range(dim):
            out[i, d] = (2.0 * unit_float(h, d) - 1.0) * bound
    return out


def no_views(allocations: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Views for ``SlotMap.assign`` that hold no rows: weights [R, 0] and a stride-0 accumulator, so
    the kernel's writes of a new row's values go nowhere (the values are made by :func:`initial_records`)."""
    rows = sum(allocations)
    weights = np.zeros((rows, 0), dtype=np.float32)
    momentum = np.lib.stride_tricks.as_strided(np.zeros(1, dtype=np.float32), shape=(rows,), strides=(0,))
    return weights, momentum


class KeyedDiskRows:
    """The disk side of a collisionless table: its map's rows, by (feature, local row).

    Args:
        disk: F * ``capacity`` rows on disk behind a cache (a store made with ``initialise=False``).
        capacity: rows per feature.
    """

    def __init__(self, disk: DiskRows, capacity: int) -> None:
        self.disk, self.capacity = disk, capacity

    def flat(self, local: np.ndarray, bounds: np.ndarray) -> np.ndarray:
        """[N] local rows (-1: none) of feature segments ``bounds`` [F + 1] -> [N] disk rows (-1 kept)."""
        feature = np.repeat(np.arange(len(bounds) - 1, dtype=np.int64), np.diff(bounds))
        return np.where(local >= 0, feature * self.capacity + local, -1)

    def prefetch(self, slots: SlotMap, values: np.ndarray, bounds: np.ndarray) -> np.ndarray:
        """Pin the rows of the known IDs of an upcoming batch (a lookup: no sighting is counted)."""
        return self.disk.prefetch(self.flat(slots.find(values, bounds), bounds))

    def assign(self, slots: SlotMap, values: np.ndarray, bounds: np.ndarray, now: int,
               init_bound: float) -> np.ndarray:
        """``SlotMap.assign`` for training, giving rows that changed hands their new values here.

        Returns:
            [N] disk rows of ``values``, -1 where an ID has none.
        """
        local = slots.assign(values, bounds, now, init_bound, no_views)
        flat = self.flat(local, bounds)
        rows, occurrences = np.unique(flat[flat >= 0], return_counts=True)
        # A row (re)admitted in this batch has been updated at most once per occurrence since; a row
        # admitted before has more (COUNT is 1 at admission, + 1 per occurrence). Its KEY is its ID.
        meta = slots.rows[slots.layout[rows // self.capacity, ROW_BASE] + rows % self.capacity]  # [U, 4]
        new = meta[:, COUNT] <= occurrences
        if new.any():
            feature = rows[new] // self.capacity
            self.disk.admit(rows[new], initial_records(meta[new, KEY], slots.salts[feature],
                                                       self.disk.store.embedding_dim, init_bound))
        return flat

    def expire(self, slots: SlotMap, now: int, ttl: int) -> int:
        """``SlotMap.expire``, deleting the freed rows from the cache and the disk."""
        live = [slots.live(f)[1] for f in range(len(slots.salts))]
        freed = slots.expire(now, ttl)
        if freed:
            gone = [f * self.capacity + np.setdiff1d(was, slots.live(f)[1]) for f, was in enumerate(live)]
            self.disk.forget(np.concatenate(gone))
        return freed

    def rows(self, feature: int, local: np.ndarray) -> torch.Tensor:
        """[n, D] current weights of feature ``feature``'s local rows."""
        return self.disk.read(feature * self.capacity + np.asarray(local, dtype=np.int64))
