"""Ray Data in, Batches out: the driver declares the datasets, each worker streams its split of them.

The driver reads nothing: ``read_parquet`` streams the part files in read tasks spread over the
cluster, ``repartition`` cuts them into blocks of exactly one local batch (``data.batch_size / W``
rows), and Ray Train's ``streaming_split`` deals the blocks to the W workers. With order preserved and
no locality preference, the splitter hands each block to the worker that has received the fewest
rows, which for equal blocks is round-robin: worker r's step-s batch is block ``s * W + r``. So

- the W local batches of step s are exactly rows ``[s * B, (s + 1) * B)``, the batch one worker with
  ``batch_size`` B trains at step s: W workers see the same global batches as one;
- the deal is a function of the data alone, so a worker resuming at its batch k skips exactly the k
  batches it trained before (no row trained twice, none skipped);
- every worker gets the same number of batches, which sharded tables need: their exchanges are
  collective and a worker with one batch more would wait forever.

Skipped batches are still read (Ray Data cannot seek), but not collated or trained.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs
import pyarrow.parquet as pq

from recmem.config import Config, ConfigError

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


def build_datasets(cfg: Config, world_size: int) -> dict[str, Any]:
    """The ``train`` and ``valid`` Ray Datasets of ``cfg.data.root`` (lazy: nothing is read yet).

    Raises:
        FileNotFoundError: a local data root or split is missing.
        ConfigError: the batch does not split over the workers.
    """
    import ray.data

    rows = local_batch_size(cfg, world_size)
    # Captured by the datasets: their executions (on the cluster) draw bars only when asked to.
    ray.data.DataContext.get_current().enable_progress_bars = cfg.train.progress
    out = {}
    for split in SPLITS:
        paths = _split_paths(cfg.data.root, split)
        columns = _columns(cfg, paths)
        dataset = ray.data.read_parquet(paths, columns=columns, file_extensions=["parquet"])
        out[split] = dataset.repartition(target_num_rows_per_block=rows, strict=True)
    return out


def _split_paths(root: str, split: str) -> list[str] | str:
    """Local roots: the sorted part files (a missing split fails here, clearly); URIs: the folder."""
    if "://" in root:
        return f"{root.rstrip('/')}/{split}"
    from recmem.data.layout import part_files

    return [str(p) for p in part_files(Path(root), split)]


def _columns(cfg: Config, paths: list[str] | str) -> list[str]:
    """The schema's columns, plus event time and true probability when the data has them."""
    schema = cfg.data.schema
    if isinstance(paths, str):
        fs, folder = pyarrow.fs.FileSystem.from_uri(paths)
        first = min(i.path for i in fs.get_file_info(pyarrow.fs.FileSelector(folder)) if i.path.endswith(".parquet"))
        names = pq.read_schema(first, filesystem=fs).names
    else:
        names = pq.read_schema(paths[0]).names
    optional = [c for c in (schema.event_time, schema.true_prob) if c is not None and c in names]
    return [schema.label, *schema.dense, *schema.sparse, *optional]


def shard_source(cfg: Config, world_size: int):
    """This worker's :data:`~recmem.train.loop.BatchSource` over its Ray Train dataset shards.

    Call inside a Ray Train worker. Training drops a last partial batch; validation keeps it (every
    worker has the same rows, so the same batches).
    """
    import ray.train

    from recmem.data.collate import collate

    rows = local_batch_size(cfg, world_size)
    shards = {split: ray.train.get_dataset_shard(split) for split in SPLITS}

    def source(split: str, epoch: int, start_batch: int) -> Iterator[Batch]:
        tables = shards[split].iter_batches(
            batch_size=rows, batch_format="pyarrow", drop_last=split == "train", prefetch_batches=1)
        for i, table in enumerate(tables):
            if i >= start_batch:
                yield collate(table, cfg.data.schema)

    return source
