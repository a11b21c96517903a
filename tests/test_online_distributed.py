"""Online windows on 2 gloo workers (recmem/online/distributed.py): rank 0 picks each window, each
worker trains its slice of every global batch, and the workers end with the single process's tables,
dense weights and test-then-train AUCs, short and uneven batches included."""

from __future__ import annotations

import os
import signal
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



def _follow(rank: int, root: Path, landing: Path, run: Path, group: str, die: str, serve: bool = False,
            *overrides: str) -> dict[str, Any]:
    """One start of a 2-worker online run; rank 1 SIGKILLs itself at ``die``: ``window-<k>`` after
    training its k-th window of this start, before the commit; ``commit-<k>`` after writing its shard
    of the k-th commit, before meta.json; ``""`` never. With ``serve``, rank 0 pushes deltas to a
    model server in its process that restarts from its first bundle at the second delta, and returns
    the server's logits on the probe rows. Returns the result and the committed model."""
    import pyarrow.fs

    import recmem.online.distributed as shared
    from recmem.export.distributed import rank_pieces
    from recmem.online.workers import follow_shared
    from recmem.train.distributed.plan import build_worker_model, sharding_plan
    from recmem.train.distributed.store import RayCheckpoints, write_shard

    if rank == 1 and die:
        point, k = die.split("-")
        if point == "window":
            train = shared.score_then_train_share
            windows = iter(range(1, 100))

            def train_then_die(*args, **kwargs):
                out = train(*args, **kwargs)
                if next(windows) == int(k):
                    os.kill(os.getpid(), signal.SIGKILL)
                return out

            shared.score_then_train_share = train_then_die
        else:
            saves = iter(range(1, 100))
            save = RayCheckpoints.save

            def shard_then_die(store, step, state, metrics):
                if next(saves) == int(k):
                    folder = Path(f"{store.run[1]}/checkpoint_{step:09d}-{store.group}")
                    folder.mkdir(parents=True, exist_ok=True)
                    write_shard(folder, store.rank, state)
                    os.kill(os.getpid(), signal.SIGKILL)
                return save(store, step, state, metrics)

            RayCheckpoints.save = shard_then_die
    cfg = tiny_config(root, run.parent, f"online.landing={landing}", *OVERRIDES, *overrides)
    fs = pyarrow.fs.LocalFileSystem()
    service, post = _server(cfg, run.parent) if serve and rank == 0 else (None, None)
    lines: list[str] = []
    result = follow_shared(cfg, (fs, str(run)), group, say=lines.append, post=post)
    model = build_worker_model(cfg, WORLD)  # the committed state, as the next start would load it
    state = RayCheckpoints(rank, WORLD, sharding_plan(model.tables, WORLD), run=(fs, str(run))).load()
    model.load_state_dict(state["model"])
    out = {"result": result, "pieces": rank_pieces(model, rank, WORLD), "offsets": state["online"]["offsets"],
           "lines": lines}
    if service is not None:
        from recmem.export.check import probe_batch

        probe, sparse = probe_batch(cfg), list(cfg.data.schema.sparse)
        kjt = probe.sparse_features
        out["served"] = service.served.bundle.logits(probe.dense_features, [kjt[f].values() for f in sparse],
                                                     [kjt[f].lengths().to(torch.int64) for f in sparse])
        out["version"] = service.served.bundle.version
    return out


def _server(cfg, work: Path):
    """A model server holding the loop's first model, and a ``post`` that reaches it; it restarts from
    that bundle at the second delta (which it then refuses: 409, a full resend follows)."""
    from recmem.serve.service import ModelService, Served
    from recmem.serving import load_bundle
    from tests.test_online import initial_bundle

    start = load_bundle(initial_bundle(cfg, work / "bundles"))
    service, deltas = ModelService("m", Served(start)), []

    def post(url: str, body: bytes) -> tuple[int, dict]:
        if url.endswith("/health"):
            return service.health()
        deltas.append(url)
        if len(deltas) == 2:
            service.swap(Served(start))
        return service.delta(body)

    return service, post


