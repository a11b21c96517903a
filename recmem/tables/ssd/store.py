"""Rows and their optimizer state in one file on local disk, versioned so checkpoints copy nothing.

A record is one row's D float32 weights followed by its row-wise Adagrad accumulator (4 (D + 1)
bytes). Records are packed into 4 KiB blocks and never straddle one, so a row costs exactly one
block read (the disk's unit; with ``direct_io`` the read bypasses the page cache, O_DIRECT)::

    rows.bin = [region 0: initial rows][region 1][region 2]        each region ceil(R / per_block) blocks
    record of row r in region v at v * region_bytes + (r // per_block) * 4096 + (r % per_block) * 4 (D + 1)

Region 0 holds the initial values (written once when the file is made; a file made for the same
rows, width and seed is reused; any other layout is rewritten under a new ``file_id``, so no
checkpoint of the old file can be restored onto it). ``where[r]`` says which region holds row r's live record, and a
checkpoint records ``where`` (1 byte per row) instead of copying rows: after a checkpoint a row's
first write goes to the region of {1, 2} the checkpoint does not point at, so the checkpoint's
records stay intact until the *next* checkpoint (shadow paging per row). ``meta.json`` lists the
generations whose records are intact (``restorable``); a write after a checkpoint narrows it to
that checkpoint's before the write reaches the file, so a restore from anything else is refused
instead of reading overwritten rows. The file is fsynced before a checkpoint's generation is added.
One process at a time opens a folder (``recmem.lock``: a second table on it is an error).
"""

from __future__ import annotations

import json
import mmap
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from recmem.lock import exclusive
from recmem.tables.sharded import initial_rows

BLOCK = 4096
FORMAT = 1


class StoreError(RuntimeError):
    """A row store that cannot serve the request (a checkpoint whose rows were overwritten, a bad file)."""


