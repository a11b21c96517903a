"""`ssd`: tables larger than RAM. Rows and their optimizer state live on local disk, a bounded RAM
cache holds the hot ones, and the rows of the next batches are read while the current one trains.

Each feature's table has ``num_embeddings`` rows addressed as the ``hash`` kind addresses them
(``id mod num_embeddings``) and starts from the very values a ``hash`` table of the same seed starts
from, so the two train to the same weights: the disk changes where rows wait, not what they become.
fbgemm's SSD tables (CUDA only) and torchrec's prefetch pipeline are the model: a key-value store
(``store.py``), a cache in front (``cache.py``), ``prefetch`` ahead of the step, rows pinned while a
batch in the window needs them. Offline training knows its next batches, so the loop tells the
table exactly which rows are coming (``recmem/train/lookahead.py``) instead of it guessing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numba import njit
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recmem.config import POSITIVE, ConfigError, Range, TableConfig, checked, from_dict
from recmem.lock import LockedError
from recmem.tables.base import ServingForm, check_width
from recmem.tables.hash import ModRouter
from recmem.tables.sharded import KindShard
from recmem.tables.ssd.cache import CacheTooSmall
from recmem.tables.ssd.rows import DiskRows
from recmem.tables.ssd.store import RowStore, StoreError

__all__ = ["CacheTooSmall", "SSDOptions", "SSDTable", "StoreError"]


@dataclass
class SSDOptions:
    """``options`` of an ``ssd`` table block.

    Attributes:
        path: the folder of the row file (one per table block; made if missing). A file made for
            the same rows, width and seed is reused, so a restart does not rewrite the initial rows.
        cache_rows: rows held in RAM, shared by the block's features; it must hold every row the
            batches in the prefetch window need at once (a smaller cache is an error naming the minimum).
        io_threads: threads reading from disk at once where reads do not go through kernel AIO
            (rows written back go to the file's log in one sequential write per batch).
        direct_io: read and append with O_DIRECT, bypassing the page cache (which otherwise keeps
            recently read and written blocks in RAM outside the cache's bound). Reads then go
            through Linux's kernel AIO where it is available (a third of the threads' kernel time
            per read: ``store.py``).
        io_depth: reads in flight through kernel AIO (with ``direct_io``; 0: threads only).
    """

    path: str = checked("", non_empty=True)
    cache_rows: int = checked(65536, POSITIVE)
    io_threads: int = checked(16, Range(1, 256))
    direct_io: bool = False
    io_depth: int = checked(256, Range(0, 4096))


class SSDTable(torch.nn.Module):
    """F tables of ``num_embeddings`` rows each on disk, behind one RAM cache.

    Args:
        feature_names: the F features, one table each.
        num_embeddings: rows per table.
        embedding_dim: D.
        learning_rate: row-wise Adagrad step size.
        path: the row file's folder.
        cache_rows: slots in RAM.
        seed: seeds the initial rows (as ``FusedRowwiseAdagrad`` with this seed draws them).
        io_threads, direct_io, io_depth: as in :class:`SSDOptions`.
        rank, world_size: hold only the rows worker ``rank`` of ``world_size`` owns in the ID-sharded
            path (rows ``k`` with ``k mod W == rank``, at local row ``k // W``); a forward then gets
            those row numbers, not raw IDs (``recmem/tables/sharded.py``).
    """

    def __init__(self, feature_names: list[str], num_embeddings: int, embedding_dim: int, learning_rate: float,
                 path: str | Path, cache_rows: int, seed: int = 0, io_threads: int = 16,
                 direct_io: bool = False, rank: int = 0, world_size: int = 1, io_depth: int = 256) -> None:
        super().__init__()
        self.feature_names = list(feature_names)
        self.num_embeddings, self.embedding_dim, self.world_size = num_embeddings, embedding_dim, world_size
        store = RowStore(path, [num_embeddings] * len(feature_names), embedding_dim, seed, io_threads, direct_io,
                         rank, world_size, io_depth=io_depth)
        self._local_rows = store.rows[0] if store.rows else 0
        # Not a module: the cached rows belong to the disk and are written back at each checkpoint;
        # the state dict carries the row map (get_extra_state), never a copy of the rows.
        self.disk = DiskRows(store, cache_rows, learning_rate)

    @classmethod
    def from_config(cls, cfg: TableConfig, feature_names: list[str], seed: int, data_root: Path, where: str,
                    output_dim: int | None = None) -> "SSDTable":
        """Build from a table block: ``num_embeddings`` rows per feature, knobs in ``options``."""
        check_width(cfg, where, output_dim)
        return _build(cls, cfg, feature_names, seed, where)

    @classmethod
    def shard_from_config(cls, cfg: TableConfig, feature_names: list[str], seed: int, data_root: Path,
                          where: str, rank: int, world_size: int) -> KindShard:
        """Worker ``rank``'s part for the ID-sharded path: rows routed ``id mod n``, row k owned by worker
        ``k mod W`` (as a sharded ``hash`` table), kept in ``<path>/rank-<r>-of-<W>`` behind a cache of
        ``cache_rows / W`` rows."""
        shard = _build(cls, cfg, feature_names, seed, where, rank, world_size)
        return KindShard(router=ModRouter(cfg.num_embeddings), shard=shard)

    def _rows(self, features: KeyedJaggedTensor) -> np.ndarray:
        """[N] row of each ID in the store: feature f's rows start at f * (its rows here)."""
        if features.keys() != self.feature_names:
            raise ValueError(f"expected features {self.feature_names}, got {features.keys()}")
        ends = np.cumsum(features.length_per_key(), dtype=np.int64)  # [F] end of each feature's IDs
        return _store_rows(features.values().numpy(), ends, self.num_embeddings, self.world_size, self._local_rows)

    def prefetch(self, features: KeyedJaggedTensor) -> np.ndarray:
        """Pin the rows of an upcoming batch and start reading the missing ones; returns the ticket
        (their slots) for :meth:`release`."""
        return self.disk.prefetch(self._rows(features))

    def release(self, ticket: np.ndarray) -> None:
        """Unpin the rows :meth:`prefetch` pinned for one batch."""
        self.disk.release(ticket)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Raw-ID KJT of ``feature_names`` -> [B, F, D]; waits for rows still on their way from disk.

        A batch nobody prefetched is fetched here and stays pinned until the next forward.
        """
        batch = features.stride()
        pooled = self.disk.pool(self._rows(features), features.offsets(), self.training)  # [F * B, 1, D]
        return pooled.view(len(self.feature_names), batch, self.embedding_dim).transpose(0, 1)  # [B, F, D]

    def memory_bytes(self) -> int:
        """RAM: the cache's rows and Adagrad state, its bookkeeping and the store's row map."""
        return self.disk.memory_bytes()

    def stats(self) -> dict[str, float]:
        """The disk rows' figures (``DiskRows.stats``: hit rates, prefetch wait, disk traffic per step,
        bytes on disk) and the bytes in RAM. Counters restart after each call."""
        return {**self.disk.stats(), "memory_bytes": float(self.memory_bytes())}

    def to_serving(self) -> list[ServingForm]:
        """Per feature: all its rows, read from disk once the dirty ones are written back, looked up
        by ``id mod num_embeddings``."""
        n = self._local_rows
        return [ServingForm("modulo", {"rows": self.disk.read(np.arange(f * n, (f + 1) * n, dtype=np.int64))})
                for f in range(len(self.feature_names))]

    def close(self) -> None:
        """Stop the I/O worker and let go of the folder (rows not written back since the last
        checkpoint or ``to_serving`` are dropped, as a crash would drop them)."""
        self.disk.close()

    def get_extra_state(self) -> dict[str, Any]:
        """Write every dirty row back and commit the file: the state names the committed records
        (``loc``, four bytes a row, and the generation), never copies them."""
        return self.disk.commit()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Point at a checkpoint's records and empty the cache (its rows belong to the state replaced)."""
        self.disk.restore(state)

@njit(cache=True)
def _store_rows(values: np.ndarray, ends: np.ndarray, rows: int, world_size: int, local_rows: int) -> np.ndarray:
    """[N] raw IDs, feature f's ending at ``ends[f]`` -> [N] store rows ``f * local_rows + (id mod rows) // W``
    (one pass: the step's bookkeeping runs beside torch's threads, so every pass over the batch counts)."""
    out = np.empty(values.shape[0], dtype=np.int64)
    start = 0
    for f in range(ends.shape[0]):
        for i in range(start, ends[f]):
            out[i] = f * local_rows + (values[i] % rows) // world_size
        start = ends[f]
    return out


def _build(cls: type[SSDTable], cfg: TableConfig, feature_names: list[str], seed: int, where: str,
           rank: int = 0, world_size: int = 1) -> SSDTable:
    """A table (or worker ``rank``'s part of one) from a config block; errors name the key."""
    if cfg.num_embeddings < 1:
        raise ConfigError(f"{where}.num_embeddings: the ssd kind needs rows per table (> 0)")
    o = from_dict(SSDOptions, cfg.options, f"{where}.options")
    path = Path(o.path) if world_size == 1 else Path(o.path) / f"rank-{rank}-of-{world_size}"
    try:
        return cls(feature_names, cfg.num_embeddings, cfg.embedding_dim, cfg.learning_rate, path,
                   max(-(-o.cache_rows // world_size), 1), seed, o.io_threads, o.direct_io, rank, world_size,
                   o.io_depth)
    except ValueError as e:
        raise ConfigError(f"{where}.embedding_dim: {e}") from None
    except (OSError, StoreError, LockedError) as e:
        raise ConfigError(f"{where}.options.path: {e}") from None
