"""The Ray driver: connect to (or start) Ray, open the MLflow run, and run the workers to the end.

This process imports no torchrec (only the workers do, see ``worker.py``; torch comes in only with
Ray Train's ``TorchTrainer``): it may be a small head-node job, and the first import of torchrec costs
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs

from recmem.config import Config, ConfigError
from recmem.tracking.logger import RunLogger, default_tracking_uri, warm_tracking

_RUN_FILE = "recmem_run.json"
"""Beside Ray's checkpoints of a run: the MLflow run it logs into, so a resubmitted job continues it."""


@dataclass
class RayTrainResult:
    """What a finished Ray run reports (rank 0's last report)."""

    step: int
    metrics: dict[str, float]
    samples_per_second: float
    run: str
    checkpoint: str


def train_ray(cfg: Config, started_at: float | None = None) -> RayTrainResult:
    """Train ``cfg`` on Ray: ``ray.num_workers`` Ray Train workers, each reading its share of the data.

    Connects to ``ray.address`` / ``RAY_ADDRESS`` or starts an embedded local Ray (shut down again
    afterwards; a Ray the caller already started is left running). A failed worker group restarts
    from the latest checkpoint up to ``ray.max_failures`` times; running the same job again (same
    ``ray.run_name`` and storage, ``train.resume``) continues from it and into the same MLflow run.
    ``started_at`` (Unix time the command started) turns on the ``startup/*`` metrics: seconds to
    Ray ready, the MLflow run open, the workers started, their model built, the first step.

    Raises:
        ConfigError: a config the workers cannot split (e.g. a batch that does not divide), or
            ``train.device: cuda`` on a cluster without a GPU per worker.
        ray.train.TrainingFailedError: the workers failed more than ``ray.max_failures`` times.
    """
    import ray

    from recmem.train.distributed.data import plan_splits
    from recmem.train.distributed.worker import train_worker

    cfg = resolve_paths(cfg)
    data = plan_splits(cfg, cfg.ray.num_workers)  # a missing split fails here, before Ray starts
    tracking = warm_tracking(cfg)
    started = _init_ray(cfg)
    marks = {"ray_ready": time.time()}
    tracking.join()
    try:
        _check_gpus(cfg)
        storage, name = _storage(cfg)
        log = RunLogger(cfg, run_id=_previous_run(storage, name) if cfg.train.resume else None)
        _remember_run(storage, name, log.run_id)
        marks["mlflow_ready"] = time.time()
        try:
            payload = {"config": cfg, "run_id": log.run_id, "data": data, "started_at": started_at, "marks": marks}
            # The workers' rank 0 logs into the run; a bar drawn on a worker would reach this console
            # through Ray's log forwarding as one line per redraw, so this process draws it.
            with log.following(cfg.train.progress):
                result = _trainer(cfg, storage, name, train_worker, payload).fit()
        except BaseException:
            log.close("FAILED")
            raise
    finally:
        if started:
            ray.shutdown()
    log.close()
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    return RayTrainResult(
        step=int(metrics.get("step", 0)), metrics=metrics,
        samples_per_second=metrics.get("train/samples_per_second", 0.0),
        run=log.run_url(), checkpoint=result.checkpoint.path if result.checkpoint else "",
    )


