"""Numba kernels of the collisionless ID -> row map: batch find, batch find-or-insert, row freeing.

All F features of a table share flat arrays; feature ``f`` owns a contiguous segment of each, located
by its row of ``layout``::

    layout  [F, 6] int64   ROW_BASE, ROW_ALLOC, BUCKET_BASE, BUCKET_MASK, FREE_TOP, LIVE
    counters[F, 5] int64   ADMITTED, REJECTED, REJECTED_FULL, EXPIRED, EVICTED (cumulative)
    buckets [NB, 2] int64  (KEY, ROW) open-addressing buckets, ROW = EMPTY when free; feature f owns
                           buckets[BUCKET_BASE : BUCKET_BASE + BUCKET_MASK + 1], a power of two
    rows    [R, 4] int64   KEY, TIME (data time of last update), COUNT (updates; 0 = row is free),
                           DIRTY (touched since the last ``take_changes``); feature f owns
                           rows[ROW_BASE : ROW_BASE + ROW_ALLOC], indexed by its *local* row
    free    [R] int32      per-feature stack of free local rows, FREE_TOP entries from ROW_BASE

Local rows are what the fused embedding kernel takes as indices, and ``ROW_BASE + local`` is also the
row's position in the kernel's flat weight and optimizer buffers (tables are stored back to back).

The map is linear probing with *backward-shift* deletion (Knuth's Algorithm R): a deleted entry's
followers are moved back into the hole, so there are no tombstones, lookups never slow down with
churn, and the load stays what ``live / buckets`` says. A bucket keeps the key next to the row, so a
lookup costs one cache line in the common case.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import cgutils, types
from numba.extending import intrinsic

from recmem.tables.admission import sketch_count
from recmem.tables.idhash import mix64, salted, unit_float

ROW_BASE, ROW_ALLOC, BUCKET_BASE, BUCKET_MASK, FREE_TOP, LIVE = range(6)
ADMITTED, REJECTED, REJECTED_FULL, EXPIRED, EVICTED = range(5)
KEY, TIME, COUNT, DIRTY = range(4)
EMPTY = -1
_COUNT_MAX = 2**62
# Buckets are prefetched this many IDs ahead of their lookup: a random bucket is a cache (and often
# TLB) miss, and overlapping the misses of many IDs is what makes a batch of lookups fast (10M rows:
# median 60M IDs/s at 32 ahead, 25M at 8, 12-20M without, on a shared 2-core VM).
_AHEAD = 32


@intrinsic
def _prefetch(typingctx, array, row):
    """Hint the CPU to fetch ``array[row, 0]`` into cache (LLVM's prefetch: read, high locality)."""

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        zero = context.get_constant(types.intp, 0)
        ptr = cgutils.get_item_pointer(context, builder, signature.args[0], ary, [args[1], zero])
        if not getattr(ptr.type, "is_opaque", False):  # LLVM builds with typed pointers
            ptr = builder.bitcast(ptr, ir.IntType(8).as_pointer())
        name = "llvm.prefetch.p0" if getattr(ptr.type, "is_opaque", False) else "llvm.prefetch.p0i8"
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32]), name
        )
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(array, row), codegen


@njit(cache=True, inline="always")
def _home(key: np.int64, mask: np.int64) -> np.int64:
    return np.int64(mix64(key) & np.uint64(mask))


@njit(cache=True, inline="always")
def probe(buckets: np.ndarray, base: np.int64, mask: np.int64, key: np.int64) -> np.int64:
    """The bucket holding ``key``, else the empty bucket ending its probe run (where it would go)."""
    i = _home(key, mask)
    while True:
        b = base + i
        if buckets[b, 1] == EMPTY or buckets[b, 0] == key:
            return b
        i = (i + 1) & mask


@njit(cache=True)
def delete_bucket(buckets: np.ndarray, base: np.int64, mask: np.int64, b: np.int64) -> None:
    """Empty occupied bucket ``b`` and shift back the entries whose probe run crossed it."""
    hole = b - base
    j = hole
    while True:
        j = (j + 1) & mask
        if buckets[base + j, 1] == EMPTY:
            break
        home = _home(buckets[base + j, 0], mask)
        # The entry at j may fill the hole unless its home lies cyclically in (hole, j].
        if (j > hole and (home <= hole or home > j)) or (j < hole and home <= hole and home > j):
            buckets[base + hole, 0] = buckets[base + j, 0]
            buckets[base + hole, 1] = buckets[base + j, 1]
            hole = j
    buckets[base + hole, 1] = EMPTY


@njit(cache=True)
def find_rows(values: np.ndarray, bounds: np.ndarray, layout: np.ndarray, buckets: np.ndarray,
              out: np.ndarray) -> None:
    """Look up IDs without changing anything (evaluation).

    Args:
        values: [N] int64 raw IDs, feature-major as in a KJT.
        bounds: [F + 1] int64, feature f's IDs are values[bounds[f]:bounds[f + 1]].
        out: [N] int64, set to each ID's local row or EMPTY (-1) when it has none.
    """
    for f in range(bounds.shape[0] - 1):
        base, mask, hi = layout[f, BUCKET_BASE], layout[f, BUCKET_MASK], bounds[f + 1]
        for i in range(bounds[f], hi):
            if i + _AHEAD < hi:
                _prefetch(buckets, base + _home(values[i + _AHEAD], mask))
            out[i] = buckets[probe(buckets, base, mask, values[i]), 1]


