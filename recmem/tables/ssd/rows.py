"""Rows on disk behind a RAM cache, for a table that maps its IDs to row numbers itself.

``SSDTable`` (rows ``id mod n``) and a collisionless table with ``options.storage: ssd`` (rows its
ID map assigns) both keep their rows here: they turn a batch's IDs into row numbers and hand those
over; this module fetches, pins, pools, writes back and checkpoints the rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from recmem.tables.ssd.cache import RowCache
from recmem.tables.ssd.store import RowStore


class DiskRows:
    """A row store and its cache, driven by row numbers.

    Args:
        store: the rows on disk.
        cache_rows: slots in RAM.
        learning_rate: row-wise Adagrad step size.
    """

    def __init__(self, store: RowStore, cache_rows: int, learning_rate: float) -> None:
        self.cache = RowCache(store, cache_rows, learning_rate)
        self.store = store
        self._held: list[np.ndarray] = []  # slots a forward pinned itself, released at the next one
        self.steps = 0

    def prefetch(self, rows: np.ndarray) -> np.ndarray:
        """Pin the distinct rows of [N] ``rows`` (-1 entries skipped) and start reading the missing
        ones; returns the ticket (their slots) for :meth:`release`."""
        unique, counts = np.unique(rows[rows >= 0], return_counts=True)
        return self.cache.pin(unique, counts)

    def release(self, ticket: np.ndarray) -> None:
        """Unpin the rows of one :meth:`prefetch`."""
        self.cache.unpin(ticket)

    def admit(self, rows: np.ndarray, records: np.ndarray) -> None:
        """Give distinct ``rows`` new values [n, D + 1] (weights, Adagrad state): rows just assigned
        to new IDs, held in RAM until the next forward at least."""
        if len(rows):
            self._held.append(self.cache.fresh(rows, records))

    def pool(self, rows: np.ndarray, offsets: torch.Tensor, training: bool) -> torch.Tensor:
        """Sum-pool [N] rows (all >= 0) per bag of ``offsets`` [bags + 1] -> [bags, 1, D].

        Rows nobody prefetched are fetched now; the call waits (timed) for rows still on their way.
        In training the rows are marked dirty: the fused optimizer updates them in backward.
        """
        for slots in self._held:
            self.cache.unpin(slots)
        self._held = []
        slots = self.cache.slot_of[rows].astype(np.int64)
        if (slots < 0).any():  # not prefetched (evaluation, or no lookahead): fetch now
            unique, inverse, counts = np.unique(rows, return_inverse=True, return_counts=True)
            held = self.cache.pin(unique, counts)
            self._held.append(held)
            slots = held[inverse]
        self.cache.wait(slots)
        if training:
            self.cache.dirty[slots] = True
            self.steps += 1
        return self.cache.fused(torch.from_numpy(slots), offsets)

    def forget(self, rows: np.ndarray) -> None:
        """Delete ``rows`` from the cache and the disk (rows freed by their table)."""
        self.cache.forget(rows)

    def read(self, rows: np.ndarray) -> torch.Tensor:
        """[n, D] current weights of ``rows`` (dirty ones written back first)."""
        self.cache.flush()
        return torch.from_numpy(self.store.read(rows)[:, :-1].copy())

    def commit(self) -> dict[str, Any]:
        """Write every dirty row back and commit the file (see ``RowStore.commit``)."""
        self.cache.flush()
        return self.store.commit()

    def restore(self, state: dict[str, Any]) -> None:
        """Point at a committed generation's records and empty the cache."""
        self.cache.clear()
        self._held = []
        self.store.restore(state)

    def memory_bytes(self) -> int:
        """RAM: cached rows and Adagrad state, the cache's bookkeeping, the store's row map."""
        return self.cache.memory_bytes() + self.store.memory_bytes()

    def stats(self) -> dict[str, float]:
        """Cache hit rates (per lookup and per unique row, when each batch was first asked for),
        misses and disk bytes per training step, prefetch wait, evictions, bytes on disk and in RAM.
        Counters restart after each call."""
        c, store = self.cache.counts, self.store
        steps = max(self.steps, 1)
        out = {"cache_hit_rate": c["lookup_hits"] / max(c["lookups"], 1),
               "cache_unique_hit_rate": c["unique_hits"] / max(c["unique"], 1),
               "misses_per_step": (c["unique"] - c["unique_hits"]) / steps,
               "prefetch_wait_seconds": c["wait_seconds"], "prefetch_waits": c["waits"],
               "read_bytes_per_step": store.bytes_read / steps, "written_bytes_per_step": store.bytes_written / steps,
               "rows_evicted": c["evicted"], "rows_written_back": c["written_back"],
               "rows_compacted": float(store.rows_compacted),
               "disk_bytes": float(store.disk_bytes()), "cache_rows": float(self.cache.capacity)}
        for k in c:
            c[k] = 0.0
        store.bytes_read = store.bytes_written = store.rows_compacted = 0
        self.steps = 0
        return out

    def close(self) -> None:
        """Stop the I/O worker and let go of the folder (rows not written back are dropped)."""
        self.cache.close()
