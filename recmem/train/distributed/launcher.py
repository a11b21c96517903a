"""The Ray driver: connect to (or start) Ray, open the MLflow run, and run the workers to the end.

This process imports neither torch nor torchrec (only the workers do, see ``worker.py``; they are
started by ``group.py``): it may be a small head-node job, and the first import of torchrec costs
seconds and memory it does not need.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs

from recmem.config import Config, ConfigError
from recmem.lock import exclusive
from recmem.tracking.logger import RunLogger, check_tracking, default_tracking_uri, warm_tracking
from recmem.train.distributed.store import latest_checkpoint
from recmem.train.resume import check_resume, resume_key

_RUN_FILE = "recmem_run.json"
"""Beside Ray's checkpoints of a run: the MLflow run it logs into, so a resubmitted job continues it."""


@dataclass
class RayTrainResult:
    """What a finished Ray run reports (rank 0's last checkpoint and the metrics saved with it)."""

    step: int
    metrics: dict[str, float]
    samples_per_second: float
    run: str
    checkpoint: str


def train_ray(cfg: Config, started_at: float | None = None) -> RayTrainResult:
    """Train ``cfg`` on Ray: ``ray.num_workers`` Ray workers (``group.py``), each reading its share of the data.

    Connects to ``ray.address`` / ``RAY_ADDRESS`` or starts an embedded local Ray (shut down again
    afterwards; a Ray the caller already started is left running). A failed worker group restarts
    from the latest checkpoint up to ``ray.max_failures`` times, unless a worker failed with a
    ``ValueError`` (bad config or data, a refused resume, a diverged loss: it would fail the same way
    again); running the same job again (same ``ray.run_name`` and storage, ``train.resume``)
    continues from it and into the same MLflow run.

    Before Ray starts, the driver checks what it can (pre-flight): the splits exist and are large
    enough, the run's storage folder is writable (and, on a local disk, takes its lock: a second
    driver on the same run fails at once, naming this one), and a checkpoint to resume was written
    for this model config and training data.
    ``started_at`` (Unix time the command started) turns on the ``startup/*`` metrics: seconds to
    Ray ready, the MLflow run open, the workers started, their model built, the first step.

    Raises:
        ConfigError: a config the workers cannot split (e.g. a batch that does not divide),
            ``train.device: cuda`` on a cluster without a GPU per worker, or a checkpoint to
            resume that does not match (``resume.ResumeError``).
        DataError: a split too small to train or validate.
        LockedError: another driver trains the same run.
        TrackingUnavailable: the MLflow tracking server does not answer (found before Ray starts).
        OSError: the storage is not writable.
        ValueError: what a worker raised for bad data or a diverged loss.
        WorkerFailed: the workers failed more than ``ray.max_failures`` times.
    """
    import ray

    from recmem.train.distributed.data import plan_splits
    from recmem.train.distributed.group import run_workers
    from recmem.train.distributed.worker import train_worker

    cfg = resolve_paths(cfg)
    data = plan_splits(cfg, cfg.ray.num_workers)  # a missing or empty split fails here, before Ray starts
    check_tracking(cfg)  # so does a tracking server that does not answer
    storage, name = _storage(cfg)
    key = resume_key(cfg, data["train"])
    with _claim_run(storage, name):
        if cfg.train.resume:
            _check_resume(storage, name, key, cfg.train.resume_changed)
        tracking = warm_tracking(cfg)
        started = _init_ray(cfg)
        marks = {"ray_ready": time.time()}
        tracking.join()
        try:
            _check_fits(cfg, started)
            log = RunLogger(cfg, run_id=_previous_run(storage, name) if cfg.train.resume else None)
            _remember_run(storage, name, log.run_id)
            marks["mlflow_ready"] = time.time()
            try:
                payload = {"config": cfg, "run_id": log.run_id, "data": data, "key": key,
                           "run": _run_folder(storage, name), "started_at": started_at, "marks": marks}
                # The workers' rank 0 logs into the run; a bar drawn on a worker would reach this
                # console through Ray's log forwarding as one line per redraw, so this process draws it.
                with log.following(cfg.train.progress):
                    result = run_workers(cfg, train_worker, payload, cfg.ray.max_failures)
            except BaseException:
                log.close("FAILED")
                raise
        finally:
            if started:
                ray.shutdown()
    log.close()
    metrics = {k: float(v) for k, v in result["metrics"].items() if isinstance(v, (int, float))}
    return RayTrainResult(
        step=int(metrics.get("step", 0)), metrics=metrics,
        samples_per_second=metrics.get("train/samples_per_second", 0.0),
        run=log.run_url(), checkpoint=result["checkpoint"],
    )


