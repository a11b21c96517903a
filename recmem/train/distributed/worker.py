"""What each Ray Train worker runs: build this rank's part of the model, then the one training loop.

Imported by the driver only by name (``TorchTrainer`` pickles :func:`train_worker`); everything that
pulls in torch or torchrec is imported inside it, on the worker.
"""

from __future__ import annotations

import contextlib
from typing import Any


def train_worker(payload: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``.

    Args:
        payload: ``{"config": Config, "run_id": str | None}`` from the driver; the config's paths are
            already absolute and ``run_id`` is the MLflow run the driver opened.
    """
    import ray.train
    import torch

    from recmem.train.distributed.data import shard_source
    from recmem.train.distributed.plan import build_worker_model, sharding_plan
    from recmem.train.distributed.store import RayCheckpoints
    from recmem.train.distributed.traffic import TrafficMeter
    from recmem.train.loop import train

    cfg = payload["config"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(cfg.ray.torch_threads or max(1, round(cfg.ray.cpus_per_worker)))
    model = build_worker_model(cfg, world_size)
    plan = sharding_plan(model.tables, world_size)
    with contextlib.ExitStack() as scope:
        meter = scope.enter_context(TrafficMeter(model)) if cfg.ray.measure_traffic else None
        train(cfg, shard_source(cfg, world_size), rank=rank, model=model,
              store=RayCheckpoints(rank, world_size, plan), run_id=payload["run_id"], params=plan,
              extra_metrics=meter.stats if meter else None)
