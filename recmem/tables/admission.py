"""The frequency filter of collisionless tables: a count-min sketch of small saturating counters.

An ID that has no row yet is counted here; it is admitted (given a row) on the sighting that brings its
estimated count to ``min_count``. Memory is fixed: ``DEPTH`` rows of ``width`` uint8 counters
(``DEPTH * width`` bytes per table), whatever the number of distinct IDs.

Count-min only over-estimates, so an ID is never admitted *late*; the error is a *false admission*: an
ID admitted before its ``min_count``-th sighting because every one of its ``DEPTH`` counters is shared
with other IDs. Updates are conservative (only the counters at the current minimum grow), which makes
a counter hold roughly the largest count among the IDs hashed onto it rather than their sum. For an ID
seen for the first time, with ``n`` distinct IDs counted since the last aging, the chance that it is
admitted at once under ``min_count = 2`` is therefore about::

    (1 - exp(-n / width)) ** DEPTH

and it falls quickly as ``min_count`` grows. Counters age: every ``width // 4`` counted sightings all
counters are halved (TinyLFU's reset), so ``n <= width / 4`` and the rate above stays below
``(1 - exp(-1/4)) ** 4 = 0.24 %`` at its worst (just before a halving) and is lower on average.
Aging also means an ID must collect its sightings within a window of about ``width / 4`` counted
sightings of not-yet-admitted IDs; size ``width`` to the stream (tests/test_admission.py measures both).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from recmem.tables.idhash import derive

DEPTH = 4
SATURATED = 255


def sketch_width(width: int) -> int:
    """Validate a counter-row width: a power of two, at least 64."""
    if width < 64 or width & (width - 1):
        raise ValueError(f"filter width must be a power of two >= 64, got {width}")
    return width


def new_sketch(width: int) -> tuple[np.ndarray, np.ndarray]:
    """Empty counters [DEPTH, width] uint8 and the aging state [1] int64 (sightings since last halving)."""
    return np.zeros((DEPTH, sketch_width(width)), dtype=np.uint8), np.zeros(1, dtype=np.int64)


@njit(cache=True, inline="always")
def _index(h: np.uint64, j: int, mask: np.uint64) -> int:
    return np.int64(derive(h, j) & mask)


@njit(cache=True)
def sketch_count(sketch: np.ndarray, adds: np.ndarray, h: np.uint64) -> int:
    """Count one sighting of the item hashed to ``h``; returns its new estimated count.

    Args:
        sketch: [DEPTH, W] uint8 counters, updated in place.
        adds: [1] int64 sightings since the last halving, updated in place.
        h: the item's 64-bit hash (callers mix the table feature into it).
    """
    mask = np.uint64(sketch.shape[1] - 1)
    estimate = SATURATED
    for j in range(DEPTH):
        estimate = min(estimate, np.int64(sketch[j, _index(h, j, mask)]))
    if estimate < SATURATED:
        for j in range(DEPTH):
            k = _index(h, j, mask)
            if sketch[j, k] == estimate:
                sketch[j, k] = estimate + 1
        estimate += 1
    adds[0] += 1
    if adds[0] >= sketch.shape[1] // 4:
        _halve(sketch)
        adds[0] = 0
    return estimate


@njit(cache=True)
def _halve(sketch: np.ndarray) -> None:
    flat = sketch.reshape(-1)
    for k in range(flat.shape[0]):
        flat[k] >>= np.uint8(1)


@njit(cache=True)
def sketch_estimate(sketch: np.ndarray, h: np.uint64) -> int:
    """The estimated count of the item hashed to ``h``: never below its count since the last halving."""
    mask = np.uint64(sketch.shape[1] - 1)
    estimate = SATURATED
    for j in range(DEPTH):
        estimate = min(estimate, np.int64(sketch[j, _index(h, j, mask)]))
    return estimate
