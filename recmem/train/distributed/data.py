"""Ray Data in, Batches out: the driver declares the datasets, each worker streams its split of them.

The driver reads only Parquet footers: ``read_parquet`` streams the part files in read tasks spread
over the cluster, ``repartition`` cuts them into blocks of exactly one local batch
(``data.batch_size / W`` rows), and Ray Train's ``streaming_split`` deals the blocks to the W workers. With order preserved and
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

import fnmatch
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs
import pyarrow.parquet as pq

from recmem.config import Config, ConfigError
from recmem.data.layout import PART_GLOB, part_files

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


def build_datasets(cfg: Config, world_size: int, splits: tuple[str, ...] = SPLITS) -> dict[str, Any]:
    """The Ray Datasets of ``cfg.data.root``'s ``splits`` (lazy: only footers are read).

    Training keeps whole global batches only (the loop drops a last partial batch anyway): with a
    number of blocks that divides by W the deal stays round-robin to the very end, where Ray's
    splitter would otherwise share the leftover blocks out of turn to even the workers' rows.

    Raises:
        FileNotFoundError: the data root or a split is missing.
        ConfigError: the batch does not split over the workers.
    """
    import ray.data

    rows = local_batch_size(cfg, world_size)
    # Captured by the datasets: their executions (on the cluster) draw bars and announce themselves
    # only when asked to. Training progress is recmem's own bar; these are for debugging.
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = cfg.tracking.verbose
    out = {}
    for split in splits:
        fs, paths = _part_files(cfg.data.root, split)
        dataset = ray.data.read_parquet(paths, filesystem=fs, columns=_columns(cfg, fs, paths[0]))
        if split == "train":
            total = sum(pq.read_metadata(path, filesystem=fs).num_rows for path in paths)
            dataset = dataset.limit(total // cfg.data.batch_size * cfg.data.batch_size)
        out[split] = dataset.repartition(target_num_rows_per_block=rows, strict=True)
    return out


def _part_files(root: str, split: str) -> tuple[pyarrow.fs.FileSystem, list[str]]:
    """The split's part files in order, on a local disk or any pyarrow filesystem URI."""
    if "://" not in root:
        return pyarrow.fs.LocalFileSystem(), [str(p) for p in part_files(Path(root), split)]
    fs, folder = pyarrow.fs.FileSystem.from_uri(f"{root.rstrip('/')}/{split}")
    infos = fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
    paths = sorted(i.path for i in infos if fnmatch.fnmatch(i.base_name, PART_GLOB))
    if not paths:
        raise FileNotFoundError(f"{root}/{split}: no {PART_GLOB} files")
    return fs, paths


def _columns(cfg: Config, fs: pyarrow.fs.FileSystem, first: str) -> list[str]:
    """The schema's columns, plus event time and true probability when the data has them."""
    schema = cfg.data.schema
    names = pq.read_schema(first, filesystem=fs).names
    optional = [c for c in (schema.event_time, schema.true_prob) if c is not None and c in names]
    return [schema.label, *schema.dense, *schema.sparse, *optional]


def shard_source(cfg: Config, world_size: int, splits: tuple[str, ...] = SPLITS):
    """This worker's :data:`~recmem.train.loop.BatchSource` over its Ray Train dataset shards.

    Call inside a Ray Train worker whose trainer got :func:`build_datasets` of the same ``splits``.
    Training drops a last partial batch; validation keeps it (every worker has the same rows, so the
    same batches).
    """
    import ray.train

    from recmem.data.collate import collate

    rows = local_batch_size(cfg, world_size)
    shards = {split: ray.train.get_dataset_shard(split) for split in splits}

    def source(split: str, epoch: int, start_batch: int) -> Iterator[Batch]:
        tables = shards[split].iter_batches(
            batch_size=rows, batch_format="pyarrow", drop_last=split == "train", prefetch_batches=1)
        for i, table in enumerate(tables):
            if i >= start_batch:
                yield collate(table, cfg.data.schema)

    return source