def evaluate_ray(cfg: Config, split: str = "valid") -> dict[str, float]:
    """Metrics of the newest complete checkpoint of the Ray run ``ray.run_name`` on ``split``, on Ray
    (one with a shard that does not load is skipped for the one before, as on resume).

    Sharded tables load only on as many workers as wrote them, under the same plan: this starts the
    checkpoint's number of workers (warning when ``ray.num_workers`` differs) with ``ray.sharding``
    as configured; they write nothing. Each worker loads its shard and scores its share of the split;
    the metrics cover all of it. Ray is reached or started as by :func:`train_ray`.

    Returns:
        ``evaluate``'s metrics (``<split>/auc``, ``<split>/logloss``, ...) and ``step``, the
        checkpoint's training step.

    Raises:
        FileNotFoundError: the run has no complete checkpoint under the storage path.
        ValueError: the checkpoint's sharding plan is not this config's (another ``ray.sharding``).
        WorkerFailed: no complete checkpoint of the run loads on every worker.
    """
    import ray

    from recmem.train.distributed.data import plan_splits
    from recmem.train.distributed.group import run_workers
    from recmem.train.distributed.worker import evaluate_worker

    cfg = resolve_paths(cfg)
    storage, name = _storage_path(cfg), cfg.ray.run_name
    found = latest_checkpoint(storage, name)
    if found is None:
        raise FileNotFoundError(_no_checkpoint_message(storage, name))
    fs, folder, meta = found
    workers = meta["world_size"]
    if workers != cfg.ray.num_workers:
        warnings.warn(f"{folder} was written by {workers} workers: evaluating on {workers}, "
                      f"not ray.num_workers={cfg.ray.num_workers}", stacklevel=2)
    cfg = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, num_workers=workers))
    data = plan_splits(cfg, workers, (split,))
    started = _init_ray(cfg)
    try:
        _check_fits(cfg, started)
        payload = {"config": cfg, "run": (fs, posixpath.dirname(folder.rstrip("/"))), "split": split, "data": data}
        # No retries: what fails here (a plan that does not match, no loadable shard) fails again.
        metrics = run_workers(cfg, evaluate_worker, payload, retries=0)
    finally:
        if started:
            ray.shutdown()
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def resolve_paths(cfg: Config) -> Config:
    """``cfg`` with absolute local paths and an explicit tracking URI: workers may run anywhere."""
    workdir = Path(cfg.workdir).resolve()
    root = cfg.data.root if "://" in cfg.data.root else str(Path(cfg.data.root).resolve())
    tracking = cfg.tracking.tracking_uri or default_tracking_uri(workdir)
    return dataclasses.replace(
        cfg, workdir=str(workdir),
        data=dataclasses.replace(cfg.data, root=root),
        tracking=dataclasses.replace(cfg.tracking, tracking_uri=tracking),
    )


def _init_ray(cfg: Config) -> bool:
    """Connect to or start Ray; True when this call started it.

    Unless ``tracking.verbose``, this driver logs Ray's warnings and errors only. Workers' output
    still reaches this console (``log_to_driver``), so their errors and warnings do; the workers
    quiet their own libraries (see ``worker.py``), and on an embedded instance every process does,
    by Ray's setup hook. An embedded instance starts
    without Ray's dashboard (seconds of start-up and three processes no one looks at during a
    quickstart; start Ray with ``ray start --head`` for it). A variable already in this process's environment wins
    over the ones set here.
    """
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    settings: dict[str, Any] = {}
    if not address:
        runtime: dict[str, Any] = {}
        if not cfg.tracking.verbose:
            runtime["worker_process_setup_hook"] = "recmem.tracking.logger.quiet_libraries"
        settings["runtime_env"] = runtime
    if not cfg.tracking.verbose:
        settings["logging_level"] = logging.WARNING
    if address:
        ray.init(address=address, **settings)
    else:
        # "local": always a new instance, never a cluster another `ray start` left on this machine.
        ray.init(address="local", num_cpus=cfg.ray.num_cpus or None, include_dashboard=False, **settings)
    return True


