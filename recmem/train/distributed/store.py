"""Checkpoints of a Ray run: one shard per rank, saved and registered together by Ray Train.

At each checkpoint every rank writes ``rank-<r>.pt`` (its tables' rows and optimizer state, the dense
part, the data position) into a fresh local folder and hands it to ``ray.train.report``; rank 0 adds
``meta.json``. Ray uploads the folders of all ranks into one checkpoint directory under
``ray.storage_path`` (a local folder or any pyarrow/fsspec filesystem) and registers it only once
every rank's upload is done, so a worker lost mid-save leaves the previous checkpoint as the latest:
the save is atomic. On a restart (``FailureConfig`` retry, or the same job submitted again) each rank
reads only its own shard; so does each worker of ``recmem evaluate``, from the checkpoint the driver
found with :func:`latest_checkpoint` (this module imports torch only inside the workers' methods).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs

META = "meta.json"
"""Rank 0's part of every checkpoint: ``{"step", "world_size", "plan"}``."""


def shard_name(rank: int) -> str:
    """The file of ``rank``'s shard inside a checkpoint folder."""
    return f"rank-{rank:05d}.pt"


def latest_checkpoint(storage: str, name: str) -> tuple[pyarrow.fs.FileSystem, str, dict[str, Any]] | None:
    """The newest complete checkpoint of the Ray run ``name`` under ``storage``, without Ray or torch.

    Complete: its ``checkpoint_*`` folder holds ``meta.json`` and the shard of every rank (a save cut
    short leaves a folder without some); newest: the highest step.

    Args:
        storage: ``ray.storage_path`` as the run used it: an absolute folder or a pyarrow URI.
        name: the Ray run name (the folder under ``storage``).

    Returns:
        ``(filesystem, folder, meta)``, or None when the run has no complete checkpoint.
    """
    fs, base = pyarrow.fs.FileSystem.from_uri(storage)
    best = None
    for info in fs.get_file_info(pyarrow.fs.FileSelector(f"{base.rstrip('/')}/{name}", allow_not_found=True)):
        if info.type != pyarrow.fs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        files = {i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(info.path))}
        if META not in files:
            continue
        meta = _read_meta(fs, info.path)
        complete = all(shard_name(r) in files for r in range(meta["world_size"]))
        if complete and (best is None or meta["step"] > best[2]["step"]):
            best = (fs, info.path, meta)
    return best


def checkpointed_runs(storage: str) -> list[str]:
    """Names of the Ray runs under ``storage`` that have a complete checkpoint (for error messages)."""
    fs, base = pyarrow.fs.FileSystem.from_uri(storage)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
    names = sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory)
    return [n for n in names if latest_checkpoint(storage, n) is not None]


def _read_meta(fs: pyarrow.fs.FileSystem, folder: str) -> dict[str, Any]:
    with fs.open_input_stream(f"{folder}/{META}") as f:
        return json.loads(f.read())


class RayCheckpoints:
    """The loop's :class:`~recmem.train.checkpoint.CheckpointStore` inside a Ray Train worker.

    Args:
        rank: this worker.
        world_size: the number of workers; a checkpoint only resumes on as many.
        plan: the sharding plan; a checkpoint only resumes under the same one.
    """

    def __init__(self, rank: int, world_size: int, plan: dict[str, str]) -> None:
        self.rank = rank
        self.world_size = world_size
        self.plan = dict(plan)

    def load(self) -> dict[str, Any] | None:
        """This rank's shard of the latest registered checkpoint (``ray.train.get_checkpoint``), or None.

        Raises:
            ValueError: the checkpoint was written by a different number of workers or plan.
        """
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        return self.load_from(checkpoint.filesystem, checkpoint.path)

    def load_from(self, fs: pyarrow.fs.FileSystem, folder: str) -> dict[str, Any]:
        """This rank's shard of the checkpoint in ``folder`` on ``fs`` (e.g. from :func:`latest_checkpoint`).

        Raises:
            ValueError: the checkpoint was written by a different number of workers or plan.
        """
        import torch

        meta = _read_meta(fs, folder)
        if meta["world_size"] != self.world_size or meta["plan"] != self.plan:
            raise ValueError(
                f"checkpoint {folder} was written by {meta['world_size']} workers with plan "
                f"{meta['plan']}; these workers are {self.world_size} with {self.plan}. A checkpoint loads "
                "only with the same ray.num_workers and ray.sharding (train.resume=false starts afresh)")
        with fs.open_input_file(f"{folder}/{shard_name(self.rank)}") as f:
            return torch.load(f, map_location="cpu", weights_only=False)

    def save(self, step: int, state: dict[str, Any], metrics: dict[str, float]) -> None:
        """Write this rank's shard and report it with ``metrics`` (a barrier across ranks)."""
        import ray.train
        import torch

        with tempfile.TemporaryDirectory(prefix="recmem-ckpt-") as folder:
            torch.save(state, Path(folder) / shard_name(self.rank))
            if self.rank == 0:
                meta = {"step": step, "world_size": self.world_size, "plan": self.plan}
                (Path(folder) / META).write_text(json.dumps(meta, indent=2))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
