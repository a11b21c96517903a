"""Where the dense layers run, what a bad ``train.device`` / ``precision`` says, and crashed runs in MLflow."""

from __future__ import annotations

import mlflow
import pytest
import torch

from recmem.config import ConfigError, TrainConfig
from recmem.train import local
from recmem.train.device import dense_device
from recmem.train.loop import build_job_model
from tests.conftest import tiny_config

NATIVE_BF16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="train.device=cuda"):
        dense_device(TrainConfig(device="cuda"))


@pytest.mark.skipif(NATIVE_BF16, reason="this CPU has native bf16")
def test_bf16_on_a_cpu_without_native_bf16_warns():
    with pytest.warns(UserWarning, match="train.precision=bf16"):
        assert dense_device(TrainConfig(precision="bf16")) == torch.device("cpu")


def test_fp32_on_cpu_is_quiet(recwarn):
    assert dense_device(TrainConfig()) == torch.device("cpu")
    assert not [w for w in recwarn if "bf16" in str(w.message)]


def test_model_returns_cpu_logits_and_trains_its_tables(tiny_root, tmp_path):
    cfg = tiny_config(tiny_root, tmp_path)
    model = build_job_model(cfg)
    batch = next(local.local_source(cfg)("train", 0, 0))
    before = {k: v.clone() for k, v in model.tables.state_dict().items() if isinstance(v, torch.Tensor)}
    logits = model(batch)
    assert logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.shape == (len(batch),)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels).backward()
    after = model.tables.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the tables' fused update did not run"


def test_a_crashed_local_run_is_marked_failed_in_mlflow(tiny_root, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_root, tmp_path, "train.log_every=1")
    real = local.local_source(cfg)

    def crashing(split: str, epoch: int, start: int):
        for i, batch in enumerate(real(split, epoch, start)):
            if i == 3:
                raise RuntimeError("disk gone")
            yield batch

    monkeypatch.setattr(local, "local_source", lambda _: crashing)
    with pytest.raises(RuntimeError, match="disk gone"):
        local.train_local(cfg)
    assert mlflow.active_run() is None
    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.metrics["train/loss"] > 0  # it had logged steps before the crash
