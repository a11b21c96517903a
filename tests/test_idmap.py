"""The collisionless ID map: open addressing with backward-shift deletion, and SlotMap's bookkeeping,
checked against plain Python dict models."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from recmem.tables import idmap
from recmem.tables.idhash import mix64, shard_of
from recmem.tables.idmap import BUCKET_BASE, BUCKET_MASK, COUNT, EMPTY, KEY, LIVE, ROW_ALLOC, TIME
from recmem.tables.slotmap import ArrayRows, SlotMap

INT64 = st.integers(-(2**63), 2**63 - 1)
# A small pool of IDs (extremes and MISSING_ID = -1 included) so that sequences repeat IDs often.
POOL = [-(2**63), -1, 0, 1, 2, 3, 7, 8, 16, 2**31, 2**62, 2**63 - 1, -17, 12345, 99, 100]


def check_map(m: SlotMap) -> None:
    """Every live row's ID finds that row, no two live IDs share one, and counters agree."""
    for f in range(m.layout.shape[0]):
        keys, local = m.live(f)
        assert len(set(keys.tolist())) == len(keys)
        assert len(keys) == m.layout[f, LIVE] <= m.layout[f, ROW_ALLOC] <= m.capacity
        bounds = np.zeros(m.layout.shape[0] + 1, dtype=np.int64)
        bounds[f + 1:] = len(keys)
        np.testing.assert_array_equal(m.find(keys, bounds), local)
        base = m.layout[f, BUCKET_BASE]
        occupied = m.buckets[base:base + m.layout[f, BUCKET_MASK] + 1]
        assert (occupied[:, 1] != EMPTY).sum() == len(keys)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.sampled_from(POOL) | INT64), max_size=80))
def test_probe_and_delete_match_a_dict(ops: list[tuple[int, int]]) -> None:
    # 8 buckets holding up to 7 keys: long probe runs that wrap around, so deletions must shift.
    buckets = np.zeros((8 + 3, 2), dtype=np.int64)
    buckets[:, 1] = EMPTY
    base, mask, model = 3, 7, {}
    for op, key in ops:
        b = idmap.probe(buckets, base, mask, key)
        insert = op > 0  # two inserts per delete keep the table nearly full
        if insert and key not in model and len(model) < 7:
            buckets[b] = key, len(model) + 100 * len(ops)
            model[key] = int(buckets[b, 1])
        elif not insert and key in model:
            idmap.delete_bucket(buckets, base, mask, b)
            del model[key]
        for k in set(model) | {key}:
            found = buckets[idmap.probe(buckets, base, mask, k), 1]
            assert found == model.get(k, EMPTY)
        assert buckets[:base, 1].tolist() == [EMPTY] * base  # never writes outside its segment
        # Linear-probing invariant: no empty bucket between an entry's home and its position.
        for i in range(8):
            if buckets[base + i, 1] != EMPTY:
                j = int(mix64(buckets[base + i, 0]) & np.uint64(mask))
                while j != i:
                    assert buckets[base + j, 1] != EMPTY
                    j = (j + 1) & mask


def _bounds(sizes: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


batches = st.lists(
    st.tuples(st.lists(st.sampled_from(POOL), max_size=12), st.lists(st.sampled_from(POOL), max_size=12)),
    min_size=1, max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(batches, st.integers(0, 3), st.integers(1, 6), st.integers(1, 4))
def test_assign_matches_dict_model(steps, min_count, capacity, initial_rows) -> None:
    """Exact model with eviction "none": admission counts, capacity refusals, growth, one row per ID."""
    m = SlotMap(2, capacity, min(initial_rows, capacity), min_count, 1 << 16, "none", 0, False)
    rows, live, seen = ArrayRows(2), [dict(), dict()], [dict(), dict()]
    for now, (a, b) in enumerate(steps):
        values = np.array(a + b, dtype=np.int64)
        out = m.assign(values, _bounds([len(a), len(b)]), now, 0.1, rows)
        for f, ids in enumerate((a, b)):
            got = out[:len(a)] if f == 0 else out[len(a):]
            for i, key in enumerate(ids):
                if key not in live[f]:
                    seen[f][key] = seen[f].get(key, 0) + 1
                    if seen[f][key] >= max(min_count, 1) and len(live[f]) < capacity:
                        live[f][key] = int(got[i])
                assert got[i] == live[f].get(key, EMPTY)
        check_map(m)
    for f in range(2):
        keys, local = m.live(f)
        assert dict(zip(keys.tolist(), local.tolist())) == live[f]


@settings(max_examples=150, deadline=None)
@given(batches, st.sampled_from(["lru", "lfu"]), st.integers(1, 5), st.lists(st.integers(0, 5), max_size=12))
def test_eviction_keeps_rows_unique_and_within_capacity(steps, policy, capacity, clock) -> None:
    m = SlotMap(2, capacity, 1, 1, 1 << 16, policy, 0, True)
    rows, now = ArrayRows(2), 0
    for step, (a, b) in enumerate(steps):
        now += clock[step] if step < len(clock) else 1
        values = np.array(a + b, dtype=np.int64)
        out = m.assign(values, _bounds([len(a), len(b)]), now, 0.1, rows)
        for ids, got in ((a, out[:len(a)]), (b, out[len(a):])):
            pairs = {(k, int(r)) for k, r in zip(ids, got) if r != EMPTY}
            # Within a batch an ID keeps one row and no row serves two IDs (the batch trains on them).
            assert len({k for k, _ in pairs}) == len({r for _, r in pairs}) == len(pairs)
            distinct = len(set(ids))
            assert len(pairs) == min(distinct, capacity)
        check_map(m)
        if step % 3 == 2:
            m.expire(now, 2)
            check_map(m)
    freed = sum(len(m.take_changes(f)[2]) for f in range(2))
    stats = m.stats()
    assert freed == stats["evicted"] + stats["expired"]
    assert stats["admitted"] - freed == stats["rows_live"]


def test_lru_and_lfu_pick_the_right_victim() -> None:
    for policy, victim in (("lru", 10), ("lfu", 11)):
        m = SlotMap(1, 3, 3, 1, 1 << 16, policy, 0, False)
        rows = ArrayRows(2)
        # 10 is used 3 times at t=0; 11 once at t=1; 12 twice at t=2.
        for now, ids in enumerate(([10, 10, 10], [11], [12, 12])):
            m.assign(np.array(ids, dtype=np.int64), _bounds([len(ids)]), now, 0.1, rows)
        m.assign(np.array([13], dtype=np.int64), _bounds([1]), 3, 0.1, rows)
        assert set(m.live(0)[0].tolist()) == {10, 11, 12, 13} - {victim}, policy


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10**6), st.integers(0, 10**9), st.integers(-3, 3))
def test_ttl_boundary_is_exact(ttl: int, last: int, delta: int) -> None:
    m = SlotMap(1, 4, 4, 1, 1 << 16, "none", 0, False)
    m.assign(np.array([5], dtype=np.int64), _bounds([1]), last, 0.1, ArrayRows(2))
    now = last + ttl + delta
    freed = m.expire(now, ttl)
    assert freed == (1 if delta > 0 else 0)  # idle == ttl stays, ttl + 1 goes
    assert m.stats()["rows_live"] == 1 - freed


