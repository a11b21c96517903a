"""Checkpoints of a Ray run: one shard per rank, saved and registered together by Ray Train.

At each checkpoint every rank writes ``rank-<r>.pt`` (its tables' rows and optimizer state, the dense
part, the data position) into a fresh local folder and hands it to ``ray.train.report``; rank 0 adds
``meta.json``. Ray uploads the folders of all ranks into one checkpoint directory under
``ray.storage_path`` (a local folder or any pyarrow/fsspec filesystem) and registers it only once
every rank's upload is done, so a worker lost mid-save leaves the previous checkpoint as the latest:
the save is atomic. On a restart (``FailureConfig`` retry, or the same job submitted again) each rank
reads only its own shard.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch


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
        """This rank's shard of the latest registered checkpoint, or None.

        Raises:
            ValueError: the checkpoint was written by a different number of workers or plan.
        """
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        fs, folder = checkpoint.filesystem, checkpoint.path
        with fs.open_input_stream(f"{folder}/meta.json") as f:
            meta = json.loads(f.read())
        if meta["world_size"] != self.world_size or meta["plan"] != self.plan:
            raise ValueError(
                f"checkpoint {checkpoint.path} was written by {meta['world_size']} workers with plan "
                f"{meta['plan']}; this run has {self.world_size} with {self.plan}. Resume with the same "
                "ray.num_workers and ray.sharding, or start afresh with train.resume=false")
        with fs.open_input_file(f"{folder}/{self._shard_name()}") as f:
            return torch.load(f, map_location="cpu", weights_only=False)

    def save(self, step: int, state: dict[str, Any], metrics: dict[str, float]) -> None:
        """Write this rank's shard and report it with ``metrics`` (a barrier across ranks)."""
        import ray.train

        with tempfile.TemporaryDirectory(prefix="recmem-ckpt-") as folder:
            torch.save(state, Path(folder) / self._shard_name())
            if self.rank == 0:
                meta = {"step": step, "world_size": self.world_size, "plan": self.plan}
                (Path(folder) / "meta.json").write_text(json.dumps(meta, indent=2))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    def _shard_name(self) -> str:
        return f"rank-{self.rank:05d}.pt"
