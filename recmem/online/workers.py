"""``recmem online`` on Ray workers (``ray.enabled`` and ``ray.num_workers > 1``): the loop of
``loop.py`` with each window shared out (``distributed.py``) and each commit a sharded checkpoint::

    driver (run_online_ray)                          worker r of W (online_worker -> follow_shared)
      Ray; the run folder and its lock                 its part of the model (sharded tables, DDP dense)
      run_workers(online_worker, ray.max_failures)     resume: its shard of the newest complete checkpoint
      SIGTERM / SIGINT -> <run>/STOP                   per window: rank 0 picks it, every worker scores
                                                         and trains its share, then the commit: every
                                                         rank's shard, then rank 0's meta.json
                                                       rank 0: status line, MLflow, the STOP file

Exactly once: every rank's shard holds the offsets committed with it, and a checkpoint counts only
once all shards and ``meta.json`` are written (``train/distributed/store.py``). A worker that dies
ends the whole group; the new group resumes every rank from the newest complete checkpoint, so a
window cut short is trained again from its start on the state before it, on every shard alike.
SIGTERM reaches only the driver, which writes ``STOP`` into the run folder; rank 0 sees it before its
next window, every worker commits and leaves, and the driver returns.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.fs

from recmem.config import Config
from recmem.online.loop import OnlineResult, Say, StopFlag, _status, log_window, online_key

STOP = "STOP"
"""Written into the run folder by the driver on SIGTERM / SIGINT: the workers finish and exit."""


def follow_shared(cfg: Config, run: tuple[pyarrow.fs.FileSystem, str], group_id: str, say: Say = print,
                  device: str = "cpu", post: Callable[[str, bytes], tuple[int, dict]] | None = None) -> OnlineResult:
    """One worker's part of the online loop; every worker of the process group calls it.

    Args:
        cfg: the job (its paths absolute).
        run: (filesystem, run folder) of the checkpoints, and of the ``STOP`` file.
        group_id: this start of the worker group (the checkpoint folders it writes are named by it).
        say: rank 0's status lines and reports.
        device: where this worker's dense layers run.
        post: how rank 0 reaches ``online.endpoints`` (``sync.http_post`` by default).

    Deltas (``online.endpoints``) and snapshots (``online.register_as``, ``online.snapshot_every``)
    come from rank 0, from what every worker hands it after each commit: its changed rows, and its
    rows in full when a full resend or a snapshot needs them (``distributed.gather_*``).

    Returns:
        The run's result (rank 0's is the one the driver reports).
    """
    import torch
    import torch.distributed as dist

    from recmem.online.distributed import (
        GlobalBatches, gather_changes, gather_forms, next_shared_window, score_then_train_share,
    )
    from recmem.online.source import LandingDirectory
    from recmem.train.distributed.plan import build_worker_model, sharding_plan
    from recmem.train.distributed.store import RayCheckpoints
    from recmem.train.guards import state_bytes
    from recmem.train.loop import TrainingSession, make_dense_optimizer

    o = cfg.online
    rank, world = dist.get_rank(), dist.get_world_size()
    # The loop's own exchanges carry host objects: on gloo, also under NCCL (train.device: cuda).
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    model = build_worker_model(cfg, world, torch.device(device))
    optimizer = make_dense_optimizer(cfg, model.dense_parameters())
    plan = sharding_plan(model.tables, world)
    store = RayCheckpoints(rank, world, plan, online_key(cfg), run=run, group=group_id)
    with store.session(state_bytes(model, optimizer)):
        session = TrainingSession(cfg, model, optimizer, store, rank=rank, track=cfg.tracking.enabled,
                                  params={"online.mode": "test-then-train", **plan})
        done = (session.resumed or {}).get("online", {"offsets": {}, "windows": 0, "rows": 0})
        offsets, windows, rows = dict(done["offsets"]), int(done["windows"]), int(done["rows"])
        if session.resumed is not None and rank == 0:
            say(f"recmem online: resumed from {store.loaded_from}: {windows} windows, {rows:,} rows committed")
        source = LandingDirectory(o.landing, cfg.data.schema, o.window_rows, report=say) if rank == 0 else None
        stop = _StopFile(run) if rank == 0 else None
        hooks = GlobalBatches(model, session.evictable)
        publisher, snapshots = _publishing(cfg, model, session, say, post, group)
        result = OnlineResult(windows, rows, offsets)
        idle_since, started = time.monotonic(), time.monotonic()
        while True:
            ending = rank == 0 and (stop.is_set() or bool(o.max_windows and windows >= o.max_windows)
                                    or bool(o.idle_exit_s and time.monotonic() - idle_since >= o.idle_exit_s))
            state, share = next_shared_window(source, offsets, cfg, stop=ending, group=group)
            if state == "stop":
                break
            if state == "idle":  # every worker meets rank 0 again after the poll interval
                if rank == 0:
                    stop.wait(o.poll_interval_s)
                continue
            _, record = score_then_train_share(session, share, cfg, hooks, group)
            offsets[share.key] = share.end
            windows, rows = windows + 1, rows + share.rows
            session.checkpoint({"online": {"offsets": dict(offsets), "windows": windows, "rows": rows}})
            record.update(window=windows, lag_s=time.time() - record["newest_time"]
                          if record["newest_time"] is not None else math.nan)
            if o.endpoints:
                wants = [publisher.wants_forms() if rank == 0 else None]
                dist.broadcast_object_list(wants, src=0, group=group)
                forms = gather_forms(model, cfg, group) if wants[0] else None
                changes = gather_changes(model, group)
                if rank == 0:
                    record.update(publisher.publish(session, windows, changes, forms))
                    if "delta_version" in record and share.landed is not None:  # its rows are served now
                        record["freshness_s"] = time.time() - share.landed
            if snapshots is not None:
                record.update(snapshots(share, record, windows))
            log_window(session, record)
            result.history.append(record)
            if rank == 0:
                say(_status(record, rows - result.rows, time.monotonic() - started))
            idle_since = time.monotonic()
        result.windows, result.rows, result.offsets = windows, rows, offsets
        result.quarantined = list(source.quarantined) if source is not None else []
        session.finish({"online": {"offsets": dict(offsets), "windows": windows, "rows": rows}}, lambda: {},
                       figure=False)
        result.run = session.log.run_url() if session.log.enabled else ""
    return result


def _publishing(cfg: Config, model: Any, session: Any, say: Say,
                post: Callable[[str, bytes], tuple[int, dict]] | None, group: Any) -> tuple[Any, Any]:
    """(rank 0's delta publisher or None, every rank's :class:`_SharedSnapshots` or None), as
    configured; collective (the publisher's checks at start need the whole tables)."""
    import torch.distributed as dist

    from recmem.online.distributed import gather_forms
    from recmem.online.sync import SharedDeltaPublisher

    o, rank = cfg.online, dist.get_rank()
    publisher = None
    if o.endpoints:
        forms = gather_forms(model, cfg, group)
        publisher = SharedDeltaPublisher(cfg, model, forms, say, post) if rank == 0 else None
    shared = o.register_as and o.snapshot_every
    snapshots = _SharedSnapshots(cfg, model, session, say, publisher, group) if shared else None
    return publisher, snapshots


class _SharedSnapshots:
    """Snapshots of several workers: every ``online.snapshot_every`` windows the workers hand rank 0
    their rows (``gather_forms``), and rank 0's :class:`~recmem.online.snapshot.Snapshotter` registers
    them with the dense layers as one bundle, then judges it; collective."""

    def __init__(self, cfg: Config, model: Any, session: Any, say: Say, publisher: Any, group: Any) -> None:
        import torch.distributed as dist

        from recmem.online.snapshot import Snapshotter

        self.cfg, self.model, self.session, self.group = cfg, model, session, group
        self.snapshotter = Snapshotter(cfg, say, publisher, register=self._register) if dist.get_rank() == 0 else None
        self._forms: list[Any] | None = None
        self._newest: int | None = None

    def __call__(self, share: Any, record: dict[str, Any], windows: int) -> dict[str, Any]:
        """After the commit of window ``windows`` (``share``, its ``record``): the snapshot's figures."""
        from recmem.online.distributed import gather_forms

        due = windows % self.cfg.online.snapshot_every == 0
        self._forms = gather_forms(self.model, self.cfg, self.group) if due else None
        if self.snapshotter is None:
            return {}
        self._newest = record["newest_time"]
        batches = list(share.whole.batches(self.cfg.data.schema, self.cfg.data.batch_size))
        try:
            return self.snapshotter(batches, record, windows)
        finally:
            self._forms = None

    def _register(self) -> str:
        """Write the gathered tables and the dense layers as a bundle and register it; its version."""
        from recmem.export.job import bundle_info, feature_kinds, schema_dict
        from recmem.export.writer import write_bundle
        from recmem.registry import register_run
        from recmem.tracking.logger import default_tracking_uri

        cfg, session = self.cfg, self.session
        info = bundle_info(cfg, {"step": session.step, "run_id": session.log.run_id}, session.store.saved[0],
                           sharding=session.store.plan.get("sharding"))
        info["last_data_time"] = self._newest
        kinds = feature_kinds(cfg.model.tables, list(cfg.data.schema.sparse))
        folder = write_bundle(Path(cfg.workdir) / "exports", self._forms, kinds, self.model.dense, schema_dict(cfg),
                              "fp32", info)
        uri = cfg.tracking.tracking_uri or default_tracking_uri(cfg.workdir)
        return register_run(cfg.online.register_as, uri, bundle=folder, cfg=cfg)[0]


class _StopFile(StopFlag):
    """Rank 0's stop flag: set when the driver has written ``STOP`` into the run folder."""

    def __init__(self, run: tuple[pyarrow.fs.FileSystem, str]) -> None:
        super().__init__()
        self.fs, self.path = run[0], f"{run[1]}/{STOP}"

    def is_set(self) -> bool:
        """True once the file is there."""
        if not bool(self) and self.fs.get_file_info(self.path).type != pyarrow.fs.FileType.NotFound:
            self.set()
        return bool(self)

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds`` in short steps, waking early when the file appears."""
        deadline = time.monotonic() + seconds
        while not self.is_set() and time.monotonic() < deadline:
            super().wait(min(0.2, max(0.0, deadline - time.monotonic())))


def run_online_ray(cfg: Config, say: Say = print) -> OnlineResult:
    """``recmem online`` on ``ray.num_workers`` Ray workers (see the module docstring); rank 0's result.

    The run's checkpoints go to ``ray.storage_path`` (default ``<workdir>/<online.checkpoint_dir>/ray``)
    under ``ray.run_name``, which a later run resumes (``train.resume: false`` starts a new one, named
    with the time). Ray is reached or started as ``recmem train`` does; a group of workers that fails
    (a worker killed, its node lost) starts again from the newest complete checkpoint, up to
    ``ray.max_failures`` times. SIGTERM / SIGINT write ``STOP`` into the run folder: the workers
    finish the window in progress, commit and leave.

    Raises:
        ConfigError: deltas asked of tables that cannot send them from several workers, or
            ``train.device: cuda`` without a GPU per worker.
        ResumeError: the run's newest checkpoint was written for another model config or stream.
        LockedError: another driver follows the same run.
    """
    import dataclasses
    import signal
    import threading

    import ray

    from recmem.online.sync import check_shared_tables
    from recmem.train.distributed.group import run_workers
    from recmem.train.distributed.launcher import _check_fits, _check_resume, _claim_run, _init_ray, resolve_paths

    cfg = resolve_paths(cfg)
    landing = cfg.online.landing if "://" in cfg.online.landing else str(Path(cfg.online.landing).resolve())
    cfg = dataclasses.replace(cfg, online=dataclasses.replace(cfg.online, landing=landing))
    if cfg.online.endpoints:
        check_shared_tables(cfg)
    storage = cfg.ray.storage_path or str(Path(cfg.workdir) / cfg.online.checkpoint_dir / "ray")
    name = cfg.ray.run_name if cfg.train.resume else f"{cfg.ray.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    fs, base = pyarrow.fs.FileSystem.from_uri(storage)
    run = (fs, f"{base.rstrip('/')}/{name}")
    with _claim_run(storage, name):
        if cfg.train.resume:
            _check_resume(storage, name, online_key(cfg), cfg.train.resume_changed)
        if fs.get_file_info(f"{run[1]}/{STOP}").type != pyarrow.fs.FileType.NotFound:
            fs.delete_file(f"{run[1]}/{STOP}")  # a stop of an earlier run

        def stop(*_: Any) -> None:
            say("recmem online: stopping after the window in progress")
            with fs.open_output_stream(f"{run[1]}/{STOP}") as f:
                f.write(b"stop")

        started = _init_ray(cfg)
        main = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
        try:
            _check_fits(cfg, started)
            return run_workers(cfg, online_worker, {"config": cfg, "run": run}, cfg.ray.max_failures)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if started:
                ray.shutdown()


def online_worker(payload: dict[str, Any]) -> OnlineResult:
    """What each Ray worker runs (``group.run_workers``): ``{"config": Config, "run": (fs, folder)}``."""
    import torch

    from recmem.train.distributed.group import worker_context
    from recmem.train.distributed.worker import _quiet_libraries, torch_threads

    cfg = payload["config"]
    _quiet_libraries(cfg)
    context = worker_context()
    torch.set_num_threads(torch_threads(cfg.ray.torch_threads, context.local_world_size)[0])
    return follow_shared(cfg, payload["run"], context.group_id, device=context.device)
