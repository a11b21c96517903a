"""Online windows on 2 gloo workers (recmem/online/distributed.py): rank 0 picks each window, each
worker trains its slice of every global batch, and the workers end with the single process's tables,
dense weights and test-then-train AUCs, short and uneven batches included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

from recmem.online.distributed import (
    GlobalBatches, gather_changes, next_shared_window, score_then_train_share, shares,
)
from recmem.online.loop import run_online
from recmem.online.source import LandingDirectory
from recmem.train.checkpoint import LocalCheckpoints, load_latest
from recmem.train.loop import TrainingSession, build_job_model, make_dense_optimizer
from tests.conftest import small_schema, tiny_config, write_learnable_root
from tests.ranks import run_ranks

WORLD = 2
# Batches of 256: 600 -> 256, 256, 88; 515 -> 256, 256, 3 (slices of 1 and 2 rows); 3 -> one batch of
# 3; 1 -> fewer rows than workers (every worker trains it; collisionless admits at once at min_count 1).
FILES = [600, 515, 3, 1]
# A TTL of 8 data-time hours: rows expire along the stream (its event times span about a day).
OVERRIDES = ["model.tables.0.kind=collisionless", "model.tables.0.options.capacity=2000",
             "model.tables.0.options.track_changes=true",
             "model.tables.0.options.ttl=28800", "model.tables.0.options.min_count=1", "tracking.enabled=false",
             "online.idle_exit_s=0.01", "online.poll_interval_s=0.01"]


def test_shares_split_each_global_batch_evenly_and_never_leave_a_worker_empty():
    assert shares(600, 256, 2) == [[(0, 128, 1.0), (256, 384, 1.0), (512, 556, 1.0)],
                                   [(128, 256, 1.0), (384, 512, 1.0), (556, 600, 1.0)]]
    # An uneven slice is weighted by its share of the batch: 1 and 2 of 3 rows.
    assert shares(3, 256, 2) == [[(0, 1, 2 / 3)], [(1, 3, 4 / 3)]]
    # A tail of fewer than W rows joins the batch before it; fewer rows than W go to everyone.
    assert shares(257, 256, 4)[3] == [(192, 257, 4 * 65 / 257)]
    assert shares(1, 256, 2) == [[(0, 1, 1.0)], [(0, 1, 1.0)]]
    for rows in (1, 2, 255, 256, 257, 1000):
        plan = shares(rows, 256, 3)
        assert len({len(p) for p in plan}) == 1 and all(end > begin for p in plan for begin, end, _ in p)
        covered = sorted(r for p in plan for begin, end, _ in p for r in range(begin, end))
        assert covered == list(range(rows)) or rows < 3


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> tuple[Path, Path]:
    """A data root (the model's statistics) and a landing folder holding FILES, landed in order."""
    base = tmp_path_factory.mktemp("online_distributed")
    root = write_learnable_root(base / "root", small_schema(), rows=sum(FILES), valid=256)
    table = pq.read_table(root / "train" / "part-00000.parquet")
    landing, first = base / "landing", 0
    landing.mkdir()
    for k, rows in enumerate(FILES):
        pq.write_table(table.slice(first, rows), landing / f".part-{k}.tmp")
        (landing / f".part-{k}.tmp").rename(landing / f"part-{k:04d}.parquet")
        first += rows
    return root, landing


def _rank(rank: int, root: Path, landing: Path, work: Path) -> dict[str, Any]:
    from recmem.export.distributed import rank_pieces
    from recmem.train.distributed.plan import build_worker_model

    cfg = tiny_config(root, work, f"online.landing={landing}", *OVERRIDES)
    model = build_worker_model(cfg, WORLD)
    optimizer = make_dense_optimizer(cfg, model.dense_parameters())
    store = LocalCheckpoints(work / f"rank{rank}", resume=False)
    session = TrainingSession(cfg, model, optimizer, store, rank=rank, track=False)
    hooks = GlobalBatches(model, session.evictable)
    source = LandingDirectory(str(landing), cfg.data.schema) if rank == 0 else None
    offsets, records, served = {}, [], {}
    while True:
        state, share = next_shared_window(source, offsets, cfg)
        if state != "window":
            break
        _, record = score_then_train_share(session, share, cfg, hooks)
        offsets[share.key] = share.end
        records.append(record)
        changes = gather_changes(model)
        for name, change in (changes or {}).items():  # applied as a server applies deltas: frees first
            rows = served.setdefault(name, {})
            for i in change["freed"].tolist():
                rows.pop(i, None)
            rows.update(zip(change["ids"].tolist(), change["weights"]))
    dense = {k: v.detach().clone() for k, v in model.dense.module.state_dict().items()}
    return {"records": records, "offsets": offsets, "pieces": rank_pieces(model, rank, WORLD), "dense": dense,
            "served": served}


def test_two_workers_train_the_stream_as_one_process(stream, tmp_path):
    from recmem.export.distributed import merged_forms

    root, landing = stream
    results = run_ranks(_rank, tmp_path, root, landing, tmp_path / "workers", world=WORLD)
    cfg = tiny_config(root, tmp_path / "one", f"online.landing={landing}", *OVERRIDES)
    one = run_online(cfg, say=lambda _: None)
    assert results[0]["offsets"] == results[1]["offsets"] == one.offsets
    for r in results:
        assert [x["key"] for x in r["records"]] == [h["key"] for h in one.history]
        for mine, theirs in zip(r["records"], one.history):
            for metric in ("auc", "logloss"):  # the whole window's, on each rank (no AUC for one row: NaN)
                assert mine[metric] == pytest.approx(theirs[metric], abs=1e-4, nan_ok=True), (metric, mine, theirs)
            assert mine["rows_live"] == theirs["rows_live"] and mine["rows"] == theirs["rows"]
    assert one.history[-1]["rows_live"] < max(h["rows_live"] for h in one.history)  # the TTL expired rows
    state, _ = load_latest(tmp_path / "one" / cfg.online.checkpoint_dir)
    model = build_job_model(cfg)
    model.load_state_dict(state["model"])
    reference = model.tables.to_serving()
    served = results[0]["served"]  # every window's gathered changes, applied in turn: the whole table
    assert results[1]["served"] == {}
    for name, form, ref in zip(cfg.data.schema.sparse, merged_forms(cfg, [r["pieces"] for r in results]), reference):
        assert torch.equal(form.tensors["keys"], ref.tensors["keys"]), name
        torch.testing.assert_close(form.tensors["rows"], ref.tensors["rows"], atol=1e-4, rtol=0)
        assert sorted(served[name]) == ref.tensors["keys"].tolist(), name
        rows = torch.stack([served[name][i] for i in ref.tensors["keys"].tolist()])
        torch.testing.assert_close(rows, ref.tensors["rows"], atol=1e-4, rtol=0)
    for key, value in model.dense.state_dict().items():
        for r in results:
            torch.testing.assert_close(r["dense"][key], value, atol=1e-4, rtol=0)
