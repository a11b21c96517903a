"""The traffic meter on 2 gloo processes: the dense all-reduce payload is the dense parameters' bytes,
the table exchanges of DMP and of ID-sharded tables are counted per step (the ID-sharded count equals
the tables' own), evaluation is not counted, and closing restores ``torch.distributed``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from recmem.data.dataset import iter_batches
from recmem.models import build_dense
from recmem.train.distributed.plan import build_worker_model
from recmem.train.distributed.traffic import TrafficMeter
from recmem.train.loop import make_dense_optimizer
from tests.conftest import small_schema, tiny_config, write_learnable_root
from tests.ranks import run_ranks
from tests.test_distributed_model import LOCAL_BATCH, WORLD, _step

SHARDINGS = ("auto", "id")


def _rank(rank: int, root: Path, out: Path) -> dict[str, Any]:
    original = dist.all_to_all_single
    results = {}
    for sharding in SHARDINGS:
        cfg = tiny_config(root, out, f"ray.sharding={sharding}")
        model = build_worker_model(cfg, WORLD)
        optimizer = make_dense_optimizer(cfg, list(model.dense.parameters()))
        batch = list(iter_batches(root, "train", cfg.data.schema, LOCAL_BATCH, drop_last=True))[rank]
        with TrafficMeter(model) as meter:
            _step(model, optimizer, batch)
            first = meter.stats()
            _step(model, optimizer, batch)
            second = meter.stats()
            model.eval()
            with torch.no_grad():
                model(batch)
            model.train()
            evaluated = meter.stats()
        results[sharding] = {"first": first, "second": second, "evaluated": evaluated,
                             "tables": model.tables.stats(), "restored": dist.all_to_all_single is original}
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = write_learnable_root(tmp_path_factory.mktemp("traffic"), small_schema(), rows=1024, valid=128)
    out = tmp_path_factory.mktemp("traffic_ranks")
    return root, out, run_ranks(_rank, out, root, out, world=WORLD)


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_allreduce_payload_is_the_dense_parameters(ranks, sharding):
    root, out, results = ranks
    cfg = tiny_config(root, out)
    dense_bytes = 4 * sum(p.numel() for p in build_dense(cfg.model, cfg.data.schema).parameters())
    for r in results:
        assert r[sharding]["first"]["traffic/allreduce_payload_bytes_per_step"] == dense_bytes
        assert r[sharding]["second"]["traffic/allreduce_payload_bytes_per_step"] == dense_bytes


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_table_traffic_is_counted_per_step_and_only_in_training(ranks, sharding):
    _, _, results = ranks
    for r in results:
        first, second = r[sharding]["first"], r[sharding]["second"]
        assert first["traffic/all_to_all_sent_bytes_per_step"] > 0
        assert first == second  # the same batch again: the same exchanges
        kinds = ("all_to_all", "reduce_scatter", "all_gather")
        total = sum(first[f"traffic/{k}_sent_bytes_per_step"] for k in kinds)
        assert first["traffic/tables_sent_bytes_per_step"] == total
        assert r[sharding]["evaluated"] == {}
        assert r[sharding]["restored"]


def test_id_sharded_count_equals_the_tables_own(ranks):
    _, _, results = ranks
    for r in results:
        own = sum(v for k, v in r["id"]["tables"].items() if k.endswith("alltoall_bytes_per_step"))
        assert own > 0
        assert r["id"]["first"]["traffic/all_to_all_sent_bytes_per_step"] == own
