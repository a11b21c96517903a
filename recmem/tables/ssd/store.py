"""Rows and their optimizer state in one file on local disk: initial rows in place, every later copy
appended to a log, so write-back is sequential and checkpoints copy nothing.

A record is one row's D float32 weights followed by its row-wise Adagrad accumulator (4 (D + 1)
bytes). Records never straddle a 4 KiB block, so a row costs exactly one block read (the disk's
unit; with ``direct_io`` reads and log writes bypass the page cache, O_DIRECT)::

    rows.bin = [initial region: row r in block r // per_block][segment 0][segment 1] ...
    log block = [k uint32 row numbers][k records]        k = 4096 // (4 (D + 1) + 4)
    loc[r] = 0: row r's live record is its initial one;  L + 1: log slot L (segment L // S)

The initial region is written once when the file is made (a file made for the same rows, width and
seed is reused; any other layout is rewritten under a new ``file_id``, so no checkpoint of the old
file can be restored onto it) and never written again. Rows leaving the cache are packed densely
into whole blocks and appended at the log's head in one large write, never over a block written
before: a 68-byte record written in place would cost a read-modify-write of a random 4 KiB page.
``loc`` (4 bytes a row, in RAM) names the newest copy; the copies it no longer names are dead.

Garbage collection: segments are ``segment_blocks`` blocks; ``live[s]`` counts the records ``loc``
names in segment s. While less than ``compact_below`` of the records in the log's segments are live,
each write also moves the live records of the emptiest segments to the head (bounded: about as many
records as it wrote, on the I/O worker that already owns the store). A segment with no live record is
reused, unless the last checkpoint's map still names records in it.

Checkpoints: ``commit`` fsyncs and returns ``loc`` with a generation number (no row is copied). Its
records stay intact until the next commit, because nothing is written over a segment it names.
``meta.json`` lists the generations whose records are intact (``restorable``); the first write
after a commit narrows it to that commit's before the write reaches the file (older generations'
segments may be reused from then on), so a restore from anything else is refused instead of
reading overwritten rows. The block numbers kept in each log block let compaction find a segment's
live rows without a reverse map. One process at a time opens a folder (``recmem.lock``).
"""

from __future__ import annotations

import json
import mmap
import os
import secrets
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from recmem.lock import exclusive
from recmem.tables.ssd.aio import AsyncReader
from recmem.tables.sharded import initial_rows

BLOCK = 4096
FORMAT = 2
NO_ROW = np.uint32(0xFFFFFFFF)  # an empty slot of a log block


class StoreError(RuntimeError):
    """A row store that cannot serve the request (a checkpoint whose rows were overwritten, a bad file)."""


