"""What each Ray worker runs (``group.run_workers``): build this rank's part of the model, then the one
training loop (:func:`train_worker`) or, for ``recmem evaluate``, load its checkpoint shard and score
(:func:`evaluate_worker`).

Imported by the driver only by name (Ray pickles the function by reference); everything that pulls
in torch or torchrec is imported inside it, on the worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from recmem.config import Config
    from recmem.models import CTRModel


def train_worker(payload: dict[str, Any]) -> dict[str, Any]:
    """Train this rank's part of the model to the end of the job.

    Args:
        payload: ``{"config": Config, "run_id": str | None, "data": {split: SplitIndex}, "key":
            dict, "run": (pyarrow FileSystem, run folder), "started_at": float | None, "marks":
            {name: float}}`` from the driver; the config's paths are already absolute, ``run_id`` is
            the MLflow run the driver opened, ``data`` where the splits' rows lie
            (``data.plan_splits``), ``key`` the job's resume key that checkpoints record
            (``resume.resume_key``), ``run`` the folder of the run's checkpoints, ``started_at`` and
            ``marks`` the start-up's times so far (see ``loop.train``).

    Returns:
        ``{"checkpoint": folder, "metrics": {name: value}}``: the last checkpoint this rank saved
        and the metrics saved with it (rank 0's are the run's result).
    """
    import time

    marks = {**payload["marks"], "worker_start": time.time()}
    cfg = payload["config"]
    _quiet_libraries(cfg)
    import torch

    from recmem.train.distributed.data import shard_source
    from recmem.train.distributed.group import worker_context
    from recmem.train.distributed.store import RayCheckpoints
    from recmem.train.distributed.traffic import TrafficMeter
    from recmem.train.loop import train

    # The driver draws the progress bar from the MLflow run (``RunLogger.following``).
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=False))
    rank, world_size, model, plan = _worker_model(cfg)
    marks["model_built"] = time.time()
    store = RayCheckpoints(rank, world_size, plan, payload["key"], payload["run"], worker_context().group_id)
    with contextlib.ExitStack() as scope:
        meter = scope.enter_context(TrafficMeter(model)) if cfg.ray.measure_traffic else None
        params = {**plan, "ray.torch_threads_used": str(torch.get_num_threads())}
        train(cfg, shard_source(cfg, world_size, rank, payload["data"]), rank=rank, model=model,
              store=store, run_id=payload["run_id"], params=params,
              extra_metrics=meter.stats if meter else None, started_at=payload["started_at"], marks=marks)
    folder, metrics = store.saved or ("", {})
    return {"checkpoint": folder, "metrics": metrics}


def evaluate_worker(payload: dict[str, Any]) -> dict[str, float]:
    """``recmem evaluate`` on a worker: load this rank's shard, score; the metrics of the whole split
    (``evaluate`` gathers them across ranks) and the checkpoint's ``step``, on every rank.

    Args:
        payload: ``{"config": Config, "run": (pyarrow FileSystem, run folder), "split": str,
            "data": {split: SplitIndex}}`` from the driver, which started as many workers as wrote the run's newest checkpoint. The newest
            complete checkpoint that loads on every rank is scored (a corrupt one is skipped, as on
            resume).
    """
    cfg, split = payload["config"], payload["split"]
    _quiet_libraries(cfg)
    from recmem.train.distributed.data import shard_source
    from recmem.train.distributed.store import RayCheckpoints
    from recmem.train.loop import evaluate

    rank, world_size, model, plan = _worker_model(cfg)
    state = RayCheckpoints(rank, world_size, plan).load_newest(*payload["run"])
    model.load_state_dict(state["model"])
    batches = shard_source(cfg, world_size, rank, payload["data"])(split, 0, 0)
    return {**evaluate(model, batches, split), "step": state["step"]}


def _quiet_libraries(cfg: Config) -> None:
    """Turn this worker's library chatter off unless ``tracking.verbose``: the first thing a worker
    does, before fbgemm's import logs a line per library it loads."""
    from recmem.tracking.logger import quiet_libraries

    if not cfg.tracking.verbose:
        quiet_libraries()


def _worker_model(cfg: Config) -> tuple[int, int, CTRModel, dict[str, str]]:
    """(rank, world size, this rank's part of the model, the sharding plan); collective."""
    import pyarrow
    import torch
    from tqdm import tqdm

    from recmem.train.device import dense_device
    from recmem.train.distributed.group import worker_context
    from recmem.train.distributed.plan import build_worker_model, sharding_plan

    context = worker_context()
    rank, world_size = context.rank, context.world_size
    threads, why = torch_threads(cfg.ray.torch_threads, context.local_world_size)
    torch.set_num_threads(threads)
    # Arrow sizes its decoding pool from OMP_NUM_THREADS, which Ray sets to the worker's reserved CPUs
    # (1 by default): the worker's reads would decode on one thread where its steps run on all.
    pyarrow.set_cpu_count(threads)
    if rank == 0:
        # tqdm.write, as the loop's own lines: a print here reaches the driver's console twice.
        tqdm.write(f"recmem: {threads} torch thread{'s' * (threads > 1)} per worker ({why})")
    device = dense_device(cfg.train, torch.device(context.device) if cfg.train.device == "cuda" else None)
    model = build_worker_model(cfg, world_size, device)
    return rank, world_size, model, sharding_plan(model.tables, world_size)


def torch_threads(configured: int, workers_here: int) -> tuple[int, str]:
    """(torch intra-op threads for a worker, why): ``ray.torch_threads`` when set, else this node's
    cores shared evenly among the workers on it (a worker alone on its node uses all of them).

    A worker reads its own data in its own thread (``data.py``), so no core is held back for readers.
    """
    if configured:
        return configured, f"ray.torch_threads={configured}"
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // workers_here)
    return threads, f"{cores} cores on this node, {workers_here} worker{'s' * (workers_here > 1)} on it"
