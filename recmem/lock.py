"""One writer per folder: an exclusive lock file that names its holder and outlives no process.

A training run holds its checkpoint folder and a prepare holds its output root for as long as they
write there. The lock is ``fcntl.flock`` on ``<folder>/.recmem.lock``: the kernel releases it when
the holder's process dies, however it dies, so a lock left by a killed run is never in the way. The
file also records who holds it (host, PID, command, since when); that is what the second writer's
error shows, and it is kept after release only as a record of the last holder.

``flock`` is per host on local disks. A folder on a network filesystem shared by several hosts is
not protected; each lock also says which host took it, so the message names the machine to check.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".recmem.lock"


class LockedError(RuntimeError):
    """Another process holds the folder's lock: the message names it."""


@contextmanager
def exclusive(folder: str | Path, purpose: str) -> Iterator[Path]:
    """Hold ``folder``'s lock for the block (the folder is created if missing).

    Args:
        folder: the folder one writer may use at a time.
        purpose: what the holder does there (``"training"``, ``"prepare"``), for the other's error.

    Raises:
        LockedError: another live process holds it; says which (host, PID, purpose, since when).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(f"{folder} is in use by {describe_holder(path)}; wait for it to finish "
                              f"or stop it (one {purpose} at a time per folder)") from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "purpose": purpose,
                  "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock


def describe_holder(path: Path) -> str:
    """The holder recorded in the lock file ``path``, as one phrase."""
    try:
        h = json.loads(path.read_text())
        return (f"{h['purpose']} (pid {h['pid']} on host {h['host']}, since {h['since']}: "
                f"{h['command']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its lock file names no holder yet)"
