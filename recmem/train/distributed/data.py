"""Each Ray worker reads its own batches from the Parquet parts, by a plan the driver makes.

The driver reads only the footers: :func:`plan_splits` lists each split's part files and their row
groups (a :class:`~recmem.data.layout.SplitIndex`, local folder or filesystem URI) and hands it to
every worker. Worker r of W then reads, with pyarrow, only its own rows: with global batch B and
local batch b = B / W, its batch at step s is rows ``[s * B + r * b, s * B + (r + 1) * b)`` of the
split (:func:`worker_ranges`). So

- the W local batches of step s are exactly rows ``[s * B, (s + 1) * B)``, the batch one worker with
  ``batch_size`` B trains at step s: W workers see the same global batches as one;
- a worker resuming at its batch k skips exactly the k batches it trained before (no row trained
  twice, none skipped), and reads none of them: the footers say where its next batch starts;
- every worker gets the same number of batches, which sharded tables need: their exchanges are
  collective and a worker with one batch more would wait forever. Training keeps whole global
  batches only (as one worker does); validation also splits the last, partial global batch evenly,
  leaving out its last ``rows mod W`` rows (fewer than W).

Ray stays the engine (it starts, places and restarts the workers: ``group.py``); Ray Data is not in the
path: its per-block overhead at one-batch blocks held a worker to about 10k rows/s, where reading
the row groups directly delivers hundreds of thousands (``BENCHMARKS.md``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from recmem.config import Config, ConfigError
from recmem.data.layout import SplitIndex, check_trainable, index_split

if TYPE_CHECKING:
    from recmem.data.batch import Batch

SPLITS = ("train", "valid")


def local_batch_size(cfg: Config, world_size: int) -> int:
    """Rows per worker per step: ``data.batch_size`` is the global batch, split evenly.

    Raises:
        ConfigError: the global batch does not divide by the number of workers.
    """
    if cfg.data.batch_size % world_size:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} rows do not split evenly over "
                          f"ray.num_workers={world_size} workers")
    return cfg.data.batch_size // world_size


def plan_splits(cfg: Config, world_size: int, splits: tuple[str, ...] = SPLITS) -> dict[str, SplitIndex]:
    """Where the rows of ``cfg.data.root``'s ``splits`` lie (footers only): the workers' reading plan.

    Raises:
        FileNotFoundError: the data root or a split is missing.
        DataError: a part lacks a column of the schema, or a split is too small (see
            :func:`~recmem.data.layout.check_trainable`).
        ConfigError: the batch does not split over the workers.
    """
    local_batch_size(cfg, world_size)
    indexes = {split: index_split(cfg.data.root, split, cfg.data.schema) for split in splits}
    check_trainable(indexes, cfg.data.batch_size)
    return indexes


def worker_ranges(rows: int, batch_size: int, world_size: int, rank: int, *, train: bool) -> list[tuple[int, int]]:
    """The row ranges ``[begin, end)`` of worker ``rank``'s batches, one per step, in order.

    Args:
        rows: rows in the split.
        batch_size: the global batch B (divisible by ``world_size``).
        world_size: W.
        rank: this worker's rank.
        train: keep whole global batches only; else also share the last partial one out evenly.
    """
    local = batch_size // world_size
    steps = rows // batch_size
    ranges = [(s * batch_size + rank * local, s * batch_size + (rank + 1) * local) for s in range(steps)]
    piece = (rows - steps * batch_size) // world_size
    if not train and piece:
        begin = steps * batch_size + rank * piece
        ranges.append((begin, begin + piece))
    return ranges


def shard_source(cfg: Config, world_size: int, rank: int, indexes: dict[str, SplitIndex]):
    """Worker ``rank``'s :data:`~recmem.train.loop.BatchSource` over the splits of ``indexes``.

    Every epoch reads the split in the same order; ``start_batch`` skips that many of this worker's
    batches without reading them.
    """
    from recmem.data.dataset import read_ranges

    def source(split: str, epoch: int, start_batch: int) -> Iterator[Batch]:
        index = indexes[split]
        ranges = worker_ranges(index.rows, cfg.data.batch_size, world_size, rank, train=split == "train")
        return read_ranges(index, cfg.data.schema, ranges[start_batch:])

    return source
