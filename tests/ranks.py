"""Run a function on a few gloo processes, the way the distributed tests need it, and collect its results."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A port the OS just had free: fixed or pid-derived ports collide between test modules and runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(rank: int, fn: Callable[..., Any], out: Path, port: int, world: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    # One thread per rank: the ranks already share the machine's few cores.
    torch.set_num_threads(1)
    try:
        torch.save(fn(rank, *args), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], out: Path, *args: Any, world: int = 2) -> list[Any]:
    """Run ``fn(rank, *args)`` on ``world`` gloo processes and return what each rank returned.

    Each process joins one gloo group on a free local port, calls ``fn`` and saves its return value to
    ``out/rank{rank}.pt``; the group is destroyed even when ``fn`` raises. An exception in any rank is
    re-raised here by ``torch.multiprocessing.spawn``.

    Args:
        fn: A module-level function (it is pickled by name into the spawned processes).
        out: An existing directory for the per-rank result files.
        *args: Passed to ``fn`` after the rank; must pickle.
        world: Number of processes.

    Returns:
        The ``world`` return values, in rank order.
    """
    mp.spawn(_run_rank, args=(fn, out, free_port(), world, args), nprocs=world)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
