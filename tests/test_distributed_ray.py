"""Ray training end to end on a local Ray: 2 sharded workers train like 1; a killed worker resumes; a
corrupt shard resumes from the checkpoint before; ``evaluate_ray`` scores the 2 workers' last
checkpoint as the run's own last validation did.

The reference is the single-process loop on the same data and config: Ray's data split gives W
workers exactly the global batches one worker trains on (see ``recmem/train/distributed/data.py``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import ray

from recmem.config import ConfigError
from recmem.train.distributed import evaluate_ray, train_ray
from recmem.train.distributed.store import shard_name
from recmem.train.local import train_local
from tests.conftest import recmem_workers, small_schema, tiny_config, write_learnable_root

# 4096 training rows in global batches of 256: 16 steps.
COMMON = ("train.epochs=1", "train.log_every=4", "ray.num_workers=2", "ray.cpus_per_worker=0.5")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_learnable_root(tmp_path_factory.mktemp("ray_data"), small_schema(), rows=4096, valid=1024)


@pytest.fixture(scope="module")
def reference(root, tmp_path_factory):
    """One process, no Ray: what 2 workers must reproduce."""
    return train_local(tiny_config(root, tmp_path_factory.mktemp("local"), *COMMON, "tracking.enabled=false"))


@pytest.fixture(scope="module")
def two_workers(root, ray_cluster, tmp_path_factory):
    """(config, result) of a 2-worker run; TorchRec's planner shards the tables (ray.sharding=auto)."""
    cfg = tiny_config(root, tmp_path_factory.mktemp("two_workers"), *COMMON)
    return cfg, train_ray(cfg)


@pytest.mark.slow
def test_two_sharded_workers_train_like_one(two_workers, reference):
    cfg, result = two_workers
    print(f"parity: 1 process AUC {reference.metrics['valid/auc']:.6f}, 2 workers {result.metrics['valid/auc']:.6f}")
    assert result.step == reference.step == 16
    assert abs(result.metrics["valid/auc"] - reference.metrics["valid/auc"]) <= 0.002, (result.metrics, reference.metrics)
    assert result.metrics["valid/logloss"] == pytest.approx(reference.metrics["valid/logloss"], abs=1e-3)
    assert result.metrics["valid/rows"] == reference.metrics["valid/rows"]
    run = mlflow.MlflowClient(cfg.tracking.tracking_uri).get_run(result.run.split()[1])
    assert run.info.status == "FINISHED"
    assert {run.data.params[f"sharding.{f}"] for f in cfg.data.schema.sparse} <= {"table_wise", "row_wise"}
    assert run.data.params["sharding"].startswith("2 workers")


@pytest.mark.slow
def test_evaluate_scores_the_last_checkpoint_on_the_workers_that_wrote_it(two_workers):
    """The run's last validation came right before its last checkpoint: evaluating it gives the same."""
    cfg, result = two_workers
    one = tiny_config(cfg.data.root, cfg.workdir, *COMMON, "ray.num_workers=1")
    with pytest.warns(UserWarning, match="written by 2 workers: evaluating on 2, not ray.num_workers=1"):
        metrics = evaluate_ray(one)
    print(f"evaluate: AUC {metrics['valid/auc']:.9f}, training run's last {result.metrics['valid/auc']:.9f}")
    assert metrics["step"] == result.step == 16
    for name in ("valid/auc", "valid/logloss", "valid/calibration"):
        assert metrics[name] == pytest.approx(result.metrics[name], abs=1e-6), name
    assert metrics["valid/rows"] == result.metrics["valid/rows"]


def _latest_checkpoint_step(run_dir: Path) -> int | None:
    steps = [json.loads(m.read_text())["step"] for m in run_dir.glob("checkpoint_*/meta.json")]
    return max(steps, default=None)


