"""Atomic checkpoints: write a temporary file beside the target, fsync, then rename over it.

A crash mid-write leaves the previous checkpoint intact; a reader never sees half a file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Protocol

import torch

_NAME = re.compile(r"^step-(\d{9})\.pt$")


class CheckpointStore(Protocol):
    """Where the training loop keeps its checkpoints.

    Every rank calls :meth:`load` once at the start and :meth:`save` at the same steps: a
    distributed store (Ray's, in ``recmem/train/distributed``) saves each rank's shard together.
    """

    def load(self) -> dict[str, Any] | None:
        """This rank's state from the latest complete checkpoint, or None to start afresh."""
        ...

    def save(self, step: int, state: dict[str, Any], metrics: dict[str, float]) -> None:
        """Persist this rank's ``state`` at ``step`` (``metrics`` describe it)."""
        ...


class LocalCheckpoints:
    """The single-process store: atomic files in one directory (see :func:`save_checkpoint`).

    Args:
        directory: where the ``step-*.pt`` files go.
        resume: False ignores existing checkpoints (they are still overwritten in turn).
        keep: how many of the newest files to keep.
    """

    def __init__(self, directory: str | Path, resume: bool = True, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.resume = resume
        self.keep = keep

    def load(self) -> dict[str, Any] | None:
        """The newest readable checkpoint when resuming, else None."""
        return load_latest(self.directory) if self.resume else None

    def save(self, step: int, state: dict[str, Any], metrics: dict[str, float]) -> None:
        """Write ``state`` atomically; ``metrics`` are not stored (MLflow has them)."""
        save_checkpoint(self.directory, step, state, self.keep)


def save_checkpoint(directory: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` as ``directory/step-<step>.pt`` atomically; keep the newest ``keep`` files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:09d}.pt"
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first (temporary files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def load_latest(directory: str | Path) -> dict[str, Any] | None:
    """The newest readable checkpoint's state, or None. A corrupt newest file falls back to the one before."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # a truncated or corrupt file: say so and try the previous one
            print(f"recmem: skipping unreadable checkpoint {path}: {e}")
    return None