def _check_fits(cfg: Config, embedded: bool) -> None:
    """Refuse a worker group the Ray cluster cannot place, before it waits for ever: ``train.device:
    cuda`` without a GPU per worker, and on an embedded Ray (this machine only, nothing to add nodes)
    more CPUs than it has. A cluster may autoscale: there a short group only waits, with a line saying so.

    Raises:
        ConfigError: naming the keys to change.
    """
    import ray

    r, resources = cfg.ray, ray.cluster_resources()
    if cfg.train.device == "cuda" and resources.get("GPU", 0) < r.num_workers:
        raise ConfigError(f"train.device=cuda needs a GPU per worker (ray.num_workers={r.num_workers}), "
                          f"but the Ray cluster has {resources.get('GPU', 0):g}; use train.device=cpu or a cluster with GPUs")
    cpus = resources.get("CPU", 0)
    if embedded and r.num_workers * r.cpus_per_worker > cpus:
        raise ConfigError(f"ray.num_workers={r.num_workers} x ray.cpus_per_worker={r.cpus_per_worker:g} needs "
                          f"{r.num_workers * r.cpus_per_worker:g} CPUs, but the local Ray has {cpus:g}: lower "
                          "ray.cpus_per_worker (fractions pack workers) or raise ray.num_cpus")


def _storage(cfg: Config) -> tuple[str, str]:
    """(storage path or URI, run name): a fresh name unless resuming."""
    storage = _storage_path(cfg)
    if cfg.ray.num_workers < 1 or cfg.ray.cpus_per_worker <= 0:
        raise ConfigError("ray.num_workers and ray.cpus_per_worker must be positive")
    name = cfg.ray.run_name if cfg.train.resume else f"{cfg.ray.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return storage, name


def _storage_path(cfg: Config) -> str:
    """Where the Ray runs' checkpoints go: ``ray.storage_path`` or a folder in the workdir."""
    return cfg.ray.storage_path or str(Path(cfg.workdir) / cfg.train.checkpoint_dir / "ray")


def _run_folder(storage: str, name: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """(filesystem, folder) of the Ray run ``name`` under ``storage``, where its checkpoints go."""
    fs, base = pyarrow.fs.FileSystem.from_uri(storage)
    return fs, f"{base.rstrip('/')}/{name}"


def _no_checkpoint_message(storage: str, name: str) -> str:
    from recmem.train.distributed.store import checkpointed_runs

    runs = checkpointed_runs(storage)
    others = f"; runs with checkpoints there: {', '.join(runs)} (choose with ray.run_name=...)" if runs else ""
    return (f"no complete checkpoint of the Ray run '{name}' under {storage}: run `recmem train` with this "
            f"config first (a run trained with train.resume=false is named '{name}-<time>'){others}")


@contextmanager
def _claim_run(storage: str, name: str) -> Iterator[None]:
    """Check that the run's folder under ``storage`` is writable and, on a local disk, hold its lock
    (``recmem.lock``) for the block. A filesystem URI (object stores) cannot be locked this way: one
    driver per run is then the user's to keep.

    Raises:
        OSError: the folder cannot be created or written.
        LockedError: another driver holds the run.
    """
    fs, base = pyarrow.fs.FileSystem.from_uri(storage)
    folder = f"{base.rstrip('/')}/{name}"
    probe = f"{folder}/.write-probe-{os.getpid()}"
    try:
        fs.create_dir(folder, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"recmem")
        fs.delete_file(probe)
    except OSError as e:
        raise OSError(f"ray.storage_path {storage}: cannot write the run folder {folder} ({e}); "
                      "set ray.storage_path (or workdir) to a writable place") from None
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        with exclusive(folder, "training"):
            yield
    else:
        yield


def _check_resume(storage: str, name: str, key: dict[str, Any], allow_changed: bool) -> None:
    """Compare the resume key of the run's newest complete checkpoint (if any) with ``key``.

    Raises:
        ResumeError: they differ and not ``allow_changed`` (see ``resume.check_resume``).
    """
    found = latest_checkpoint(storage, name)
    if found is None:
        return
    _, folder, meta = found
    for line in check_resume(meta.get("resume_key"), key, allow_changed, folder):
        print(f"recmem: resuming {folder} although it differs (train.resume_changed): {line}", flush=True)


def _previous_run(storage: str, name: str) -> str | None:
    """The MLflow run an earlier submission of this Ray run logged into, if any."""
    fs, folder = pyarrow.fs.FileSystem.from_uri(storage)
    path = f"{folder}/{name}/{_RUN_FILE}"
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())["mlflow_run_id"]


def _remember_run(storage: str, name: str, run_id: str | None) -> None:
    if run_id is None:
        return
    fs, folder = pyarrow.fs.FileSystem.from_uri(storage)
    fs.create_dir(f"{folder}/{name}", recursive=True)
    with fs.open_output_stream(f"{folder}/{name}/{_RUN_FILE}") as f:
        f.write(json.dumps({"mlflow_run_id": run_id}).encode())