def evaluate_ray(cfg: Config, split: str = "valid") -> dict[str, float]:
    """Metrics of the newest complete checkpoint of the Ray run ``ray.run_name`` on ``split``, on Ray
    (one with a shard that does not load is skipped for the one before, as on resume).

    Sharded tables load only on as many workers as wrote them, under the same plan: this starts the
    checkpoint's number of workers (warning when ``ray.num_workers`` differs) with ``ray.sharding``
    as configured, as a Ray run of its own (``<run_name>-evaluate-<time>``, same storage) that leaves
    the training run's state alone. Each worker loads its shard and scores its share of the split;
    the metrics cover all of it. Ray is reached or started as by :func:`train_ray`.

    Returns:
        ``evaluate``'s metrics (``<split>/auc``, ``<split>/logloss``, ...) and ``step``, the
        checkpoint's training step.

    Raises:
        FileNotFoundError: the run has no complete checkpoint under the storage path.
        ValueError: the checkpoint's sharding plan is not this config's (another ``ray.sharding``).
        ray.train.TrainingFailedError: no complete checkpoint of the run loads on every worker.
    """
    import ray

    from recmem.train.distributed.data import plan_splits
    from recmem.train.distributed.store import latest_checkpoint
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
    # No retries: a plan that does not match fails the same way every time.
    cfg = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, num_workers=workers, max_failures=0))
    data = plan_splits(cfg, workers, (split,))
    started = _init_ray(cfg)
    try:
        _check_gpus(cfg)
        payload = {"config": cfg, "run": (fs, posixpath.dirname(folder.rstrip("/"))), "split": split, "data": data}
        trainer = _trainer(cfg, storage, f"{name}-evaluate-{time.strftime('%Y%m%d-%H%M%S')}",
                           evaluate_worker, payload)
        result = _fit_raising_value_errors(trainer)
    finally:
        if started:
            ray.shutdown()
    return {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}


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
    quiet their own libraries (see ``worker.py``), and on an embedded instance every process does
    (Ray Train's controller and helpers too), by Ray's setup hook. An embedded instance starts
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
        if "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ:
            # Nothing preempts this machine's own instance: Ray Train's watcher for it would only
            # cost an actor, and the C++ error line its start logs.
            runtime["env_vars"] = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
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


def _check_gpus(cfg: Config) -> None:
    """Refuse ``train.device: cuda`` on a Ray cluster without GPUs: its workers would wait forever."""
    import ray

    if cfg.train.device != "cuda":
        return
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus < cfg.ray.num_workers:
        raise ConfigError(f"train.device=cuda needs a GPU per worker (ray.num_workers={cfg.ray.num_workers}), "
                          f"but the Ray cluster has {gpus:g}; use train.device=cpu or a cluster with GPUs")


def _storage(cfg: Config) -> tuple[str, str]:
    """(storage path or URI, run name): a fresh name unless resuming."""
    storage = _storage_path(cfg)
    if cfg.ray.num_workers < 1 or cfg.ray.cpus_per_worker <= 0:
        raise ConfigError("ray.num_workers and ray.cpus_per_worker must be positive")
    name = cfg.ray.run_name if cfg.train.resume else f"{cfg.ray.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return storage, name


def _storage_path(cfg: Config) -> str:
    """Where Ray keeps the runs' checkpoints: ``ray.storage_path`` or a folder in the workdir."""
    return cfg.ray.storage_path or str(Path(cfg.workdir) / cfg.train.checkpoint_dir / "ray")


def _no_checkpoint_message(storage: str, name: str) -> str:
    from recmem.train.distributed.store import checkpointed_runs

    runs = checkpointed_runs(storage)
    others = f"; runs with checkpoints there: {', '.join(runs)} (choose with ray.run_name=...)" if runs else ""
    return (f"no complete checkpoint of the Ray run '{name}' under {storage}: run `recmem train` with this "
            f"config first (a run trained with train.resume=false is named '{name}-<time>'){others}")


def _fit_raising_value_errors(trainer: Any) -> Any:
    """``trainer.fit()``; a ValueError that every failed worker raised is raised as itself, not wrapped
    in Ray's error, so that the CLI reports it as the config error it is (e.g. a plan mismatch)."""
    import ray.train

    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        failures = list(getattr(e, "worker_failures", {}).values())
        if failures and all(isinstance(f, ValueError) for f in failures):
            raise failures[0] from e
        raise


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


def _trainer(cfg: Config, storage: str, name: str, loop: Callable, payload: dict[str, Any]):
    """The ``TorchTrainer``: workers with their CPUs (and a GPU each under ``train.device: cuda``,
    NCCL then carrying the dense all-reduce), retries."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    r, gpu = cfg.ray, cfg.train.device == "cuda"
    return TorchTrainer(
        loop,
        train_loop_config=payload,
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.num_workers, use_gpu=gpu, resources_per_worker={"CPU": r.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=r.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # Ray Train's own INFO lines (worker group start, each checkpoint and report) unless verbose.
            logging_config=ray.train.LoggingConfig(log_level="INFO" if cfg.tracking.verbose else "WARNING")),
    )
