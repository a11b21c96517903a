"""Checkpoints of a Ray run: one shard per rank in one folder, made complete by rank 0's ``meta.json``.

At each checkpoint every rank writes ``rank-<r>.pt`` (its tables' rows and optimizer state, the dense
part, the data position) and its record ``rank-<r>.json`` (size and SHA-256) straight into
``<ray.storage_path>/<run>/checkpoint_<step:09d>-<group>/`` (a local folder or any pyarrow filesystem
URI; ``<group>`` is the worker group's start, so a step saved again after a restart gets a folder of
its own). Then all ranks meet at a barrier, and rank 0 writes ``meta.json`` (step, workers, plan, and
the job's resume key, which the driver compares before a resume: see ``recmem/train/resume.py``) last,
by rename on a local disk: a folder without it, or without every rank's shard, is never loaded
(:func:`complete_checkpoints`), so a worker lost mid-save leaves the previous checkpoint as the latest.
Rank 0 then keeps the newest two complete checkpoints and removes older ones, and folders a cut-short
save left behind older than the newest complete one.

On a start (a restarted worker group, or the same job submitted again) each rank reads only its own
shard of the run's newest complete checkpoint; so does each worker of ``recmem evaluate`` and ``recmem
export``, in the checkpoint the driver found with :func:`latest_checkpoint` (this module imports torch
only inside the workers' methods). A shard is trusted only when its size and checksum match its
record and it unpickles as tensors and plain data (``weights_only``: a pickled object that would run
code is refused unread). A shard that fails any of this (corrupt, truncated, replaced) on any rank
makes all ranks use the run's previous complete checkpoint instead, since retrying the same one would
fail on every restart.
"""

from __future__ import annotations

import json
import posixpath
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.fs

META = "meta.json"
"""Rank 0's part of every checkpoint: ``{"step", "world_size", "plan", "resume_key"}``."""


def shard_name(rank: int) -> str:
    """The file of ``rank``'s shard inside a checkpoint folder."""
    return f"rank-{rank:05d}.pt"


def record_name(rank: int) -> str:
    """The record (``{"bytes", "sha256"}``) of ``rank``'s shard inside a checkpoint folder."""
    return f"rank-{rank:05d}.json"


def write_shard(folder: Path, rank: int, state: dict[str, Any]) -> None:
    """Save ``rank``'s ``state`` into the local ``folder`` with its record (size and checksum)."""
    import torch

    from recmem.train.checkpoint import file_sha256

    path = Path(folder) / shard_name(rank)
    torch.save(state, path)
    record = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    (Path(folder) / record_name(rank)).write_text(json.dumps(record))


def latest_checkpoint(storage: str, name: str) -> tuple[pyarrow.fs.FileSystem, str, dict[str, Any]] | None:
    """The newest complete checkpoint of the Ray run ``name`` under ``storage``, without Ray or torch.

    Args:
        storage: ``ray.storage_path`` as the run used it: an absolute folder or a pyarrow URI.
        name: the Ray run name (the folder under ``storage``).

    Returns:
        ``(filesystem, folder, meta)``, or None when the run has no complete checkpoint (see
        :func:`complete_checkpoints`).
    """
    fs, base = pyarrow.fs.FileSystem.from_uri(storage)
    found = complete_checkpoints(fs, f"{base.rstrip('/')}/{name}")
    return (fs, *found[0]) if found else None


def complete_checkpoints(fs: pyarrow.fs.FileSystem, run: str) -> list[tuple[str, dict[str, Any]]]:
    """The complete checkpoints in the Ray run folder ``run`` on ``fs``, newest first, without torch.

    Complete: its ``checkpoint_*`` folder holds a readable ``meta.json`` and the shard of every rank
    (a save cut short leaves a folder without some); newest: the highest step, then the latest folder
    name (Ray names them by the time they were saved).

    Returns:
        ``[(folder, meta), ...]``; empty when there is none (or no such run folder).
    """
    found = []
    for info in fs.get_file_info(pyarrow.fs.FileSelector(run, allow_not_found=True)):
        if info.type != pyarrow.fs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        files = {i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(info.path))}
        if META not in files:
            continue
        try:
            meta = _read_meta(fs, info.path)
        except ValueError:  # a garbled meta.json: as unusable as a missing one
            continue
        if all(shard_name(r) in files for r in range(meta["world_size"])):
            found.append((info.path, meta))
    return sorted(found, key=lambda c: (c[1]["step"], c[0]), reverse=True)


def checkpointed_runs(storage: str) -> list[str]:
    """Names of the Ray runs under ``storage`` that have a complete checkpoint (for error messages)."""
    fs, base = pyarrow.fs.FileSystem.from_uri(storage)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
    names = sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory)
    return [n for n in names if latest_checkpoint(storage, n) is not None]


