"""What issue 9's guards cost, each against the work it guards, measured in one run.

- The per-step agreement on a non-finite loss under ``train.nonfinite: skip`` (``guards.any_rank``;
  the default ``stop`` needs none): one 1-float all-reduce across ranks (gloo, 2 processes on this
  machine), against the 2-worker quickstart step it rides on (``BENCHMARKS.md``: about 45 ms).
- A checkpoint's record and verification (``checkpoint.save_checkpoint`` / ``load_latest``: SHA-256
  and a non-finite scan) against a fsynced ``torch.save`` / ``torch.load`` of the same state alone.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recmem.bench import free_port


def _flag_worker(rank: int, port: int, steps: int, out: dict) -> None:
    from recmem.train.guards import any_rank

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    for _ in range(50):
        any_rank(None)
    start = time.perf_counter()
    for _ in range(steps):
        any_rank(None)
    if rank == 0:
        out["flag_us"] = (time.perf_counter() - start) / steps * 1e6
    dist.destroy_process_group()


def flag_cost(steps: int = 2000) -> float:
    """Microseconds per step of the 2-rank agreement when no rank has a problem (the common case)."""
    out = mp.Manager().dict()
    mp.spawn(_flag_worker, args=(free_port(), steps, out), nprocs=2)
    return out["flag_us"]


def checkpoint_cost(rows: int, dim: int = 16, tables: int = 26) -> dict[str, float]:
    """Seconds to save and load a state of ``tables`` x ``rows`` x ``dim`` fp32 rows (plus row-wise
    optimizer state): ``torch.save`` with fsync / ``torch.load(weights_only=True)`` (a save and a
    load before the records) against recmem's verified save (non-finite scan, SHA-256, record,
    fsyncs) and load (size and SHA-256 checked first)."""
    from recmem.train.checkpoint import load_latest, save_checkpoint
    from recmem.train.guards import nonfinite_tensors

    state = {"model": {f"t{i}": torch.randn(rows, dim) for i in range(tables)},
             "optimizer": {f"m{i}": torch.rand(rows) for i in range(tables)}}
    with tempfile.TemporaryDirectory() as folder:
        plain = Path(folder) / "plain.pt"
        t0 = time.perf_counter()
        with open(plain, "wb") as f:  # what a save was before the record: written and fsynced
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        t1 = time.perf_counter()
        torch.load(plain, weights_only=True)
        t2 = time.perf_counter()
        assert not nonfinite_tensors(state)
        save_checkpoint(Path(folder) / "ckpt", 1, state)
        t3 = time.perf_counter()
        load_latest(Path(folder) / "ckpt")
        t4 = time.perf_counter()
        size = plain.stat().st_size
    return {"bytes": size, "plain_save_s": t1 - t0, "plain_load_s": t2 - t1,
            "verified_save_s": t3 - t2, "verified_load_s": t4 - t3}


def report(rows: int) -> str:
    """The three figures as text lines."""
    lines = [f"CPU capability: {torch.backends.cpu.get_cpu_capability()}"]
    lines.append(f"non-finite agreement, 2 ranks (gloo): {flag_cost():.0f} us per step")
    c = checkpoint_cost(rows)
    lines.append(f"checkpoint of {c['bytes'] / 2**20:,.0f} MiB: save {c['plain_save_s']:.2f} s plain, "
                 f"{c['verified_save_s']:.2f} s verified ({c['verified_save_s'] / c['plain_save_s']:.2f}x, "
                 f"incl. non-finite scan); load {c['plain_load_s']:.2f} s plain, {c['verified_load_s']:.2f} s "
                 f"verified ({c['verified_load_s'] / c['plain_load_s']:.2f}x)")
    return "\n".join(lines)
