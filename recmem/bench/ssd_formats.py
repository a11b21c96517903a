"""How the ssd kind stores rows, chosen by measurement: random reads of batches of rows, cold, from

- ``block``: recmem's row file (``recmem/tables/ssd/store.py``): records packed in 4 KiB blocks,
  adjacent blocks read by one ``preadv``, ``io_threads`` reads in flight, O_DIRECT;
- ``lmdb``: LMDB through the ``lmdb`` package, one key per row, readahead off, ``getmulti``;
- ``rocksdb``: RocksDB through ``rocksdict``, one key per row, a batched ``get`` (multi-get).

The key-value stores are not recmem dependencies: a peer whose package is missing is reported as
such. Their files' pages are dropped from the page cache (``posix_fadvise(DONTNEED)``) after they
are written and before each read batch, so all three read from the disk.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recmem.tables.ssd.store import RowStore


@dataclass
class FormatOptions:
    """Sizes of one comparison.

    Attributes:
        rows, dim: the table.
        batch: distinct rows per read (a training step's misses).
        batches: read batches timed per format.
        io_threads: reads in flight for ``block``.
        seed: seeds the rows read.
    """

    rows: int = 2_000_000
    dim: int = 16
    batch: int = 20_000
    batches: int = 5
    io_threads: int = 16
    seed: int = 0


QUICK_FORMATS = FormatOptions(rows=20_000, batch=2000, batches=2)
"""Tiny sizes (the smoke test)."""


def _drop_cache(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _records(opts: FormatOptions, start: int, n: int) -> np.ndarray:
    return np.random.default_rng([opts.seed, start]).random((n, opts.dim + 1), dtype=np.float32)


def _time_reads(read, folder: Path, opts: FormatOptions) -> float:
    """Rows per second over ``batches`` cold batches of distinct random rows."""
    rng = np.random.default_rng(opts.seed)
    seconds = 0.0
    for _ in range(opts.batches):
        rows = np.sort(rng.choice(opts.rows, size=opts.batch, replace=False))
        _drop_cache(folder)
        started = time.perf_counter()
        read(rows)
        seconds += time.perf_counter() - started
    return opts.batch * opts.batches / seconds


def block_rate(folder: Path, opts: FormatOptions) -> float:
    """recmem's row file (its initial rows written by the store itself)."""
    store = RowStore(folder, [opts.rows], opts.dim, opts.seed, opts.io_threads, direct_io=True)
    try:
        return _time_reads(store.read, folder, opts)
    finally:
        store.close()


def lmdb_rate(folder: Path, opts: FormatOptions) -> float:
    """LMDB, one 8-byte big-endian key per row (sorted keys: append mode)."""
    import lmdb

    size = opts.rows * (opts.dim + 1) * 4 * 3
    env = lmdb.open(str(folder), map_size=size, readahead=False, sync=False, writemap=False)
    chunk = 100_000
    for start in range(0, opts.rows, chunk):
        records = _records(opts, start, min(chunk, opts.rows - start))
        with env.begin(write=True) as txn:
            for i, record in enumerate(records):
                txn.put((start + i).to_bytes(8, "big"), record.tobytes(), append=True)
    env.sync()
    env.close()

    def read(rows: np.ndarray) -> None:
        env = lmdb.open(str(folder), readonly=True, readahead=False, lock=False)
        with env.begin() as txn:
            got = txn.cursor().getmulti([int(r).to_bytes(8, "big") for r in rows])
        assert len(got) == len(rows)
        env.close()

    return _time_reads(read, folder, opts)


def rocksdb_rate(folder: Path, opts: FormatOptions) -> float:
    """RocksDB through rocksdict, one 8-byte big-endian key per row, batched get (multi-get)."""
    from rocksdict import Options, Rdict, WriteBatch

    db = Rdict(str(folder), Options(raw_mode=True))
    chunk = 100_000
    for start in range(0, opts.rows, chunk):
        batch = WriteBatch(raw_mode=True)
        for i, record in enumerate(_records(opts, start, min(chunk, opts.rows - start))):
            batch.put((start + i).to_bytes(8, "big"), record.tobytes())
        db.write(batch)
    db.flush()
    db.close()

    def read(rows: np.ndarray) -> None:
        store = Rdict(str(folder), Options(raw_mode=True))
        got = store[[int(r).to_bytes(8, "big") for r in rows]]
        assert len(got) == len(rows)
        store.close()

    return _time_reads(read, folder, opts)


FORMATS = {"block": block_rate, "lmdb": lmdb_rate, "rocksdb": rocksdb_rate}


def compare_formats(opts: FormatOptions, folder: str = "") -> dict[str, float | str]:
    """Cold random rows read per second by each format (a string where a peer could not run)."""
    out: dict[str, float | str] = {}
    with tempfile.TemporaryDirectory(prefix="recmem-ssd-formats-", dir=folder or None) as tmp:
        for name, rate in FORMATS.items():
            try:
                out[name] = rate(Path(tmp) / name, opts)
            except ImportError as e:
                out[name] = f"not installed ({e.name})"
    return out
