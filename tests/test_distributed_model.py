"""A whole worker model on 2 gloo processes (sharded tables, DDP dense) trains like the single-process
model on the global batch: same logits after a few steps, for each way of sharding the tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from recmem.data.dataset import iter_batches
from recmem.models import build_model
from recmem.train.distributed.plan import build_worker_model, sharding_plan
from recmem.train.loop import make_dense_optimizer
from tests.conftest import small_schema, tiny_config, write_learnable_root
from tests.ranks import run_ranks

WORLD, LOCAL_BATCH, STEPS = 2, 128, 3


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch) -> None:
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _rank(rank: int, root: Path, out: Path, sharding: str) -> dict[str, Any]:
    # fp32 pinned: the reference below is built in fp32, and bf16 rounds the two batch splits apart.
    cfg = tiny_config(root, out, f"ray.sharding={sharding}", "train.precision=fp32")
    model = build_worker_model(cfg, WORLD)
    optimizer = make_dense_optimizer(cfg, list(model.dense.parameters()))
    local = list(iter_batches(root, "train", cfg.data.schema, LOCAL_BATCH, drop_last=True))
    for s in range(STEPS):
        _step(model, optimizer, local[WORLD * s + rank])  # global batch s = local batches 2s, 2s + 1
    model.eval()
    with torch.no_grad():
        logits = model(local[WORLD * STEPS + rank])
    return {"logits": logits, "plan": sharding_plan(model.tables, WORLD)}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_learnable_root(tmp_path_factory.mktemp("model"), small_schema(), rows=2048, valid=256)


@pytest.mark.parametrize("sharding", ["id", "auto"])
def test_two_workers_take_the_steps_of_one(root, tmp_path, sharding):
    results = run_ranks(_rank, tmp_path, root, tmp_path, sharding, world=WORLD)
    cfg = tiny_config(root, tmp_path)
    model = build_model(cfg.model, cfg.data.schema, root, cfg.seed)
    optimizer = make_dense_optimizer(cfg, list(model.dense.parameters()))
    batches = list(iter_batches(root, "train", cfg.data.schema, WORLD * LOCAL_BATCH, drop_last=True))
    for s in range(STEPS):
        _step(model, optimizer, batches[s])
    model.eval()
    with torch.no_grad():
        reference = model(batches[STEPS])
    torch.testing.assert_close(torch.cat([r["logits"] for r in results]), reference, atol=1e-4, rtol=0)
    layouts = {v for k, v in results[0]["plan"].items() if k.startswith("sharding.")}
    assert layouts == {"id"} if sharding == "id" else layouts <= {"table_wise", "row_wise"}
