"""The ssd row store's log (recmem/tables/ssd/store.py): a row rewritten any number of times reads back
its newest copy (read by threads or, with O_DIRECT, by kernel AIO), compaction keeps every live row
and frees dead space, the row map survives a restore, a SIGKILL mid-append or mid-compaction restores
the last checkpoint exactly, and a truncated file or a kernel without AIO is handled."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recmem.tables.ssd.aio import AsyncReader
from recmem.tables.ssd.store import RowStore, StoreError

ROWS, DIM, SEGMENT_BLOCKS = 600, 8, 4  # D = 8: 102 records a log block, 408 a segment


def _store(folder: Path, **kw) -> RowStore:
    return RowStore(folder, [ROWS // 2, ROWS // 2], DIM, seed=4, io_threads=2, segment_blocks=SEGMENT_BLOCKS, **kw)


def _records(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.standard_normal((n, DIM + 1)).astype(np.float32)


def _check_counts(store: RowStore) -> None:
    """``live`` is what ``loc`` says: records per segment."""
    logged = store.loc[store.loc > 0].astype(np.int64) - 1
    np.testing.assert_array_equal(store.live, np.bincount(logged // store.segment_slots, minlength=len(store.live)))


OPS = st.lists(st.one_of(st.tuples(st.just("write"), st.integers(1, ROWS), st.integers(0, 2**16)),
                         st.tuples(st.just("delete"), st.integers(1, 40), st.integers(0, 2**16)),
                         st.just(("commit",)), st.just(("restore",))), min_size=1, max_size=25)


@pytest.mark.parametrize("direct_io", [False, True], ids=["threads", "kernel-aio"])
@settings(max_examples=30, deadline=None)
@given(OPS)
def test_reads_give_the_newest_copy_through_writes_deletes_commits_and_restores(direct_io, ops):
    with tempfile.TemporaryDirectory() as tmp:
        store = _store(Path(tmp), direct_io=direct_io, io_depth=8)  # few in flight: reads queue up
        assert store.io_engine.startswith("kernel AIO" if direct_io else "threads")
        initial = store.read(np.arange(ROWS))
        now, committed = initial.copy(), None
        for op in ops:
            if op[0] == "write":
                rng = np.random.default_rng(op[2])
                rows = rng.choice(ROWS, size=op[1], replace=False)
                values = _records(rng, op[1])
                store.write(rows, values)
                now[rows] = values
            elif op[0] == "delete":
                rows = np.random.default_rng(op[2]).choice(ROWS, size=op[1], replace=False)
                store.delete(rows)
                now[rows] = initial[rows]
            elif op[0] == "commit":
                committed = (store.commit(), now.copy())
            elif committed is not None:
                store.restore(committed[0])
                now = committed[1].copy()
            np.testing.assert_array_equal(store.read(np.arange(ROWS)), now)
            _check_counts(store)
        store.close()


def test_compaction_keeps_every_live_row_and_reuses_dead_segments(tmp_path):
    store = _store(tmp_path / "rows")
    rng = np.random.default_rng(0)
    now = store.read(np.arange(ROWS))
    written = 0
    for step in range(60):  # hot rows rewritten every step, the rest now and then
        rows = np.unique(np.r_[np.arange(50), rng.choice(ROWS, size=120, replace=False)])
        values = _records(rng, len(rows))
        store.write(rows, values)
        now[rows] = values
        written += len(rows)
        if step in (20, 40):
            store.commit()  # a checkpoint's segments wait for the next commit, then are reused
    np.testing.assert_array_equal(store.read(np.arange(ROWS)), now)
    _check_counts(store)
    assert store.rows_compacted > 0 and store.live.sum() <= ROWS
    # 24 segments' worth of records written; the live ones fit 1.5: the log never passed 7
    assert written > 20 * store.segment_slots and len(store.live) <= 7
    assert store.disk_bytes() <= store.region_bytes + 7 * SEGMENT_BLOCKS * 4096 + 4096
    store.close()


def test_a_checkpoint_outlives_later_writes_and_compaction_until_the_next_commit(tmp_path):
    store = _store(tmp_path / "rows")
    rng = np.random.default_rng(1)
    for _ in range(10):
        store.write(rng.choice(ROWS, size=200, replace=False), _records(rng, 200))
    state, expected = store.commit(), store.read(np.arange(ROWS))
    before = store.rows_compacted
    for _ in range(40):  # each round kills a third of the log: compaction runs, never over the checkpoint
        store.write(rng.choice(ROWS, size=200, replace=False), _records(rng, 200))
    assert store.rows_compacted > before
    store.close()
    again = _store(tmp_path / "rows")  # a new process: the map comes from the checkpoint
    again.restore(state)
    np.testing.assert_array_equal(again.read(np.arange(ROWS)), expected)
    _check_counts(again)
    rows = np.arange(0, ROWS, 3)
    again.write(rows, _records(rng, len(rows)))  # appends after a restore go where the checkpoint is not
    expected[rows] = again.read(rows)
    np.testing.assert_array_equal(again.read(np.arange(ROWS)), expected)
    second = again.commit()
    again.close()
    third = _store(tmp_path / "rows")
    with pytest.raises(StoreError, match="row map"):
        third.restore({**second, "loc": second["loc"][:-1]})
    third.restore(second)
    np.testing.assert_array_equal(third.read(np.arange(ROWS)), expected)
    third.close()


_CHILD = """
import os, signal, sys
import numpy as np, torch
from tests.test_ssd_log import _store, _records, ROWS
from recmem.tables.ssd.store import RowStore
folder, state_path, mode = sys.argv[1:]
store = _store(folder)
store.restore(torch.load(state_path, weights_only=True))
writes, inside = 0, [False]
real_pwritev, real_compact = os.pwritev, RowStore._compact