def _read_meta(fs: pyarrow.fs.FileSystem, folder: str) -> dict[str, Any]:
    with fs.open_input_stream(f"{folder}/{META}") as f:
        return json.loads(f.read())


def _gloo_group() -> Any:
    """A gloo group of all ranks for the checkpoint agreement (host objects); collective.

    The default group when it is gloo; under ``train.device: cuda`` it is NCCL, which carries only
    GPU tensors, so every rank creates a gloo group of its own, in the same order.
    """
    import torch.distributed as dist

    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


class RayCheckpoints:
    """The loop's :class:`~recmem.train.checkpoint.CheckpointStore` inside a Ray worker.

    Args:
        rank: this worker.
        world_size: the number of workers; a checkpoint only resumes on as many.
        plan: the sharding plan; a checkpoint only resumes under the same one.
        key: the job's resume key, recorded in ``meta.json`` (the driver compares it on resume).
        run: (filesystem, run folder) the checkpoints go into and resume from; None (``recmem
            evaluate`` and ``export``, which name their checkpoint) neither loads nor saves.
        group: the worker group's start (``WorkerContext.group_id``), in the folders it saves.
    """

    def __init__(self, rank: int, world_size: int, plan: dict[str, str], key: dict[str, Any] | None = None,
                 run: tuple[pyarrow.fs.FileSystem, str] | None = None, group: str = "") -> None:
        self.rank = rank
        self.world_size = world_size
        self.plan = dict(plan)
        self.key = key
        self.run = run
        self.group = group
        self.loaded_from: str | None = None
        self.saved: tuple[str, dict[str, float]] | None = None
        """The folder of this store's last save and the metrics saved with it (rank 0's are the run's)."""
        self._gloo: list[Any] = []  # the group of the checkpoint collectives, made at the first one

    @contextmanager
    def session(self, state_bytes: int) -> Iterator[None]:
        """Check that this worker can write its shard: the run folder on a local disk (the driver checked
        that it is writable and holds the run's lock), else the local temporary folder its shard is
        written to before the upload, with room for it.

        Raises:
            OSError: the folder is not writable or its disk is too full.
        """
        from recmem.train.checkpoint import check_writable

        if self.run is not None:
            fs, folder = self.run
            local = isinstance(fs, pyarrow.fs.LocalFileSystem)
            if local:
                fs.create_dir(folder, recursive=True)
            check_writable(Path(folder) if local else Path(tempfile.gettempdir()), state_bytes)
        yield

    def load(self) -> dict[str, Any] | None:
        """This rank's shard of the newest checkpoint of the run that loads on every rank, or None when
        the run has no complete checkpoint.

        Its complete checkpoints are tried newest first. A shard that does not load (corrupt,
        truncated) on any rank moves every rank to the one before, and rank 0 prints which was skipped
        and why: retrying the same checkpoint would fail the same way on every restart. Collective
        when there are several workers: every rank calls it at the same point.

        Raises:
            ValueError: the newest checkpoint was written by a different number of workers or plan
                (not a fault of the checkpoint: no fallback).
            RuntimeError: the run has complete checkpoints, but none loads on every rank.
        """
        if self.run is None:
            return None
        return self.load_newest(*self.run, required=False)

    def load_newest(self, fs: pyarrow.fs.FileSystem, run: str, required: bool = True) -> dict[str, Any] | None:
        """This rank's shard of the newest complete checkpoint in the run folder ``run`` that loads on
        every rank (see :meth:`load`); collective when there are several workers.

        Returns:
            The shard's state; None when the run has no complete checkpoint and not ``required``.

        Raises:
            ValueError: that checkpoint was written by a different number of workers or plan.
            RuntimeError: no complete checkpoint of the run loads on every rank.
        """
        group = self._group()
        folders = self._agree(group, [folder for folder, _ in complete_checkpoints(fs, run)])
        if not folders and not required:
            return None
        for folder in folders:
            self._check_meta(fs, folder)
            try:
                state, error = self._read_shard(fs, folder), None
            except Exception as e:  # any unreadable shard: the ranks agree below to try the one before
                state, error = None, f"{type(e).__name__}: {e}"
            errors = self._gather(group, error)
            if not any(errors):
                self.loaded_from = folder
                return state
            if self.rank == 0:
                why = "; ".join(f"rank {r}: {e}" for r, e in enumerate(errors) if e)
                print(f"recmem: skipping checkpoint {folder}, a shard does not load ({why}); trying the one before")
        raise RuntimeError(f"no checkpoint of the Ray run {run} loads on all {self.world_size} workers "
                           f"({len(folders)} complete ones tried); train.resume=false starts afresh")

    def save(self, step: int, state: dict[str, Any], metrics: dict[str, float]) -> None:
        """Write this rank's shard into the checkpoint of ``step``; once every rank has (a barrier),
        rank 0 commits it with ``meta.json`` and removes the checkpoints it replaces."""
        if self.run is None:
            raise RuntimeError("this RayCheckpoints has no run folder to save into")
        fs, run = self.run
        folder = f"{run}/checkpoint_{step:09d}-{self.group}"
        fs.create_dir(folder, recursive=True)
        if isinstance(fs, pyarrow.fs.LocalFileSystem):
            write_shard(Path(folder), self.rank, state)
        else:  # written locally, then uploaded: the record (its checksum) after the shard
            with tempfile.TemporaryDirectory(prefix="recmem-ckpt-") as local:
                write_shard(Path(local), self.rank, state)
                for name in (shard_name(self.rank), record_name(self.rank)):
                    pyarrow.fs.copy_files(f"{local}/{name}", f"{folder}/{name}",
                                          source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self._group())
        if self.rank == 0:
            meta = {"step": step, "world_size": self.world_size, "plan": self.plan, "resume_key": self.key}
            _write_meta(fs, folder, meta)
            _prune(fs, run, keep=2)
        self.saved = (folder, dict(metrics))

    def _group(self) -> Any:
        """The process group of this store's collectives (see :func:`_gloo_group`), made on first use."""
        if self.world_size > 1 and not self._gloo:
            self._gloo.append(_gloo_group())
        return self._gloo[0] if self._gloo else None

    def _check_meta(self, fs: pyarrow.fs.FileSystem, folder: str) -> None:
        meta = _read_meta(fs, folder)
        if meta["world_size"] != self.world_size or meta["plan"] != self.plan:
            raise ValueError(
                f"checkpoint {folder} was written by {meta['world_size']} workers with plan "
                f"{meta['plan']}; these workers are {self.world_size} with {self.plan}. A checkpoint loads "
                "only with the same ray.num_workers and ray.sharding (train.resume=false starts afresh)")

    def _read_shard(self, fs: pyarrow.fs.FileSystem, folder: str) -> dict[str, Any]:
        """This rank's shard in ``folder``, verified against its record (see the module's docstring).

        Raises:
            ValueError: the record is missing or unreadable, or the shard does not verify or load.
        """
        import hashlib
        import io

        from recmem.train.checkpoint import safe_load, verify

        try:
            with fs.open_input_stream(f"{folder}/{record_name(self.rank)}") as f:
                record = json.loads(f.read())
        except FileNotFoundError:
            raise ValueError(f"{record_name(self.rank)} is missing (an older recmem wrote it, or the upload was cut)") from None
        except (OSError, ValueError) as e:
            raise ValueError(f"{record_name(self.rank)} does not read ({e})") from None
        with fs.open_input_file(f"{folder}/{shard_name(self.rank)}") as f:
            data = f.read()
        verify(record, len(data), hashlib.sha256(data).hexdigest())
        return safe_load(io.BytesIO(data))

    def _agree(self, group: Any, folders: list[str]) -> list[str]:
        """Rank 0's list of ``folders`` on every rank: all try the same checkpoints in the same order."""
        if self.world_size == 1:
            return folders
        import torch.distributed as dist

        shared = [folders]
        dist.broadcast_object_list(shared, src=0, group=group)
        return shared[0]

    def _gather(self, group: Any, error: str | None) -> list[str | None]:
        """Every rank's ``error`` (None: its shard loaded), in rank order, on every rank."""
        if self.world_size == 1:
            return [error]
        import torch.distributed as dist

        errors: list[str | None] = [None] * self.world_size
        dist.all_gather_object(errors, error, group=group)
        return errors


