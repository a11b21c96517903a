"""The sharding plan: how one worker's part of the model is built from the config, and the plan as
MLflow params.

Tables are model-parallel, dense layers data-parallel (``DistributedDataParallel``: gradients
averaged by all-reduce). Each ``model.tables`` block is split over the workers by ``ray.sharding``:

- ``auto``: row-keyed kinds (``full``, ``hash``) go to TorchRec's ``DistributedModelParallel`` with
  its planner choosing table- or row-wise per table (``dmp.py``); every other kind is ID-sharded.
- ``table_wise`` / ``row_wise`` / ``column_wise``: that DMP layout for row-keyed kinds; the others
  ID-sharded.
- ``id``: every block ID-sharded (``recmem/tables/sharded.py``): each worker keeps the rows of the
  keys it owns and looks the rest up by all-to-all; works for every kind that can be split.

Kinds that can be split neither by row nor by ID (``qr``, ``multihash``, ``mixed_dim``: rows shared
between IDs, small by design) are replicated whatever ``ray.sharding`` says, every replica trained on
the global batch (``recmem/tables/replicated.py``). One worker needs no split and trains the plain
model.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from recmem.config import Config, TableConfig, model_embedding_dim
from recmem.models import CTRModel, build_dense, build_model
from recmem.tables import TableCollection, build_tables
from recmem.tables.replicated import ReplicatedTable
from recmem.tables.sharded import RowKeyedKind, ShardableKind, kind_shard, sharded_table
from recmem.train.device import dense_precision
from recmem.train.distributed.dmp import DmpTables


def build_worker_model(cfg: Config, world_size: int, device: torch.device = torch.device("cpu")) -> CTRModel:
    """This worker's part of ``cfg``'s model; collective: every worker calls it together.

    Starts from the same values as the single-process :func:`~recmem.models.build_model`: table parts
    replay their table's initial rows, and DDP copies rank 0's dense layers to every rank.

    Args:
        cfg: the job.
        world_size: the number of workers.
        device: where this worker's dense layers run (its GPU, or the CPU); tables stay on the host.
    """
    m, schema = cfg.model, cfg.data.schema
    bf16 = dense_precision(cfg.train, device) == "bf16"
    if world_size == 1:
        return build_model(m, schema, Path(cfg.data.root), cfg.seed, bf16, device)
    # Table traffic gets its own gloo group: its collectives never interleave with DDP's all-reduce
    # on the default group, and it stays on host tensors when the default group is NCCL.
    group = dist.new_group(backend="gloo")
    rank = dist.get_rank(group)
    width = model_embedding_dim(m)

    def make(kind: type, block: TableConfig, names: list[str], seed: int, root: Path, where: str):
        if cfg.ray.sharding != "id" and isinstance(kind, RowKeyedKind):
            keys = kind.row_keys_from_config(block, names, seed, root, where)
            return DmpTables(names, keys.router, keys.rows, block.embedding_dim, block.learning_rate, seed,
                             group, cfg.ray.sharding)
        if not isinstance(kind, (RowKeyedKind, ShardableKind)):
            return ReplicatedTable(kind.from_config(block, names, seed, root, where, output_dim=width), group)
        return sharded_table(names, block.embedding_dim,
                             kind_shard(kind, block, names, seed, root, where, rank, world_size), group)

    # The dense layers first: build_model's tables draw nothing from torch's global generator, but
    # DMP initialises its shards from it, which would shift the dense layers' initial values.
    torch.manual_seed(cfg.seed)
    dense = build_dense(m, schema).to(device)
    tables = build_tables(m.tables, schema.sparse, Path(cfg.data.root), cfg.seed, make=make, output_dim=width)
    ddp = DistributedDataParallel(dense, device_ids=[device] if device.type == "cuda" else None)
    return CTRModel(tables, ddp, bf16, device)


def sharding_plan(tables: TableCollection, world_size: int) -> dict[str, str]:
    """``{"sharding": summary, "sharding.<feature>": layout}`` of built tables (MLflow params)."""
    if world_size == 1:
        return {"sharding": "none (1 worker)"}
    plan = {}
    for table in tables.tables:
        layout = getattr(table, "layout", None) or {f: "id" for f in table.feature_names}
        plan.update({f"sharding.{f}": kind for f, kind in layout.items()})
    counts = {k: list(plan.values()).count(k) for k in sorted(set(plan.values()))}
    summary = ", ".join(f"{n} {k}" for k, n in counts.items())
    return {"sharding": f"{world_size} workers: {summary} tables; dense data-parallel", **plan}
