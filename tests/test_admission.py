"""The frequency filter: never admits late, false admissions at the documented rate, bounded memory."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from recmem.tables.admission import DEPTH, new_sketch, sketch_count, sketch_estimate
from recmem.tables.idhash import salted


@njit(cache=True)
def _count_all(sketch, adds, keys, salt):
    out = np.empty(keys.shape[0], dtype=np.int64)
    for i in range(keys.shape[0]):
        out[i] = sketch_count(sketch, adds, salted(keys[i], salt))
    return out


@njit(cache=True)
def _estimate_all(sketch, keys, salt):
    out = np.empty(keys.shape[0], dtype=np.int64)
    for i in range(keys.shape[0]):
        out[i] = sketch_estimate(sketch, salted(keys[i], salt))
    return out


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=300), st.integers(0, 2**62))
def test_estimate_never_below_true_count(stream: list[int], salt: int) -> None:
    sketch, adds = new_sketch(1 << 12)  # 300 sightings < width / 4: no halving in between
    keys = np.array(stream, dtype=np.int64)
    got = _count_all(sketch, adds, keys, salt)
    seen: dict[int, int] = {}
    for key, estimate in zip(stream, got):
        seen[key] = seen.get(key, 0) + 1
        assert estimate >= min(seen[key], 255)


@pytest.mark.parametrize("load", [0.1, 0.25])
def test_false_admission_rate_matches_the_documented_bound(load: float) -> None:
    width = 1 << 14
    sketch, adds = new_sketch(width)
    distinct = int(load * width) - 1  # one short of the halving at width / 4
    _count_all(sketch, adds, np.arange(distinct, dtype=np.int64) * 7919, 11)
    fresh = np.arange(1, 1_000_001, dtype=np.int64) * -104729  # never counted
    estimates = _estimate_all(sketch, fresh, 11)
    # min_count = 2 admits a fresh ID at its first sighting iff its estimate is already >= 1.
    rate = float((estimates >= 1).mean())
    bound = (1 - math.exp(-distinct / width)) ** DEPTH
    assert 0.5 * bound <= rate <= 1.5 * bound, (rate, bound)
    assert (estimates >= 2).mean() < rate / 2  # min_count = 3 is far safer
    assert bound <= 0.0024  # the worst case quoted in admission.py, reached at load 1/4


def test_counters_halve_every_quarter_width_of_sightings() -> None:
    sketch, adds = new_sketch(64)
    key = np.array([42] * 15, dtype=np.int64)
    assert _count_all(sketch, adds, key, 0)[-1] == 15
    _count_all(sketch, adds, np.array([42], dtype=np.int64), 0)  # the 16th sighting triggers aging
    assert _estimate_all(sketch, np.array([42], dtype=np.int64), 0)[0] == 8
    assert adds[0] == 0


def test_counters_saturate() -> None:
    sketch, adds = new_sketch(1 << 12)
    got = _count_all(sketch, adds, np.full(600, 3, dtype=np.int64), 0)
    assert got.max() == 255 and sketch.max() == 255


def test_memory_is_fixed_by_width() -> None:
    sketch, _ = new_sketch(1 << 10)
    assert sketch.nbytes == DEPTH << 10
    with pytest.raises(ValueError):
        new_sketch(1000)
