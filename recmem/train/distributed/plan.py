"""The sharding plan: how one worker's model is split from the config, and the plan as MLflow params.

Tables are model-parallel and dense layers data-parallel. Each ``model.tables`` block is split over
the workers by ``ray.sharding``:

- ``id``: ID-sharded (``recmem/tables/sharded.py``). Each worker keeps the rows of the keys it owns
  and looks the rest up by all-to-all; works for every kind with a ``shard_from_config`` (``full``,
  ``hash``, and kinds that map raw IDs themselves such as ``collisionless``). No table is replicated.
- ``auto``: ``id`` for every block.

The dense part is wrapped in ``DistributedDataParallel`` (gradients averaged by all-reduce). One
worker needs no split and trains the plain model.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from recmem.config import Config
from recmem.models import CTRModel, build_dense, build_model
from recmem.tables.sharded import build_sharded_tables


def sharding_plan(cfg: Config, world_size: int) -> dict[str, str]:
    """``{"sharding.<block>": "<layout> <kind> <features>"}`` (logged as MLflow params)."""
    if world_size == 1:
        return {"sharding": "none (1 worker)"}
    plan = {"sharding": f"{cfg.ray.sharding} over {world_size} workers, dense data-parallel"}
    for i, block in enumerate(cfg.model.tables):
        names = ",".join(block.feature_names) or "(the remaining features)"
        plan[f"sharding.{i}"] = f"id {block.kind} {names}"
    return plan


def build_worker_model(cfg: Config, world_size: int) -> CTRModel:
    """This worker's part of ``cfg``'s model; collective: every worker calls it together.

    Starts from the same values as the single-process :func:`~recmem.models.build_model`: table
    shards replay their table's initial rows, and DDP copies rank 0's dense layers to every rank.
    """
    m, schema = cfg.model, cfg.data.schema
    bf16 = cfg.train.precision == "bf16"
    if world_size == 1:
        return build_model(m, schema, Path(cfg.data.root), cfg.seed, bf16)
    # Table traffic gets its own gloo group: its all-to-alls run on CPU tensors and never interleave
    # with DDP's all-reduce on the default group (NCCL when the dense part is on GPUs).
    tables_group = dist.new_group(backend="gloo")
    torch.manual_seed(cfg.seed)
    tables = build_sharded_tables(m.tables, schema.sparse, Path(cfg.data.root), cfg.seed, tables_group)
    dense = DistributedDataParallel(build_dense(m, schema))
    return CTRModel(tables, dense, bf16)