def torn(fd, buffers, offset):  # write half the blocks, then die
    if (mode == "compaction" and inside[0]) or (mode == "append" and writes == 7):
        half = len(buffers[0]) // 2 // 4096 * 4096 or len(buffers[0])
        real_pwritev(fd, [memoryview(buffers[0])[:half]], offset)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_pwritev(fd, buffers, offset)

def compact(self):
    inside[0] = True
    real_compact(self)
    inside[0] = False

os.pwritev, RowStore._compact = torn, compact
rng = np.random.default_rng(7)
for writes in range(200):
    store.write(rng.choice(ROWS, size=200, replace=False), _records(rng, 200))
sys.exit(3)
"""


@pytest.mark.parametrize("mode", ["append", "compaction"])
def test_sigkill_mid_append_or_compaction_restores_the_last_checkpoint(tmp_path, mode):
    store = _store(tmp_path / "rows")
    rng = np.random.default_rng(2)
    for _ in range(12):
        store.write(rng.choice(ROWS, size=200, replace=False), _records(rng, 200))
    torch.save(store.commit(), tmp_path / "state.pt")
    expected = store.read(np.arange(ROWS))
    store.close()
    root = Path(__file__).resolve().parents[1]
    child = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "rows"), str(tmp_path / "state.pt"), mode],
                           cwd=root, capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    again = _store(tmp_path / "rows")
    again.restore(torch.load(tmp_path / "state.pt", weights_only=True))
    np.testing.assert_array_equal(again.read(np.arange(ROWS)), expected)  # no torn row
    again.close()


@pytest.mark.parametrize("direct_io", [False, True], ids=["threads", "kernel-aio"])
def test_a_truncated_file_is_a_store_error_naming_it(tmp_path, direct_io):
    store = _store(tmp_path / "rows", direct_io=direct_io)
    rng = np.random.default_rng(3)
    rows = rng.choice(ROWS, size=300, replace=False)
    store.write(rows, _records(rng, 300))
    os.truncate(store.path, store.region_bytes)  # the log is gone: a careless copy, a full disk
    with pytest.raises(StoreError, match=r"rows\.bin: short read at byte"):
        store.read(rows)
    store.close()


def test_without_kernel_aio_reads_fall_back_to_threads_with_a_warning(tmp_path, monkeypatch):
    def unavailable(fd, depth):
        raise OSError(errno.EAGAIN, "io_setup: Resource temporarily unavailable (aio-max-nr used up)")

    monkeypatch.setattr("recmem.tables.ssd.store.AsyncReader", unavailable)
    with pytest.warns(UserWarning, match="kernel AIO unavailable .*aio-max-nr.* reading with 2 threads"):
        store = _store(tmp_path / "rows", direct_io=True)
    assert store.io_engine == "threads (2)"
    rng = np.random.default_rng(4)
    rows = rng.choice(ROWS, size=100, replace=False)
    values = _records(rng, 100)
    store.write(rows, values)
    np.testing.assert_array_equal(store.read(rows), values)
    store.close()


def test_a_failed_kernel_read_raises_after_every_read_in_flight_has_landed(tmp_path):
    path = tmp_path / "blocks"
    path.write_bytes(np.arange(64 * 1024, dtype=np.uint32).tobytes())  # 64 blocks
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    reader = AsyncReader(fd, depth=4)
    buffer = mmap.mmap(-1, 16 * 4096)
    offsets = np.arange(16, dtype=np.int64) * 4 * 4096  # every fourth block
    got = reader.read(memoryview(buffer), offsets, np.full(16, 4096), np.arange(16) * 4096)
    assert (got == 4096).all()
    words = np.frombuffer(buffer, dtype=np.uint32).reshape(16, 1024)
    np.testing.assert_array_equal(words[:, 0], offsets // 4)
    with pytest.raises(OSError, match="Invalid argument"):  # O_DIRECT needs aligned lengths: the kernel refuses
        reader.read(memoryview(buffer), offsets, np.r_[np.full(15, 4096), 100], np.arange(16) * 4096)
    got = reader.read(memoryview(buffer), offsets[:2], np.full(2, 4096), np.arange(2) * 4096)  # still usable
    assert (got == 4096).all()
    reader.close()
    os.close(fd)