def _write_meta(fs: pyarrow.fs.FileSystem, folder: str, meta: dict[str, Any]) -> None:
    """Write ``meta.json`` into ``folder``: under a temporary name, then renamed, on a local disk (a
    crash leaves no half-written meta); directly on an object store, whose writes appear whole."""
    data = json.dumps(meta, indent=2).encode()
    final = f"{folder}/{META}"
    if not isinstance(fs, pyarrow.fs.LocalFileSystem):
        with fs.open_output_stream(final) as f:
            f.write(data)
        return
    temporary = f"{folder}/.{META}.tmp"
    with fs.open_output_stream(temporary) as f:
        f.write(data)
    fs.move(temporary, final)


def _prune(fs: pyarrow.fs.FileSystem, run: str, keep: int) -> None:
    """Remove all but the newest ``keep`` complete checkpoints of ``run``, and the incomplete folders
    (a save cut short) named before the newest complete one (names sort by step, then group start)."""
    complete = complete_checkpoints(fs, run)
    if not complete:
        return
    kept = {folder for folder, _ in complete[:keep]}
    done = {folder for folder, _ in complete}
    newest = posixpath.basename(complete[0][0])
    for info in fs.get_file_info(pyarrow.fs.FileSelector(run, allow_not_found=True)):
        if info.type != pyarrow.fs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        if info.path in kept or (info.path not in done and info.base_name >= newest):
            continue
        fs.delete_dir(info.path)
