"""A tiny end-to-end run: train, validate, checkpoint, resume, and what lands in MLflow."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch

from recmem.train.checkpoint import list_checkpoints, load_latest, save_checkpoint
from recmem.train.local import evaluate_local, train_local
from recmem.train.metrics import auc, logloss
from tests.conftest import tiny_config


def test_tiny_run_learns_and_is_tracked(tiny_root, tmp_path):
    cfg = tiny_config(tiny_root, tmp_path, "train.epochs=2", "train.eval_every=10")
    result = train_local(cfg)
    m = result.metrics
    assert m["valid/auc"] > 0.70, m
    assert m["valid/oracle_auc"] - m["valid/auc"] < 0.08
    assert 0.7 < m["valid/calibration"] < 1.3
    assert result.samples_per_second > 0
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    run = mlflow.get_run(result.run.split()[1])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2"
    assert run.data.metrics["valid/auc"] == pytest.approx(m["valid/auc"])
    assert "tables/memory_bytes" in run.data.metrics
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "valid/auc")
    assert len(history) >= 3
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"config.yaml", "training_curve.png"} <= artifacts
    scored = evaluate_local(cfg)
    assert scored["valid/auc"] == pytest.approx(m["valid/auc"], abs=1e-6)
    assert scored["step"] == result.step


def test_resume_continues_same_position_and_run(tiny_root, tmp_path):
    straight = train_local(tiny_config(tiny_root, tmp_path / "a", "train.epochs=3", "train.max_steps=30", "tracking.enabled=false"))
    first = train_local(tiny_config(tiny_root, tmp_path / "b", "train.epochs=3", "train.max_steps=12", "train.checkpoint_every=6"))
    resumed = train_local(tiny_config(tiny_root, tmp_path / "b", "train.epochs=3", "train.max_steps=30", "train.checkpoint_every=6"))
    assert resumed.step == straight.step == 30
    assert resumed.run == first.run, "a resumed job continues the MLflow run"
    assert resumed.metrics["valid/auc"] == pytest.approx(straight.metrics["valid/auc"], abs=1e-6)
    assert resumed.metrics["valid/logloss"] == pytest.approx(straight.metrics["valid/logloss"], abs=1e-6)


def test_active_mlflow_run_is_kept(tiny_root, tmp_path):
    cfg = tiny_config(tiny_root, tmp_path, "train.max_steps=3")
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    with mlflow.start_run() as parent:
        result = train_local(cfg)
        assert mlflow.active_run().info.run_id == parent.info.run_id
    child = mlflow.get_run(result.run.split()[1])
    assert child.data.tags.get("mlflow.parentRunId") == parent.info.run_id


def test_checkpoints_are_atomic_and_corruption_falls_back(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": torch.ones(2)})
    save_checkpoint(tmp_path, 2, {"x": torch.full((2,), 2.0)})
    (tmp_path / ".step-000000003.pt.tmp-1").write_bytes(b"half a file")  # a crash mid-write
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000001.pt", "step-000000002.pt"]
    list_checkpoints(tmp_path)[-1].write_bytes(b"garbage")  # the newest is corrupt
    state, path = load_latest(tmp_path)
    assert torch.equal(state["x"], torch.ones(2)) and path.name == "step-000000001.pt"
    for step in range(3, 6):
        save_checkpoint(tmp_path, step, {"x": torch.zeros(1)}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000004.pt", "step-000000005.pt"]
    assert sorted(p.name for p in tmp_path.glob("step-*.json")) == ["step-000000004.json", "step-000000005.json"]


def test_metrics_match_definitions():
    from sklearn.metrics import log_loss, roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.random(500), 2)  # ties
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert logloss(y, s.clip(0.01, 0.99)) == pytest.approx(log_loss(y, s.clip(0.01, 0.99)))
    assert np.isnan(auc(np.ones(3), np.arange(3)))