@njit(cache=True)
def assign_rows(values, bounds, start, can_stop, now, min_count, salts, init_bound,
                layout, counters, buckets, rows, free, sketch, sketch_adds, weights, momentum, out):
    """Find-or-insert for training, from position ``start`` on; returns where it stopped.

    A known ID's row is touched (TIME = max(TIME, now), COUNT + 1, DIRTY). An unknown ID is counted by
    the frequency filter; once admitted it takes a free row, which is re-initialised (a uniform draw
    in +-``init_bound`` that depends only on the salt and the ID) with a zero Adagrad accumulator.

    The kernel returns early, before changing anything for that ID, at the first unknown ID of a
    feature with no free row whose ``can_stop`` flag is set, so the caller can grow the feature or
    evict some rows and call again from there. Otherwise it returns N (done); an admitted ID that
    finds no free row is then dropped and counted as REJECTED_FULL.

    Args:
        values, bounds: as in :func:`find_rows`.
        can_stop: [F] uint8, whether a full feature should hand back control.
        salts: [F] int64 per-feature hash salts.
        weights: [R, D] float32 flat rows of all features; momentum: [R] float32.
        out: [N] int64 local rows, EMPTY for IDs that get none (not admitted, or no room).
    """
    for f in range(bounds.shape[0] - 1):
        base, bbase, mask = layout[f, ROW_BASE], layout[f, BUCKET_BASE], layout[f, BUCKET_MASK]
        hi = bounds[f + 1]
        for i in range(max(bounds[f], start), hi):
            _prefetch_rows(values, i, hi, base, bbase, mask, buckets, rows)
            key = values[i]
            b = probe(buckets, bbase, mask, key)
            row = buckets[b, 1]
            if row != EMPTY:
                g = base + row
                rows[g, TIME] = max(rows[g, TIME], now)
                rows[g, COUNT] = min(rows[g, COUNT] + 1, _COUNT_MAX)
                rows[g, DIRTY] = 1
                out[i] = row
                continue
            if layout[f, FREE_TOP] == 0 and can_stop[f]:
                return i
            out[i] = EMPTY
            if min_count > 1 and sketch_count(sketch, sketch_adds, salted(key, salts[f])) < min_count:
                counters[f, REJECTED] += 1
                continue
            if layout[f, FREE_TOP] == 0:
                counters[f, REJECTED_FULL] += 1
                continue
            layout[f, FREE_TOP] -= 1
            row = free[base + layout[f, FREE_TOP]]
            buckets[b, 0] = key
            buckets[b, 1] = row
            _init_row(base + row, key, salts[f], now, init_bound, rows, weights, momentum)
            layout[f, LIVE] += 1
            counters[f, ADMITTED] += 1
            out[i] = row
    return values.shape[0]


@njit(cache=True, inline="always")
def _prefetch_rows(values, i, hi, base, bbase, mask, buckets, rows) -> None:
    """Two-stage prefetch for find-or-insert: the bucket of ID i + _AHEAD, and the row metadata of
    ID i + _AHEAD / 2, whose bucket the first stage fetched."""
    if i + _AHEAD < hi:
        _prefetch(buckets, bbase + _home(values[i + _AHEAD], mask))
    j = i + _AHEAD // 2
    if j < hi:
        b = bbase + _home(values[j], mask)
        if buckets[b, 0] == values[j] and buckets[b, 1] != EMPTY:
            _prefetch(rows, base + buckets[b, 1])


@njit(cache=True, inline="always")
def _init_row(g, key, salt, now, init_bound, rows, weights, momentum) -> None:
    rows[g, KEY] = key
    rows[g, TIME] = now
    rows[g, COUNT] = 1
    rows[g, DIRTY] = 1
    h = salted(key, salt)
    for d in range(weights.shape[1]):
        weights[g, d] = (2.0 * unit_float(h, d) - 1.0) * init_bound
    momentum[g] = 0.0


@njit(cache=True)
def free_rows(f: int, local_rows: np.ndarray, layout: np.ndarray, buckets: np.ndarray,
              rows: np.ndarray, free: np.ndarray) -> np.ndarray:
    """Release live rows of feature ``f``: drop their IDs from the map and push them on the free stack.

    Returns:
        [len(local_rows)] int64, the IDs that held them.
    """
    base, bbase, mask = layout[f, ROW_BASE], layout[f, BUCKET_BASE], layout[f, BUCKET_MASK]
    keys = np.empty(local_rows.shape[0], dtype=np.int64)
    for n in range(local_rows.shape[0]):
        g = base + local_rows[n]
        keys[n] = rows[g, KEY]
        delete_bucket(buckets, bbase, mask, probe(buckets, bbase, mask, keys[n]))
        rows[g, COUNT] = 0
        rows[g, DIRTY] = 0
        free[base + layout[f, FREE_TOP]] = local_rows[n]
        layout[f, FREE_TOP] += 1
        layout[f, LIVE] -= 1
    return keys


@njit(cache=True)
def idle_rows(f: int, now: int, ttl: int, layout: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Local rows of feature ``f`` that are live and idle longer than ``ttl`` at data time ``now``."""
    base = layout[f, ROW_BASE]
    found = np.empty(layout[f, LIVE], dtype=np.int64)
    n = 0
    for r in range(layout[f, ROW_ALLOC]):
        if rows[base + r, COUNT] > 0 and now - rows[base + r, TIME] > ttl:
            found[n] = r
            n += 1
    return found[:n]


@njit(cache=True)
def rehash(f: int, layout: np.ndarray, buckets: np.ndarray, rows: np.ndarray) -> None:
    """Insert every live row of feature ``f`` into its (empty) bucket segment."""
    base, bbase, mask = layout[f, ROW_BASE], layout[f, BUCKET_BASE], layout[f, BUCKET_MASK]
    for r in range(layout[f, ROW_ALLOC]):
        if rows[base + r, COUNT] > 0:
            b = probe(buckets, bbase, mask, rows[base + r, KEY])
            buckets[b, 0] = rows[base + r, KEY]
            buckets[b, 1] = r

