"""Kinds that can be split neither by row nor by ID (``qr``, ``multihash``, ``mixed_dim``) on two Ray workers: each
worker holds a replica trained on the global batch (``recmem/tables/replicated.py``), so two workers
train like the single process, and the export of rank 0's replicas answers as the trained model."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from recmem.export.job import export_job
from recmem.serving import load_bundle
from recmem.train.distributed import train_ray
from recmem.train.local import train_local
from tests.conftest import small_schema, tiny_config, write_learnable_root

TABLES = ("model.tables=[{kind: qr, embedding_dim: 8, feature_names: [C1, C2], options: {collisions: 4, threshold: 1}}, "
          "{kind: multihash, embedding_dim: 8, num_embeddings: 31, feature_names: [C3], options: {num_hashes: 2}}, "
          "{kind: mixed_dim, embedding_dim: 4, feature_names: [C4]}]", "model.embedding_dim=8")
COMMON = ("train.epochs=1", "train.log_every=4", "ray.num_workers=2", "ray.cpus_per_worker=0.5", *TABLES)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_learnable_root(tmp_path_factory.mktemp("replicated_ray"), small_schema(), rows=2048, valid=512)


@pytest.mark.slow
def test_two_workers_with_replicated_kinds_train_like_one_and_export(root, ray_cluster, tmp_path):
    reference = train_local(tiny_config(root, tmp_path / "local", *COMMON, "tracking.enabled=false"))
    cfg = tiny_config(root, tmp_path / "ray", *COMMON)
    result = train_ray(cfg)
    print(f"parity: 1 process AUC {reference.metrics['valid/auc']:.6f}, 2 workers {result.metrics['valid/auc']:.6f}")
    assert result.step == reference.step == 8
    assert abs(result.metrics["valid/auc"] - reference.metrics["valid/auc"]) <= 0.002, (result.metrics, reference.metrics)
    assert result.metrics["valid/logloss"] == pytest.approx(reference.metrics["valid/logloss"], abs=1e-3)
    params = mlflow.MlflowClient(cfg.tracking.tracking_uri).get_run(result.run.split()[1]).data.params
    assert [params[f"sharding.{f}"] for f in ("C1", "C2", "C3", "C4")] == ["replicated"] * 4
    assert params["tables.2.width.C4"] == "4"  # mixed_dim's plan, through its replica
    bundle = load_bundle(export_job(cfg, tmp_path / "bundles", "fp32"))
    assert bundle.manifest["export_check"]["max_abs_logit_diff"] <= 1e-5, bundle.manifest["export_check"]
    assert [t["kind"] for t in bundle.manifest["tables"]] == ["qr", "qr", "multihash", "mixed_dim"]