class RowStore:
    """R rows of width D (several features' tables back to back) in ``folder/rows.bin``.

    Only one thread may call a store at a time (the table's I/O worker); reads fan out over
    ``io_threads`` threads of its own, so many block reads are in flight at once.

    Args:
        folder: where ``rows.bin`` and ``meta.json`` live (made if missing).
        rows: rows of each (whole) table, stored back to back.
        embedding_dim: D.
        seed: the initial rows are ``FusedRowwiseAdagrad(rows, D, lr, seed)``'s, replayed in chunks.
        io_threads: threads reading at once, where reads do not go through kernel AIO.
        direct_io: read and append with O_DIRECT (the page cache neither helps nor fills); reads
            then go through kernel AIO (``aio.py``), ``io_depth`` in flight, where the kernel allows.
        rank, world_size: store only rows ``rank, rank + W, ...`` of each table (an ID-sharded
            worker's part, local row ``k // W``), with the whole table's initial values.
        initialise: write the initial rows; False leaves them zero, for owners that give a row its
            values when they first use it (collisionless tables, on admission).
        segment_blocks: blocks per log segment (the unit of reuse and compaction).
        compact_below: compact once this share of the log's records or less is live.
        io_depth: reads in flight through kernel AIO (0: threads only).
    """

    def __init__(self, folder: str | Path, rows: list[int], embedding_dim: int, seed: int,
                 io_threads: int = 16, direct_io: bool = False, rank: int = 0, world_size: int = 1,
                 initialise: bool = True, segment_blocks: int = 4096, compact_below: float = 0.5,
                 io_depth: int = 256) -> None:
        self.folder = Path(folder)
        self.global_rows, self.embedding_dim, self.seed = list(rows), embedding_dim, seed
        self.rank, self.world_size, self.initialise = rank, world_size, initialise
        self.rows = [len(range(rank, n, world_size)) for n in rows]
        self.record = embedding_dim + 1  # floats per record
        self.per_block = BLOCK // (4 * self.record)  # records per initial block
        self.per_log_block = BLOCK // (4 * self.record + 4)  # records (and their row numbers) per log block
        if self.per_log_block < 1:
            raise ValueError(f"embedding_dim {embedding_dim}: a row must fit a {BLOCK}-byte block")
        self.num_rows = sum(self.rows)
        if self.num_rows >= NO_ROW:
            raise ValueError(f"{self.num_rows} rows: a store holds fewer than 2**32 - 1")
        self.region_bytes = -(-self.num_rows // self.per_block) * BLOCK
        self.segment_blocks, self.compact_below = segment_blocks, compact_below
        self.segment_slots = segment_blocks * self.per_log_block
        self._lock = ExitStack()
        self._lock.enter_context(exclusive(self.folder, "ssd table"))
        self.path = self.folder / "rows.bin"
        self._meta_path = self.folder / "meta.json"
        self.meta = self._open_meta()
        direct = os.O_DIRECT if direct_io else 0
        self._fd = os.open(self.path, os.O_RDWR | direct)
        self.loc = np.zeros(self.num_rows, dtype=np.uint32)  # 0: initial record; L + 1: log slot L
        self.live = np.zeros(self._segments_in_file(), dtype=np.int64)
        self._committed_live = np.zeros_like(self.live)  # the last commit's live counts: not reusable
        self._head: list[int] | None = None  # [segment, next block] appends go to
        self._base: int | None = None  # the generation ``loc`` was committed or restored as
        self._written_since_base = False
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="recmem-ssd-io")
        self._threads = io_threads
        # With O_DIRECT, one thread submits a batch's reads to the kernel (aio.py: a third of the
        # kernel time of a thread pool's blocking reads); buffered reads, or a kernel without AIO,
        # go through the pool.
        self._aio: AsyncReader | None = None
        if direct_io and io_depth:
            try:
                self._aio = AsyncReader(self._fd, io_depth)
            except OSError as e:
                warnings.warn(f"{self.path}: kernel AIO unavailable ({e}); reading with {io_threads} threads")
        self.io_engine = f"threads ({io_threads})" if self._aio is None else f"kernel AIO ({io_depth} in flight)"
        self._buffers: dict[str, mmap.mmap] = {}
        self.bytes_read = self.bytes_written = self.rows_compacted = 0

    def _layout(self) -> dict:
        return {"format": FORMAT, "rows": self.global_rows, "embedding_dim": self.embedding_dim, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "initialise": self.initialise,
                "segment_blocks": self.segment_blocks}

    def _open_meta(self) -> dict:
        """Reuse a file made for this layout, else make one (initial region written, nothing restorable)."""
        try:
            meta = json.loads(self._meta_path.read_text())
        except (OSError, ValueError):
            meta = None
        if (isinstance(meta, dict) and meta.get("layout") == self._layout() and self.path.exists()
                and self.path.stat().st_size >= self.region_bytes):
            return meta
        self._write_initial()
        meta = {"layout": self._layout(), "file_id": secrets.token_hex(8), "next_generation": 1, "restorable": []}
        self._write_meta(meta)
        return meta

    def _write_initial(self) -> None:
        """The initial region from the seeded stream, block by block (left sparse without ``initialise``)."""
        with open(self.path, "wb") as f:
            if self.initialise:
                pending = np.zeros((0, self.record), dtype=np.float32)
                for _, start, chunk in initial_rows(self.global_rows, self.embedding_dim, self.seed):
                    chunk = chunk[(self.rank - start) % self.world_size::self.world_size]  # this rank's rows
                    records = np.zeros((len(chunk), self.record), dtype=np.float32)
                    records[:, :self.embedding_dim] = chunk.numpy()
                    pending = np.concatenate([pending, records])
                    full = len(pending) // self.per_block * self.per_block
                    f.write(self._blocks(pending[:full]))
                    pending = pending[full:]
                f.write(self._blocks(pending))
            f.truncate(self.region_bytes)
            f.flush()
            os.fsync(f.fileno())

    def _blocks(self, records: np.ndarray) -> bytes:
        """[n, D + 1] records -> whole initial-region blocks, ``per_block`` records each, zero padded."""
        if not len(records):
            return b""
        n_blocks = -(-len(records) // self.per_block)
        blocks = np.zeros((n_blocks, BLOCK // 4), dtype=np.float32)
        padded = np.zeros((n_blocks * self.per_block, self.record), dtype=np.float32)
        padded[:len(records)] = records
        blocks[:, :self.per_block * self.record] = padded.reshape(n_blocks, -1)
        return blocks.tobytes()

    def _write_meta(self, meta: dict) -> None:
        tmp = self._meta_path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._meta_path)
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _segments_in_file(self) -> int:
        return -(-(os.stat(self.path).st_size - self.region_bytes) // (self.segment_blocks * BLOCK))

    def read(self, rows: np.ndarray) -> np.ndarray:
        """[n] int64 rows -> [n, D + 1] float32 live records (weights, then the Adagrad state)."""
        out = np.empty((len(rows), self.record), dtype=np.float32)
        if not len(rows):
            return out
        slot = self.loc[rows].astype(np.int64) - 1
        logged = slot >= 0
        blocks = np.where(logged, self.region_bytes + slot // self.per_log_block * BLOCK,
                          rows // self.per_block * BLOCK)
        inner = np.where(logged, 4 * self.per_log_block + slot % self.per_log_block * (4 * self.record),
                         rows % self.per_block * (4 * self.record))
        unique, inverse = np.unique(blocks, return_inverse=True)
        view = self._buffer("read", len(unique) * BLOCK)
        # Runs of adjacent blocks are read by one call; the runs are spread over the I/O threads.
        starts = np.flatnonzero(np.r_[True, np.diff(unique) != BLOCK])
        ends = np.append(starts[1:], len(unique))

        if self._aio is not None:
            offsets, lengths = unique[starts], (ends - starts) * BLOCK
            try:
                got = self._aio.read(view, offsets, lengths, starts * BLOCK)
            except OSError as e:
                raise StoreError(f"{self.path}: {e}") from None
            if (got != lengths).any():
                raise self._short_read(int(offsets[np.flatnonzero(got != lengths)[0]]))
        else:
            def read_runs(part: range) -> None:
                for i in part:
                    s, e = int(starts[i]), int(ends[i])
                    self._read_exactly(view[s * BLOCK:e * BLOCK], int(unique[s]))

            list(self._pool.map(read_runs, _parts(len(starts), self._threads)))
        floats = np.frombuffer(view, dtype=np.float32)
        first = (inverse * BLOCK + inner) // 4  # [n] each record's first float in the buffer
        out[:] = floats[first[:, None] + np.arange(self.record)]
        self.bytes_read += len(unique) * BLOCK
        return out

    def _buffer(self, use: str, size: int) -> memoryview:
        """``size`` bytes of a page-aligned buffer (as O_DIRECT needs) kept for ``use`` between calls,
        so the pages are not faulted in anew for every batch."""
        held = self._buffers.get(use)
        if held is None or len(held) < size:  # the old one goes with its last view
            held = self._buffers[use] = mmap.mmap(-1, max(size, BLOCK))
        return memoryview(held)[:size]

    def _read_exactly(self, view: memoryview, offset: int) -> None:
        if os.preadv(self._fd, [view], offset) != len(view):
            raise self._short_read(offset)

    def _short_read(self, offset: int) -> StoreError:
        return StoreError(f"{self.path}: short read at byte {offset} (file truncated?)")

    def write(self, rows: np.ndarray, records: np.ndarray) -> None:
        """Store [n, D + 1] records of [n] distinct rows at the log's head (never over a block a
        checkpoint names), then compact one segment if the log is mostly dead."""
        if not len(rows):
            return
        if not self._written_since_base:  # the first write after a checkpoint ends the others
            self.meta["restorable"] = [] if self._base is None else [self._base]
            self._write_meta(self.meta)
            self._written_since_base = True
        self._append(np.asarray(rows, dtype=np.int64), np.asarray(records, dtype=np.float32))
        moved = 0
        while moved < len(rows) + self.segment_slots:  # bounded: about as many records as written
            compacted = self._compact()
            if compacted is None:
                break
            moved += compacted

    def _append(self, rows: np.ndarray, records: np.ndarray) -> None:
        """Pack ``records`` into whole log blocks and write them at the head, segment by segment."""
        k = self.per_log_block
        done = 0
        while done < len(rows):
            if self._head is None or self._head[1] == self.segment_blocks:
                self._head = [self._free_segment(), 0]
            segment, block = self._head
            n = min(len(rows) - done, (self.segment_blocks - block) * k)
            n_blocks = -(-n // k)
            buffer = self._buffer("write", n_blocks * BLOCK)
            raw = np.frombuffer(buffer, dtype=np.uint32).reshape(n_blocks, BLOCK // 4)
            ids = np.full(n_blocks * k, NO_ROW, dtype=np.uint32)
            ids[:n] = rows[done:done + n]
            packed = np.zeros((n_blocks * k, self.record), dtype=np.float32)
            packed[:n] = records[done:done + n]
            raw[:, :k] = ids.reshape(n_blocks, k)  # [blocks, k] row numbers, then [blocks, k (D + 1)] records
            raw[:, k:k + k * self.record] = packed.view(np.uint32).reshape(n_blocks, -1)
            raw[:, k + k * self.record:] = 0
            offset = self.region_bytes + (segment * self.segment_blocks + block) * BLOCK
            if os.pwritev(self._fd, [buffer], offset) != len(buffer):
                raise StoreError(f"{self.path}: short write at byte {offset} (disk full?)")
            del raw
            self._forget(rows[done:done + n])
            first = segment * self.segment_slots + block * k
            self.loc[rows[done:done + n]] = np.arange(first + 1, first + n + 1, dtype=np.uint32)
            self.live[segment] += n
            self._head[1] += n_blocks
            self.bytes_written += n_blocks * BLOCK
            done += n

    def _free_segment(self) -> int:
        """A segment no live record and no committed one is in (a new one past the end if none)."""
        free = np.flatnonzero((self.live == 0) & (self._committed_live == 0))
        if len(free):
            return int(free[0])
        if (len(self.live) + 1) * self.segment_slots >= NO_ROW:
            raise StoreError(f"{self.path}: the log would pass 2**32 records; compact_below is too low")
        self.live = np.append(self.live, 0)
        self._committed_live = np.append(self._committed_live, 0)
        return len(self.live) - 1

    def _forget(self, rows: np.ndarray) -> None:
        """Count the log records ``rows`` held so far as dead."""
        old = self.loc[rows].astype(np.int64)
        old = old[old > 0] - 1
        self.live[:] -= np.bincount(old // self.segment_slots, minlength=len(self.live))

    def _compact(self) -> int | None:
        """Move the live records of the emptiest segment but the head to the head, if less than
        ``compact_below`` of the log's records are live; returns how many moved (None: none due)."""
        head = -1 if self._head is None else self._head[0]
        used = np.flatnonzero(self.live > 0)
        used = used[used != head]
        if not len(used) or self.live[used].sum() >= self.compact_below * len(used) * self.segment_slots:
            return None
        victim = int(used[np.argmin(self.live[used])])
        buffer = self._buffer("compact", self.segment_blocks * BLOCK)
        start = self.region_bytes + victim * self.segment_blocks * BLOCK
        size = min(len(buffer), os.stat(self.path).st_size - start)  # the last segment may be short
        buffer[size:] = bytes(len(buffer) - size)
        self._read_exactly(buffer[:size], start)
        raw = np.frombuffer(buffer, dtype=np.uint32).reshape(self.segment_blocks, BLOCK // 4)
        k = self.per_log_block
        ids = raw[:, :k].reshape(-1).astype(np.int64)
        slots = victim * self.segment_slots + np.arange(self.segment_slots, dtype=np.int64)
        ok = ids < self.num_rows
        live = np.zeros(len(ids), dtype=bool)
        live[ok] = self.loc[ids[ok]] == slots[ok] + 1  # the map still names this copy
        records = raw[:, k:k + k * self.record].view(np.float32).reshape(-1, self.record)[live].copy()
        rows = ids[live]
        del raw
        self.bytes_read += size
        self._append(rows, records)
        self.rows_compacted += len(rows)
        return len(rows)

    def delete(self, rows: np.ndarray) -> None:
        """Forget ``rows``: they read as their initial values again (zeros in a file made with
        ``initialise=False``) and no log record holds them for this generation."""
        self._forget(rows)
        self.loc[rows] = 0

    def commit(self) -> dict:
        """Make the rows written so far durable and name them a generation; returns the state a
        checkpoint keeps (``loc`` and the generation, no rows)."""
        os.fsync(self._fd)
        generation = int(self.meta["next_generation"])
        self.meta["next_generation"] = generation + 1
        self.meta["restorable"] = sorted(set(self.meta["restorable"]) | {generation})
        self._write_meta(self.meta)
        self._base, self._committed_live, self._written_since_base = generation, self.live.copy(), False
        return {"file_id": self.meta["file_id"], "generation": generation,
                "loc": torch.from_numpy(self.loc.view(np.int32).copy())}

    def restore(self, state: dict) -> None:
        """Point at the records of a committed generation; appends go to a segment it does not name.

        Raises:
            StoreError: the generation's records were overwritten (a later run wrote over them), or
                ``loc`` does not fit this store.
        """
        if not isinstance(state, dict) or not {"file_id", "generation", "loc"} <= state.keys():
            raise StoreError(f"{self.folder}: a checkpoint's disk state needs file_id, generation and loc "
                             f"(got {sorted(state) if isinstance(state, dict) else type(state).__name__})")
        generation, loc = int(state["generation"]), state["loc"]
        if state["file_id"] != self.meta["file_id"]:
            raise StoreError(f"{self.folder}: the checkpoint's rows were in another file (id {state['file_id']}, "
                             f"this one is {self.meta['file_id']}: made anew since, or another folder)")
        segments = self._segments_in_file()
        if (not isinstance(loc, torch.Tensor) or loc.shape != (self.num_rows,) or loc.dtype != torch.int32
                or int(loc.numpy().view(np.uint32).max(initial=0)) > segments * self.segment_slots):
            raise StoreError(f"{self.folder}: a checkpoint's row map ({getattr(loc, 'dtype', type(loc))} of shape "
                             f"{tuple(getattr(loc, 'shape', ()))}) does not fit this store of {self.num_rows} rows "
                             f"and {segments} log segments")
        if generation not in self.meta["restorable"]:
            raise StoreError(f"{self.folder}: the checkpoint's rows (generation {generation}) were overwritten "
                             f"since; intact generations here: {self.meta['restorable'] or 'none'}")
        self.loc = loc.numpy().view(np.uint32).copy()
        logged = self.loc[self.loc > 0].astype(np.int64) - 1
        self.live = np.bincount(logged // self.segment_slots, minlength=segments).astype(np.int64)
        self._committed_live, self._head = self.live.copy(), None
        self._base, self._written_since_base = generation, False

    def disk_bytes(self) -> int:
        """Bytes the file takes on disk (sparse parts count as far as written)."""
        return os.stat(self.path).st_blocks * 512

    def memory_bytes(self) -> int:
        """RAM of the row map and the per-segment counts."""
        return self.loc.nbytes + self.live.nbytes + self._committed_live.nbytes

    def close(self) -> None:
        """Release the file and the I/O threads."""
        self._pool.shutdown()
        if self._aio is not None:
            self._aio.close()
        self._buffers.clear()
        os.close(self._fd)
        self._lock.close()


def _parts(n: int, k: int) -> list[range]:
    """``range(n)`` in at most ``k`` contiguous parts."""
    step = max(-(-n // k), 1)
    return [range(i, min(i + step, n)) for i in range(0, n, step)]