class RowStore:
    """R rows of width D (several features' tables back to back) in ``folder/rows.bin``.

    Only one thread may call a store at a time (the table's I/O worker); each call fans out over
    ``io_threads`` threads of its own, so many block reads are in flight at once.

    Args:
        folder: where ``rows.bin`` and ``meta.json`` live (made if missing).
        rows: rows of each (whole) table, stored back to back.
        embedding_dim: D.
        seed: the initial rows are ``FusedRowwiseAdagrad(rows, D, lr, seed)``'s, replayed in chunks.
        io_threads: reads and writes in flight at once.
        direct_io: read with O_DIRECT (the page cache neither helps nor fills).
        rank, world_size: store only rows ``rank, rank + W, ...`` of each table (an ID-sharded
            worker's part, local row ``k // W``), with the whole table's initial values.
        initialise: write the initial rows; False leaves region 0 zero, for owners that give a row its
            values when they first use it (collisionless tables, on admission).
    """

    def __init__(self, folder: str | Path, rows: list[int], embedding_dim: int, seed: int,
                 io_threads: int = 16, direct_io: bool = False, rank: int = 0, world_size: int = 1,
                 initialise: bool = True) -> None:
        self.folder = Path(folder)
        self.global_rows, self.embedding_dim, self.seed = list(rows), embedding_dim, seed
        self.rank, self.world_size, self.initialise = rank, world_size, initialise
        self.rows = [len(range(rank, n, world_size)) for n in rows]
        self.record = embedding_dim + 1  # floats per record
        self.per_block = BLOCK // (4 * self.record)
        if self.per_block < 1:
            raise ValueError(f"embedding_dim {embedding_dim}: a row must fit a {BLOCK}-byte block")
        self.num_rows = sum(rows)
        self.region_bytes = -(-self.num_rows // self.per_block) * BLOCK
        self._lock = ExitStack()
        self._lock.enter_context(exclusive(self.folder, "ssd table"))
        self.path = self.folder / "rows.bin"
        self._meta_path = self.folder / "meta.json"
        self.meta = self._open_meta()
        self._fd = os.open(self.path, os.O_RDWR)
        self._read_fd = os.open(self.path, os.O_RDONLY | (os.O_DIRECT if direct_io else 0))
        self.where = np.zeros(self.num_rows, dtype=np.uint8)  # live region per row; 0: initial values
        self._base: int | None = None  # the generation ``where`` was committed or restored as
        self._written_since_base = False
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="recmem-ssd-io")
        self._threads = io_threads
        self.bytes_read = self.bytes_written = 0

    def _layout(self) -> dict:
        return {"format": FORMAT, "rows": self.global_rows, "embedding_dim": self.embedding_dim, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "initialise": self.initialise}

    def _open_meta(self) -> dict:
        """Reuse a file made for this layout, else make one (initial region written, nothing restorable)."""
        try:
            meta = json.loads(self._meta_path.read_text())
        except (OSError, ValueError):
            meta = None
        if (isinstance(meta, dict) and meta.get("layout") == self._layout() and self.path.exists()
                and self.path.stat().st_size == 3 * self.region_bytes):
            return meta
        self._write_initial()
        meta = {"layout": self._layout(), "file_id": secrets.token_hex(8), "next_generation": 1, "restorable": []}
        self._write_meta(meta)
        return meta

    def _write_initial(self) -> None:
        """Region 0 from the seeded stream, block by block; regions 1 and 2 left sparse."""
        with open(self.path, "wb") as f:
            if not self.initialise:
                f.truncate(3 * self.region_bytes)
                return
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
            f.truncate(3 * self.region_bytes)
            f.flush()
            os.fsync(f.fileno())

    def _blocks(self, records: np.ndarray) -> bytes:
        """[n, D + 1] records -> whole blocks, ``per_block`` records each, zero padded."""
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

    def _block_offsets(self, rows: np.ndarray, regions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Byte offset of each row's block, and of its record inside the block."""
        blocks = regions.astype(np.int64) * self.region_bytes + rows // self.per_block * BLOCK
        return blocks, rows % self.per_block * (4 * self.record)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """[n] int64 rows -> [n, D + 1] float32 live records (weights, then the Adagrad state)."""
        out = np.empty((len(rows), self.record), dtype=np.float32)
        if not len(rows):
            return out
        blocks, inner = self._block_offsets(rows, self.where[rows])
        unique, inverse = np.unique(blocks, return_inverse=True)
        buffer = mmap.mmap(-1, len(unique) * BLOCK)  # page aligned, as O_DIRECT needs
        view = memoryview(buffer)
        # Runs of adjacent blocks are read by one call; the runs are spread over the I/O threads.
        starts = np.flatnonzero(np.r_[True, np.diff(unique) != BLOCK])
        ends = np.append(starts[1:], len(unique))

        def read_runs(part: range) -> None:
            for i in part:
                s, e = int(starts[i]), int(ends[i])
                got = os.preadv(self._read_fd, [view[s * BLOCK:e * BLOCK]], int(unique[s]))
                if got != (e - s) * BLOCK:
                    raise StoreError(f"{self.path}: short read at byte {int(unique[s])} (file truncated?)")

        list(self._pool.map(read_runs, _parts(len(starts), self._threads)))
        data = np.frombuffer(buffer, dtype=np.uint8).reshape(len(unique), BLOCK)
        at = inner[:, None] + np.arange(4 * self.record)  # [n, 4 (D + 1)] byte positions in the block
        out[:] = data[inverse[:, None], at].view(np.float32)
        del data, view
        buffer.close()
        self.bytes_read += len(unique) * BLOCK
        return out

    def write(self, rows: np.ndarray, records: np.ndarray) -> None:
        """Store [n, D + 1] records of [n] distinct rows, never over a checkpoint's records."""
        if not len(rows):
            return
        if not self._written_since_base:  # the first write after a checkpoint ends the others
            self.meta["restorable"] = [] if self._base is None else [self._base]
            self._write_meta(self.meta)
            self._written_since_base = True
        committed = self._committed[rows] if self._base is not None else np.zeros(len(rows), np.uint8)
        where = self.where[rows]
        # Written since the checkpoint: overwrite in place; else (or deleted, region 0): the region of
        # {1, 2} the checkpoint does not point at. Region 0 is never written after the file is made.
        again = (where != committed) & (where != 0)
        target = np.where(again, where, np.where(committed == 1, 2, 1)).astype(np.uint8)
        blocks, inner = self._block_offsets(rows, target)
        offsets = blocks + inner
        payload = np.ascontiguousarray(records, dtype=np.float32)

        def write_rows(part: range) -> None:
            for i in part:
                os.pwrite(self._fd, payload[i].tobytes(), int(offsets[i]))

        list(self._pool.map(write_rows, _parts(len(rows), self._threads)))
        self.where[rows] = target
        self.bytes_written += len(rows) * 4 * self.record

    def delete(self, rows: np.ndarray) -> None:
        """Forget ``rows``: they read as their initial values again (zeros in a file made with
        ``initialise=False``) and no region holds them for this generation."""
        self.where[rows] = 0

    def commit(self) -> dict:
        """Make the rows written so far durable and name them a generation; returns the state a
        checkpoint keeps (``where`` and the generation, no rows)."""
        os.fsync(self._fd)
        generation = int(self.meta["next_generation"])
        self.meta["next_generation"] = generation + 1
        self.meta["restorable"] = sorted(set(self.meta["restorable"]) | {generation})
        self._write_meta(self.meta)
        self._base, self._committed, self._written_since_base = generation, self.where.copy(), False
        return {"file_id": self.meta["file_id"], "generation": generation, "where": torch.from_numpy(self.where.copy())}

    def restore(self, state: dict) -> None:
        """Point at the records of a committed generation.

        Raises:
            StoreError: the generation's records were overwritten (a later run wrote over them), or
                ``where`` does not fit this store.
        """
        generation, where = int(state["generation"]), state["where"].numpy()
        if state["file_id"] != self.meta["file_id"]:
            raise StoreError(f"{self.folder}: the checkpoint's rows were in another file (id {state['file_id']}, "
                             f"this one is {self.meta['file_id']}: made anew since, or another folder)")
        if where.shape != (self.num_rows,) or where.dtype != np.uint8 or where.max(initial=0) > 2:
            raise StoreError(f"{self.folder}: a checkpoint's row map of shape {tuple(where.shape)} does not fit "
                             f"this store of {self.num_rows} rows")
        if generation not in self.meta["restorable"]:
            raise StoreError(f"{self.folder}: the checkpoint's rows (generation {generation}) were overwritten "
                             f"since; intact generations here: {self.meta['restorable'] or 'none'}")
        self.where = where.copy()
        self._base, self._committed, self._written_since_base = generation, where.copy(), False

    def disk_bytes(self) -> int:
        """Bytes the file takes on disk (its sparse regions count as far as written)."""
        return os.stat(self.path).st_blocks * 512

    def memory_bytes(self) -> int:
        """RAM of the row map (and its committed copy)."""
        return self.where.nbytes + (self._committed.nbytes if self._base is not None else 0)

    def close(self) -> None:
        """Release the files and the I/O threads."""
        self._pool.shutdown()
        os.close(self._fd)
        os.close(self._read_fd)
        self._lock.close()


def _parts(n: int, k: int) -> list[range]:
    """``range(n)`` in at most ``k`` contiguous parts."""
    step = max(-(-n // k), 1)
    return [range(i, min(i + step, n)) for i in range(0, n, step)]
