"""Verified atomic checkpoints: ``step-<N>.pt`` (the state) and ``step-<N>.json`` (its record).

A save writes the state to a temporary file, fsyncs it, hashes it, writes the record (step, size,
SHA-256, the job's resume key: see ``resume.py``) the same way, then renames the record and the state
into place. A crash mid-save leaves the previous checkpoint as the newest complete one and at most a
temporary file, which the next run removes; a failed save removes its own.

A load trusts nothing it reads: a state without its record, a size or checksum that does not match
(bytes changed after the save), or a file that does not unpickle as plain data and tensors
(``torch.load(weights_only=True)``: a pickled object that would run code is refused, not run) is
skipped with a line saying why, for the checkpoint before it. A record whose resume key differs from
the job's stops the resume before any work (:func:`~recmem.train.resume.check_resume`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from recmem.lock import exclusive
from recmem.train.resume import check_resume

_NAME = re.compile(r"^step-(\d{9})\.pt$")
_TMP = re.compile(r"^\.step-\d{9}\.(pt|json)\.tmp-\d+$")


class CheckpointStore(Protocol):
    """Where the training loop keeps its checkpoints.

    Every rank enters :meth:`session` and calls :meth:`load` once at the start and :meth:`save` at
    the same steps: a distributed store (Ray's, in ``recmem/train/distributed``) saves each rank's
    shard together.
    """

    loaded_from: str | None
    """Which checkpoint :meth:`load` returned (None: it started afresh)."""

    def session(self, state_bytes: int) -> AbstractContextManager[None]:
        """Hold the store for one run: check before the first step that ``state_bytes`` of state
        can be written, and keep other writers out until the block ends."""
        ...

    def load(self) -> dict[str, Any] | None:
        """This rank's state from the latest complete checkpoint, or None to start afresh."""
        ...

    def save(self, step: int, state: dict[str, Any], metrics: dict[str, float]) -> None:
        """Persist this rank's ``state`` at ``step`` (``metrics`` describe it)."""
        ...


class LocalCheckpoints:
    """The single-process store: verified atomic files in one directory, one writer at a time.

    Args:
        directory: where the ``step-*.pt`` files and their records go.
        resume: False ignores existing checkpoints (they are still overwritten in turn).
        keep: how many of the newest checkpoints to keep.
        key: the job's resume key (``resume.resume_key``), recorded with each checkpoint and compared
            with the newest one's on resume; None skips the comparison (tests).
        resume_changed: resume even when the keys differ (the differences are printed).
    """

    def __init__(self, directory: str | Path, resume: bool = True, keep: int = 2,
                 key: dict[str, Any] | None = None, resume_changed: bool = False) -> None:
        self.directory = Path(directory)
        self.resume = resume
        self.keep = keep
        self.key = key
        self.resume_changed = resume_changed
        self.loaded_from: str | None = None

    @contextmanager
    def session(self, state_bytes: int) -> Iterator[None]:
        """Lock the directory for this run (a second run on it fails at once, naming this one),
        remove temporary files that a crashed run left, and check that a checkpoint fits.

        Raises:
            LockedError: another process trains into this directory.
            OSError: the directory cannot be created or written, or its disk lacks room for
                ``state_bytes`` (saying how much is free).
        """
        with exclusive(self.directory, "training"):
            for stale in self.directory.iterdir():
                if _TMP.match(stale.name):
                    stale.unlink(missing_ok=True)
            check_writable(self.directory, state_bytes)
            yield

    def load(self) -> dict[str, Any] | None:
        """The newest verified checkpoint when resuming, else None (see :func:`load_latest`)."""
        if not self.resume:
            return None
        found = load_latest(self.directory, self.key, self.resume_changed)
        if found is None:
            return None
        state, path = found
        self.loaded_from = str(path)
        return state

    def save(self, step: int, state: dict[str, Any], metrics: dict[str, float]) -> None:
        """Write ``state`` atomically with its record; ``metrics`` are not stored (MLflow has them)."""
        save_checkpoint(self.directory, step, state, self.keep, self.key)


def check_writable(directory: Path, state_bytes: int) -> None:
    """Write and remove a probe file in ``directory``, and check its disk has room for a checkpoint
    of ``state_bytes`` (plus a margin: the serialized file is a little larger).

    Raises:
        OSError: naming the directory and what is wrong.
    """
    probe = directory / f".write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"recmem")
        probe.unlink()
    except OSError as e:
        raise OSError(f"checkpoint directory {directory} is not writable ({e.strerror or e}); "
                      "set train.checkpoint_dir (or workdir) to a writable folder") from None
    free, needed = shutil.disk_usage(directory).free, int(state_bytes * 1.1) + (1 << 20)
    if free < needed:
        raise OSError(f"checkpoint directory {directory} has {free / 2**20:,.0f} MiB free; a checkpoint "
                      f"of this model needs about {needed / 2**20:,.0f} MiB: free some space or move "
                      "train.checkpoint_dir")


def save_checkpoint(directory: str | Path, step: int, state: dict[str, Any], keep: int = 2,
                    key: dict[str, Any] | None = None) -> Path:
    """Write ``state`` as ``directory/step-<step>.pt`` with its record, atomically; keep the newest
    ``keep`` checkpoints. Nothing of a failed save remains."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:09d}.pt"
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    record_tmp = directory / f".{final.stem}.json.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        record = {"step": step, "file": final.name, "bytes": tmp.stat().st_size, "sha256": file_sha256(tmp),
                  "resume_key": key}
        _write_synced(record_tmp, json.dumps(record, indent=1).encode())
        os.replace(record_tmp, final.with_suffix(".json"))
        os.replace(tmp, final)
        _sync_directory(directory)
    except BaseException:
        tmp.unlink(missing_ok=True)
        record_tmp.unlink(missing_ok=True)
        raise
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
    return final


def list_checkpoints(directory: str | Path) -> list[Path]:
    """The checkpoints' state files in ``directory``, oldest first (temporary files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def load_latest(directory: str | Path, key: dict[str, Any] | None = None,
                resume_changed: bool = False) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that verifies, as ``(state, path)``, or None when there is none.

    Newest first, each checkpoint is skipped with a printed reason when its record is missing or
    unreadable, its size or SHA-256 differs from the record, or the state does not load as tensors
    and plain data. With ``key``, the first verified record's resume key is compared with it.

    Raises:
        ResumeError: that checkpoint was written for another model config or other training data
            (and not ``resume_changed``).
    """
    for path in reversed(list_checkpoints(directory)):
        try:
            record = read_record(path)
        except ValueError as e:
            tqdm.write(f"recmem: skipping checkpoint {path}: {e}; trying the one before")
            continue
        if key is not None:
            for line in check_resume(record.get("resume_key"), key, resume_changed, str(path)):
                tqdm.write(f"recmem: resuming {path} although it differs (train.resume_changed): {line}")
        try:
            verify(record, path.stat().st_size, file_sha256(path))
            return safe_load(path), path
        except ValueError as e:
            tqdm.write(f"recmem: skipping checkpoint {path}: {e}; trying the one before")
    return None


def read_record(path: Path) -> dict[str, Any]:
    """The record beside the state file ``path``.

    Raises:
        ValueError: it is missing or not a record of this file.
    """
    try:
        record = json.loads(path.with_suffix(".json").read_text())
    except FileNotFoundError:
        raise ValueError("it has no record (step-*.json: its save was cut short, or an older recmem wrote it)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"its record does not read ({e})") from None
    if not isinstance(record, dict) or not {"bytes", "sha256"} <= record.keys():
        raise ValueError("its record lacks the size and checksum")
    return record


def verify(record: dict[str, Any], size: int, sha256: str) -> None:
    """Check a state file's ``size`` and ``sha256`` against its ``record`` (``{"bytes", "sha256"}``).

    Raises:
        ValueError: they differ, saying how.
    """
    if size != record["bytes"]:
        raise ValueError(f"{size:,} bytes where its record says {record['bytes']:,} (truncated or replaced)")
    if sha256 != record["sha256"]:
        raise ValueError("its SHA-256 differs from its record: the bytes changed after the save")


def safe_load(f: Any) -> dict[str, Any]:
    """The checkpoint state in the file or file-like ``f``, unpickling only tensors and plain data.

    Raises:
        ValueError: it holds anything else (a pickled object that would run code on load is refused
            unread; the message names what it would have loaded) or is not a checkpoint.
    """
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # an UnpicklingError names the global it refused
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"it does not load as tensors and plain data, refused unread ({first})") from None
    if not isinstance(state, dict):
        raise ValueError(f"it holds a {type(state).__name__}, not a checkpoint")
    return state


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of the file at ``path``."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_directory(directory: Path) -> None:
    """Make the renames in ``directory`` durable (a crash after the save keeps them)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

