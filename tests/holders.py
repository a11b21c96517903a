"""A lock held by another process, as a second writer meets it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def held_by_another_process(folder: Path, purpose: str) -> Iterator[int]:
    """Hold ``folder``'s ``recmem.lock`` in a child process for the block; yields the child's PID,
    which the refusal must name. The child is killed afterwards (the kernel frees its lock)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom recmem.lock import exclusive\n"
         f"with exclusive({str(folder)!r}, {purpose!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