@pytest.mark.slow
def test_sigkill_of_a_worker_mid_commit_trains_every_row_once_and_serves_the_model(stream, tmp_path):
    """The group restarts from the newest complete checkpoint (every shard and meta.json): after a
    worker dies between writing its shard and meta.json, the stream ends trained exactly as one
    uninterrupted process trains it; the restarted workers' deltas and snapshot carry that model.
    (A worker killed at any moment on Ray: the test after this one.)"""
    from torch.multiprocessing import ProcessExitedException

    from recmem.export.distributed import merged_forms

    root, landing = stream
    run = tmp_path / "work" / "online-run"
    with pytest.raises(ProcessExitedException):
        run_ranks(_follow, tmp_path, root, landing, run, "g1", "commit-2", world=WORLD)
    # The second start also pushes deltas (a server restarted mid-run gets a full resend) and registers
    # a snapshot of the gathered tables.
    final = run_ranks(_follow, tmp_path, root, landing, run, "g2", "", True, "online.endpoints=[http://fake]",
                      "online.sync_interval_s=0", "online.dense_every=1", "online.register_as=online-m",
                      "online.snapshot_every=3", "tracking.enabled=true", "online.max_auc_drop=1",
                      "online.calibration_range=[0.001,1e15]", world=WORLD)
    result = final[0]["result"]
    # Accounting (a window per file): the first start committed 1 window (its second commit died after
    # rank 1's shard was written), the second the other 3; each file's rows exactly once.
    assert [h["key"] for h in result.history] == ["part-0001.parquet", "part-0002.parquet", "part-0003.parquet"]
    assert (result.windows, result.rows) == (len(FILES), sum(FILES))
    assert final[0]["offsets"] == final[1]["offsets"] == {f"part-{k:04d}.parquet": n for k, n in enumerate(FILES)}
    cfg = tiny_config(root, tmp_path / "one", f"online.landing={landing}", *OVERRIDES)
    run_online(cfg, say=lambda _: None)
    state, _ = load_latest(tmp_path / "one" / cfg.online.checkpoint_dir)
    model = build_job_model(cfg)
    model.load_state_dict(state["model"])
    for form, ref in zip(merged_forms(cfg, [r["pieces"] for r in final]), model.tables.to_serving()):
        assert torch.equal(form.tensors["keys"], ref.tensors["keys"])
        torch.testing.assert_close(form.tensors["rows"], ref.tensors["rows"], atol=1e-4, rtol=0)
    # Serving: the first push is a full resend, the second is refused by the restarted server (409)
    # and resent in full at the next sync; the server ends on the last version, answering as the model.
    pushes = [(h["delta_full"], h["delta_failures"]) for h in result.history]
    assert pushes == [(1, 0), (0, 1), (1, 1)], (pushes, final[0]["lines"])
    model.eval()
    from recmem.export.check import probe_batch

    with torch.no_grad():
        expected = model(probe_batch(cfg))
    torch.testing.assert_close(final[0]["served"], expected, atol=1e-4, rtol=0)
    assert final[0]["version"] == result.history[-1]["delta_version"]
    # The snapshot after window 3: the gathered tables registered, champion unopposed.
    snapshots = [(h["window"], h["snapshot_version"], h["guardrail_passed"]) for h in result.history
                 if "snapshot_version" in h]
    assert snapshots == [(3, 1, 1)], (snapshots, final[0]["lines"])


@pytest.mark.slow
def test_on_ray_a_killed_worker_restarts_the_group_and_every_row_trains_once(stream, ray_cluster, tmp_path):
    """``recmem online`` with ray.num_workers=2: SIGKILL to a worker once the first window is committed
    (two files have landed, two land after the kill); the group restarts from its newest complete
    checkpoint and trains every row once, each window scored as one process scores it; the STOP file
    ends it."""
    import json
    import shutil
    import threading
    import time

    from recmem.online.workers import STOP
    from tests.conftest import recmem_workers

    root, landing = stream
    files = sorted(landing.glob("part-*.parquet"))
    fresh = tmp_path / "landing"
    fresh.mkdir()
    for f in files[:2]:
        shutil.copy(f, fresh / f.name)
    cfg = tiny_config(root, tmp_path, f"online.landing={fresh}", *OVERRIDES, "online.idle_exit_s=0",
                      "ray.enabled=true", "ray.num_workers=2", "ray.cpus_per_worker=0.5", "ray.max_failures=2")
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=run_online(cfg, say=print)))
    runner.start()
    run = tmp_path / cfg.online.checkpoint_dir / "ray" / cfg.ray.run_name
    killed = False
    while runner.is_alive() and not killed:
        workers = recmem_workers()
        if list(run.glob("checkpoint_*/meta.json")) and workers:
            os.kill(workers[-1], signal.SIGKILL)
            killed = True
        time.sleep(0.05)
    for f in files[2:]:
        shutil.copy(f, fresh / f".{f.name}.tmp")
        (fresh / f".{f.name}.tmp").rename(fresh / f.name)
    # Once the last window is committed (8 steps: 3 + 3 + 1 + 1 batches), STOP (what the driver writes
    # on SIGTERM) ends the run: the loop never exits idle here.
    deadline = time.monotonic() + 300
    while runner.is_alive() and time.monotonic() < deadline and not any(
            json.loads(m.read_text())["step"] == 8 for m in run.glob("checkpoint_*/meta.json")):
        time.sleep(0.1)
    (run / STOP).write_text("stop")
    runner.join(timeout=120)
    assert not runner.is_alive(), "the workers did not stop"
    assert killed, "the worker must die mid-run"
    result = outcome["result"]
    assert (result.windows, result.rows) == (len(FILES), sum(FILES))
    assert result.offsets == {f.name: n for f, n in zip(files, FILES)}
    one = run_online(tiny_config(root, tmp_path / "one", f"online.landing={landing}", *OVERRIDES), say=lambda _: None)
    theirs = {h["key"]: h for h in one.history}
    assert result.history and all(h["auc"] == pytest.approx(theirs[h["key"]]["auc"], abs=0.002, nan_ok=True)
                                   for h in result.history)
