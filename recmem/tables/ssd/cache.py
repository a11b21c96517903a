"""The RAM cache in front of a :class:`~recmem.tables.ssd.store.RowStore`: slots, pins, write-back.

The cached rows live in one fused fbgemm table of ``capacity`` slots trained by exact row-wise
Adagrad inside backward, the same kernel and arithmetic as the in-RAM kinds, so a row is updated
exactly as it would be in RAM. Which row sits in which slot, and which slots are pinned, dirty or
still loading, is plain NumPy kept by the training thread; one background thread (the I/O worker)
runs the disk jobs in order::

    prefetch(rows)  [training thread]: hits pinned; misses get slots from a clock hand (GCLOCK,
                    between LRU and LFU: each batch that asks for a row adds one to its slot's
                    use count, up to USE_CAP; the hand takes one off each used slot it passes
                    and takes free and unused ones; O(misses) per step, not O(cache)); one job
                    queued: write back the evicted dirty rows, then read the misses into their slots
    wait(slots)     [training thread]: block until the jobs loading ``slots`` are done (timed)

A slot is only reused once unpinned, and a pinned slot is only written by the job loading it, so the
I/O worker and the training step never touch the same row. Jobs run in order, so a row evicted and
read back is written before it is read.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from numba import njit

from recmem.tables.fused import FusedRowwiseAdagrad
from recmem.tables.ssd.store import RowStore


# A slot's use count stops here: a row that was hot keeps its place through at most this many turns
# of the hand without use. Against a second-chance bit (1), 3 cut the misses per step by 16% at the
# 75% cache of ``jobs/bench_ssd.py`` (3.2k against 3.8k) and by 5% at its 10% cache; 7 and 15 did
# no better than 3.
USE_CAP = 3


class CacheTooSmall(RuntimeError):
    """The rows pinned by the batches in the window do not fit the cache."""


class RowCache:
    """``capacity`` rows of a store in RAM, evicted by a clock hand among the unpinned ones.

    Args:
        store: the rows on disk (R rows).
        capacity: slots in RAM.
        learning_rate: row-wise Adagrad step size of the fused kernel.
    """

    def __init__(self, store: RowStore, capacity: int, learning_rate: float) -> None:
        self.store, self.capacity = store, capacity
        self.fused = FusedRowwiseAdagrad([capacity], store.embedding_dim, learning_rate, initialise=False)
        self.slot_of = np.full(store.num_rows, -1, dtype=np.int32)  # row -> slot, -1: on disk only
        self.row_of = np.full(capacity, -1, dtype=np.int64)  # slot -> row, -1: free
        self.pins = np.zeros(capacity, dtype=np.int32)
        self.dirty = np.zeros(capacity, dtype=bool)
        self.used = np.zeros(capacity, dtype=np.uint8)  # the clock's use counts: +1 at each pin
        self.loading_job = np.zeros(capacity, dtype=np.int64)  # job that fills the slot (0: none)
        self._hand = 0
        self._jobs: dict[int, Future] = {}
        self._next_job = 1
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recmem-ssd")
        self.counts = dict.fromkeys(("lookups", "lookup_hits", "unique", "unique_hits", "evicted",
                                     "written_back", "wait_seconds", "waits"), 0.0)

    def pin(self, rows: np.ndarray, occurrences: np.ndarray) -> np.ndarray:
        """Pin distinct ``rows`` (reading the missing ones in the background); returns their slots.

        Args:
            rows: [U] distinct int64 rows.
            occurrences: [U] how often each appears in the batch (for the per-lookup hit rate).

        Raises:
            CacheTooSmall: the pinned rows and the misses do not fit, naming the rows needed.
        """
        slots = self.slot_of[rows].astype(np.int64)
        hit = slots >= 0
        self._count(hit, occurrences)
        self.pins[slots[hit]] += 1
        misses = rows[~hit]
        if len(misses):
            victims = self._make_room(len(misses), len(rows))
            slots[~hit] = victims
            self._load(misses, victims)
        _use(self.used, slots, USE_CAP)
        return slots

    def fresh(self, rows: np.ndarray, records: np.ndarray) -> np.ndarray:
        """Pin distinct ``rows`` holding new values [n, D + 1] (rows just given to new IDs): nothing is
        read, the values are dirty until written back; returns their slots."""
        slots = self.slot_of[rows].astype(np.int64)
        cached = slots >= 0
        self.wait(slots[cached])  # a read still on its way must not land over the new values
        self.pins[slots[cached]] += 1
        if not cached.all():
            victims = self._make_room(int((~cached).sum()), len(rows))
            slots[~cached] = victims
            self._load(rows[~cached], victims, read=False)
            self.loading_job[victims] = 0
        self.fused.weights(0).numpy()[slots] = records[:, :-1]
        self.fused.momentum(0).numpy()[slots] = records[:, -1]
        self.dirty[slots] = True
        _use(self.used, slots, USE_CAP)
        return slots

    def forget(self, rows: np.ndarray) -> None:
        """Drop ``rows`` from the cache unwritten and delete them from the store (freed rows)."""
        self.drain()
        slots = self.slot_of[rows]
        held = slots[slots >= 0]
        self.row_of[held] = -1  # a pinned slot is reused once its last pin goes
        self.dirty[held] = False
        self.slot_of[rows] = -1
        self.store.delete(rows)

    def unpin(self, slots: np.ndarray) -> None:
        """Release one pin of each of ``slots``."""
        self.pins[slots] -= 1

    def wait(self, slots: np.ndarray) -> None:
        """Block until ``slots`` hold their rows; the time spent counts as prefetch wait."""
        job = int(self.loading_job[slots].max(initial=0))
        if job in self._jobs and not self._jobs[job].done():
            started = time.perf_counter()
            for done in [j for j in self._jobs if j <= job]:  # jobs finish in order
                self._jobs.pop(done).result()
            self.counts["wait_seconds"] += time.perf_counter() - started
            self.counts["waits"] += 1
        for done in [j for j in self._jobs if j <= job]:  # already finished: collect (and raise) them
            self._jobs.pop(done).result()

    def drain(self) -> None:
        """Finish every queued job."""
        for job in sorted(self._jobs):
            self._jobs.pop(job).result()

    def flush(self) -> None:
        """Write every dirty row back (the rows stay cached, now clean)."""
        self.drain()
        slots = np.flatnonzero(self.dirty)
        self.store.write(self.row_of[slots], self._records(slots))
        self.dirty[slots] = False
        self.counts["written_back"] += len(slots)

    def clear(self) -> None:
        """Forget every cached row without writing it back (a restore replaces them)."""
        self.drain()
        cached = self.row_of >= 0
        self.slot_of[self.row_of[cached]] = -1
        self.row_of[:] = -1
        self.pins[:] = 0
        self.dirty[:] = False

    def _count(self, hit: np.ndarray, occurrences: np.ndarray) -> None:
        c = self.counts
        c["unique"] += len(hit)
        c["unique_hits"] += int(hit.sum())
        c["lookups"] += int(occurrences.sum())
        c["lookup_hits"] += int(occurrences[hit].sum())

    def _make_room(self, needed: int, window_rows: int) -> np.ndarray:
        """``needed`` unpinned slots where the clock hand finds them (evicting their rows), pinned."""
        victims, self._hand = _clock(self.row_of, self.pins, self.used, self._hand, needed)
        if len(victims) < needed:
            self.pins[victims] = 0
            pinned = int((self.pins > 0).sum())
            raise CacheTooSmall(
                f"the batches in the prefetch window pin {pinned + needed} rows, more than the cache's "
                f"{self.capacity} (this batch alone {window_rows}); options.cache_rows must be at least "
                f"{pinned + needed} for this data, or fewer batches ahead (train.prefetch_batches)")
        return victims

    def _load(self, rows: np.ndarray, slots: np.ndarray, read: bool = True) -> None:
        """Queue a job writing back the dirty rows leaving ``slots`` and (if ``read``) reading ``rows``
        into them."""
        leaving = self.row_of[slots]
        evicted = leaving >= 0
        self.slot_of[leaving[evicted]] = -1
        out_slots = slots[evicted & self.dirty[slots]]
        out_rows, out_records = self.row_of[out_slots], self._records(out_slots)  # copied now
        self.counts["evicted"] += int(evicted.sum())
        self.counts["written_back"] += len(out_slots)
        self.slot_of[rows] = slots
        self.row_of[slots] = rows
        self.dirty[slots] = False
        self.pins[slots] = 1
        job = self._next_job
        self._next_job += 1
        self.loading_job[slots] = job
        empty = np.zeros(0, dtype=np.int64)
        self._jobs[job] = self._worker.submit(self._run, out_rows, out_records, rows if read else empty,
                                              slots if read else empty)

    def _run(self, out_rows: np.ndarray, out_records: np.ndarray, rows: np.ndarray, slots: np.ndarray) -> None:
        """I/O worker: write back, then read ``rows`` into ``slots`` of the fused kernel."""
        self.store.write(out_rows, out_records)
        records = self.store.read(rows)  # [n, D + 1]
        # Through NumPy: the weights are saved for the step's backward, and a torch write would bump
        # their version counter although it only touches rows that step does not use.
        self.fused.weights(0).numpy()[slots] = records[:, :-1]
        self.fused.momentum(0).numpy()[slots] = records[:, -1]

    def _records(self, slots: np.ndarray) -> np.ndarray:
        """[n, D + 1] copies of the cached rows and Adagrad state of ``slots``."""
        index = torch.from_numpy(slots)
        weights, momentum = self.fused.weights(0)[index], self.fused.momentum(0)[index]
        return torch.cat([weights, momentum[:, None]], dim=1).numpy()

    def memory_bytes(self) -> int:
        """Cached rows and state, and the bookkeeping arrays (the row -> slot map is 4 bytes a row)."""
        arrays = (self.slot_of, self.row_of, self.pins, self.dirty, self.used, self.loading_job)
        return self.fused.memory_bytes() + sum(a.nbytes for a in arrays)

    def close(self) -> None:
        """Finish the queued jobs, stop the I/O worker and close the store (dirty rows are not written)."""
        self.drain()
        self._worker.shutdown()
        self.store.close()


@njit(cache=True)
def _clock(row_of: np.ndarray, pins: np.ndarray, used: np.ndarray, hand: int, needed: int) -> tuple[np.ndarray, int]:
    """Advance the hand over the slots until ``needed`` unpinned ones are found: a free or unused slot
    is taken, a used one loses one use and is passed over. Taken slots are pinned (so a later turn of
    the hand skips them). USE_CAP + 1 turns find every unpinned slot, so fewer than ``needed`` means
    the cache is too small; returns (the slots found, the hand)."""
    n = row_of.shape[0]
    out = np.empty(needed, dtype=np.int64)
    found = 0
    for _ in range((USE_CAP + 1) * n):
        if found == needed:
            break
        slot = hand
        hand = hand + 1 if hand + 1 < n else 0
        if pins[slot] > 0:
            continue
        if row_of[slot] >= 0 and used[slot] > 0:
            used[slot] -= 1
            continue
        pins[slot] = 1
        out[found] = slot
        found += 1
    return out[:found], hand


@njit(cache=True)
def _use(used: np.ndarray, slots: np.ndarray, cap: int) -> None:
    """One more use of each of ``slots``, counted up to ``cap``."""
    for slot in slots:
        if used[slot] < cap:
            used[slot] += 1
