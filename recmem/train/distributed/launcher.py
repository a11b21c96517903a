"""The Ray driver: connect to (or start) Ray, open the MLflow run, and run the workers to the end.

This process imports no torch and no torchrec (only the workers do, see ``worker.py``): it may be a
small head-node job, and the first import of torchrec costs seconds and memory it does not need.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs

from recmem.config import Config, ConfigError
from recmem.tracking.logger import RunLogger, default_tracking_uri

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


def train_ray(cfg: Config) -> RayTrainResult:
    """Train ``cfg`` on Ray: ``ray.num_workers`` Ray Train workers fed by Ray Data.

    Connects to ``ray.address`` / ``RAY_ADDRESS`` or starts an embedded local Ray (shut down again
    afterwards; a Ray the caller already started is left running). A failed worker group restarts
    from the latest checkpoint up to ``ray.max_failures`` times; running the same job again (same
    ``ray.run_name`` and storage, ``train.resume``) continues from it and into the same MLflow run.

    Raises:
        ConfigError: a config the workers cannot split (e.g. a batch that does not divide).
        ray.train.TrainingFailedError: the workers failed more than ``ray.max_failures`` times.
    """
    import ray

    from recmem.train.distributed.data import build_datasets

    cfg = resolve_paths(cfg)
    started = _init_ray(cfg)
    storage, name = _storage(cfg)
    log = RunLogger(cfg, run_id=_previous_run(storage, name) if cfg.train.resume else None)
    _remember_run(storage, name, log.run_id)
    try:
        trainer = _trainer(cfg, storage, name, log.run_id, build_datasets(cfg, cfg.ray.num_workers))
        result = trainer.fit()
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
    """Connect to or start Ray; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address)
    else:
        # "local": always a new instance, never a cluster another `ray start` left on this machine.
        ray.init(address="local", num_cpus=cfg.ray.num_cpus or None)
    return True


def _storage(cfg: Config) -> tuple[str, str]:
    """(storage path or URI, run name): a fresh name unless resuming."""
    storage = cfg.ray.storage_path or str(Path(cfg.workdir) / cfg.train.checkpoint_dir / "ray")
    if cfg.ray.num_workers < 1 or cfg.ray.cpus_per_worker <= 0:
        raise ConfigError("ray.num_workers and ray.cpus_per_worker must be positive")
    name = cfg.ray.run_name if cfg.train.resume else f"{cfg.ray.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return storage, name


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


def _trainer(cfg: Config, storage: str, name: str, run_id: str | None, datasets: dict):
    """The ``TorchTrainer``: gloo workers with fractional CPUs, ordered data splits, retries."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchConfig, TorchTrainer

    from recmem.train.distributed.worker import train_worker

    r = cfg.ray
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg, "run_id": run_id},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.num_workers, resources_per_worker={"CPU": r.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=r.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
        # Order kept and no locality preference: the deal of blocks to workers depends on the data
        # alone (see data.py), which is what makes resume exact and W workers equal to one.
        dataset_config=ray.train.DataConfig(
            execution_options=ExecutionOptions(preserve_order=True), enable_shard_locality=False),
    )