@pytest.mark.slow
def test_killed_worker_resumes_from_its_checkpoint(root, reference, ray_cluster, tmp_path):
    """ID-sharded tables (ray.sharding=id); SIGKILL to a worker once the first checkpoint exists."""
    cfg = tiny_config(root, tmp_path, *COMMON, "ray.sharding=id", "train.checkpoint_every=4", "ray.max_failures=2")
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=train_ray(cfg)))
    runner.start()
    run_dir = tmp_path / "runs" / "checkpoints" / "ray" / "recmem"
    killed_at = None
    while runner.is_alive() and killed_at is None:
        step = _latest_checkpoint_step(run_dir)
        workers = recmem_workers()
        if step is not None and workers:
            os.kill(workers[-1], signal.SIGKILL)
            killed_at = step
        time.sleep(0.1)
    runner.join(timeout=600)
    assert killed_at is not None and killed_at < 16, "the worker must die mid-run"
    result = outcome["result"]
    print(f"failure: killed after checkpoint step {killed_at}; AUC {result.metrics['valid/auc']:.6f} "
          f"vs uninterrupted {reference.metrics['valid/auc']:.6f}")
    assert result.step == 16
    assert abs(result.metrics["valid/auc"] - reference.metrics["valid/auc"]) <= 0.002, (result.metrics, reference.metrics)
    assert result.metrics["tables/0/alltoall_bytes_per_step"] > 0
    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", "one continuous MLflow run"
    logged = {m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")}
    assert logged == set(range(4, 17, 4)), "no gap in the training history"


@pytest.mark.slow
def test_corrupt_shard_resumes_from_the_checkpoint_before(root, reference, ray_cluster, tmp_path):
    """A run stopped at step 10 (checkpoints of steps 8 and 10 kept); rank 1's shard of step 10 turned to
    garbage; `recmem evaluate` scores step 8, and the same job submitted again resumes from step 8 (no
    retry needed) and ends as if uninterrupted."""
    args = (*COMMON, "ray.sharding=id", "train.checkpoint_every=4", "train.log_every=2", "ray.max_failures=0")
    train_ray(tiny_config(root, tmp_path, *args, "train.max_steps=10"))
    run_dir = tmp_path / "runs" / "checkpoints" / "ray" / "recmem"
    kept = {json.loads(m.read_text())["step"]: m.parent for m in run_dir.glob("checkpoint_*/meta.json")}
    assert sorted(kept) == [8, 10]
    (kept[10] / shard_name(1)).write_bytes(b"not a checkpoint")
    cfg = tiny_config(root, tmp_path, *args, "train.max_steps=0")
    assert evaluate_ray(cfg)["step"] == 8, "recmem evaluate skips the corrupt checkpoint too"
    result = train_ray(cfg)
    print(f"corrupt shard: resumed; AUC {result.metrics['valid/auc']:.6f} "
          f"vs uninterrupted {reference.metrics['valid/auc']:.6f}")
    assert result.step == 16
    assert abs(result.metrics["valid/auc"] - reference.metrics["valid/auc"]) <= 0.002, (result.metrics, reference.metrics)
    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", "one continuous MLflow run"
    logged = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss"))
    assert logged == [2, 4, 6, 8, 10, 10, 12, 14, 16], "steps 9-10 trained again from step 8's checkpoint"


def test_driver_imports_no_torchrec():
    code = ("import sys, recmem.cli, recmem.train.distributed, recmem.train.distributed.worker, ray.train.torch; "
            "sys.exit(any(m.startswith('torchrec') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ, "RAY_ADDRESS": ""}).returncode == 0


def test_cuda_workers_on_a_cluster_without_gpus_are_refused(root, ray_cluster, tmp_path):
    """Ray would otherwise wait forever for GPUs the cluster does not have."""
    if ray.cluster_resources().get("GPU", 0) >= 2:
        pytest.skip("this Ray cluster has GPUs")
    cfg = tiny_config(root, tmp_path, *COMMON, "train.device=cuda")
    with pytest.raises(ConfigError, match=r"train.device=cuda needs a GPU per worker \(ray.num_workers=2\)"):
        train_ray(cfg)
    assert ray.is_initialized(), "a Ray the caller started is left running"
