"""Where the dense layers run, in which precision ``auto`` resolves to, what a bad ``train.device`` /
``precision`` says, and crashed runs in MLflow."""

from __future__ import annotations

import mlflow
import pytest
import torch

from recmem.config import ConfigError, TrainConfig
from recmem.train import local
from recmem.train.device import dense_device, dense_precision, precision_note
from recmem.train.loop import build_job_model
from tests.conftest import tiny_config

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="train.device=cuda"):
        dense_device(TrainConfig(device="cuda"))


def _cpu_has(monkeypatch, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize("avx512_bf16, amx", [(True, False), (False, True), (True, True)])
def test_auto_takes_bf16_on_a_cpu_with_native_bf16(monkeypatch, recwarn, avx512_bf16, amx):
    _cpu_has(monkeypatch, avx512_bf16, amx)
    assert TrainConfig().precision == "auto"
    assert dense_precision(TrainConfig(), CPU) == "bf16"
    assert dense_precision(TrainConfig(precision="fp32"), CPU) == "fp32"  # an explicit choice stands
    assert dense_precision(TrainConfig(precision="bf16"), CPU) == "bf16"
    assert not [w for w in recwarn if "bf16" in str(w.message)]


def test_auto_keeps_fp32_on_a_cpu_without_native_bf16(monkeypatch, recwarn):
    _cpu_has(monkeypatch, False, False)
    assert dense_precision(TrainConfig(), CPU) == "fp32"
    assert dense_precision(TrainConfig(precision="fp32"), CPU) == "fp32"
    assert not [w for w in recwarn if "bf16" in str(w.message)]
    with pytest.warns(UserWarning, match="train.precision=bf16"):
        assert dense_precision(TrainConfig(precision="bf16"), CPU) == "bf16"


@pytest.mark.parametrize("supported", [True, False])
def test_auto_on_a_gpu_asks_cuda_not_the_cpu(monkeypatch, supported):
    _cpu_has(monkeypatch, not supported, not supported)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
    assert dense_precision(TrainConfig(device="cuda"), GPU) == ("bf16" if supported else "fp32")


def test_the_note_says_which_precision_was_taken_and_why():
    assert precision_note(TrainConfig(), "bf16") == (
        "recmem: dense layers in bf16 (train.precision=auto: this CPU runs bf16 natively)")
    assert "fp32 (train.precision=auto: this GPU has no native bf16)" in precision_note(
        TrainConfig(device="cuda"), "fp32")
    explicit = precision_note(TrainConfig(precision="fp32"), "fp32")
    assert explicit == "recmem: dense layers in fp32 (train.precision=fp32)"


@pytest.mark.parametrize("native", [True, False])
def test_the_job_model_and_its_mlflow_run_carry_the_resolved_precision(tiny_root, tmp_path, monkeypatch, capsys,
                                                                        native):
    _cpu_has(monkeypatch, native, False)
    cfg = tiny_config(tiny_root, tmp_path, "train.precision=auto", "train.max_steps=2")
    assert build_job_model(cfg).bf16 is native
    local.train_local(cfg)
    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert run.data.params["train.precision"] == "auto"
    assert run.data.params["train.precision_used"] == ("bf16" if native else "fp32")
    assert f"dense layers in {run.data.params['train.precision_used']}" in capsys.readouterr().out


def test_fp32_on_cpu_is_quiet(recwarn):
    assert dense_device(TrainConfig(precision="fp32")) == CPU
    assert dense_precision(TrainConfig(precision="fp32"), CPU) == "fp32"
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