def test_touch_keeps_the_latest_data_time() -> None:
    m = SlotMap(1, 4, 4, 1, 1 << 16, "none", 0, False)
    for now in (50, 20):  # a replayed older batch does not make the row look staler
        m.assign(np.array([5], dtype=np.int64), _bounds([1]), now, 0.1, ArrayRows(2))
    assert m.rows[m.live(0)[1][0], TIME] == 50
    assert m.rows[m.live(0)[1][0], COUNT] == 2


def test_growth_fits_the_batch_at_once_and_keeps_ids() -> None:
    m = SlotMap(2, 100, 4, 1, 1 << 16, "none", 0, False)
    rows = ArrayRows(2)
    ids = np.arange(-30, 30, dtype=np.int64)
    first = m.assign(np.concatenate([ids, ids[:5], ids[:5]]), _bounds([60, 10]), 0, 0.1, rows)
    # One growth sized to the distinct new IDs of each feature: 60 and 5 (at least doubling, 4 -> 8).
    assert m.allocations() == [60, 8]
    m.assign(np.arange(100, 130, dtype=np.int64), _bounds([30, 0]), 0, 0.1, rows)
    assert m.allocations() == [100, 8]  # 60 + 30 new rows, doubling capped at capacity
    np.testing.assert_array_equal(np.sort(first[:60]), np.arange(60))  # rows filled in order
    again = m.find(np.concatenate([ids, ids[:5], ids[:5]]), _bounds([60, 10]))
    np.testing.assert_array_equal(first, again)
    assert m.rows[:, KEY][m.rows[:, COUNT] > 0].size == 95
    check_map(m)


def test_state_round_trip_is_exact() -> None:
    m = SlotMap(2, 50, 2, 2, 1 << 10, "lru", 3, True)
    rng = np.random.default_rng(0)
    for now in range(20):
        v = rng.integers(-40, 40, size=30)
        m.assign(v, _bounds([17, 13]), now, 0.1, ArrayRows(2))
    m.expire(19, 5)
    copy = SlotMap(2, 50, 2, 2, 1 << 10, "lru", 3, True)
    copy.load_state(m.state())
    for name in ("layout", "counters", "rows", "free", "buckets", "sketch", "sketch_adds"):
        np.testing.assert_array_equal(getattr(copy, name), getattr(m, name), err_msg=name)
    v = rng.integers(-60, 60, size=30)
    np.testing.assert_array_equal(m.assign(v, _bounds([17, 13]), 20, 0.1, ArrayRows(2)),
                                  copy.assign(v, _bounds([17, 13]), 20, 0.1, ArrayRows(2)))
    for f in range(2):
        for a, b in zip(m.take_changes(f), copy.take_changes(f)):
            np.testing.assert_array_equal(a, b)


def test_shard_of_is_balanced_and_stable() -> None:
    ids = np.arange(0, 200_000, 7, dtype=np.int64) - 10**6
    owners = shard_of(ids, 4)
    np.testing.assert_array_equal(owners, shard_of(ids.copy(), 4))
    counts = np.bincount(owners, minlength=4)
    assert counts.min() > 0.95 * len(ids) / 4
