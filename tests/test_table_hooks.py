"""The contract's hooks for kinds that store other widths than the model's: a model-level width,
dense parameters inside a table (trained by the dense optimizer, checkpointed, exported), an
auxiliary loss term logged apart, and memory measured from the live tensors. A tiny test table
uses every hook; every real kind is run through the contract suite (``test_tables_contract.py``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recmem.config import ConfigError, TableConfig
from recmem.models import CTRModel, build_dense
from recmem.serving import load_bundle
from recmem.tables import TableCollection, build_tables
from recmem.tables.base import HasAuxiliaryLoss, HasDenseParameters, ServingForm, tensor_bytes
from recmem.tables.fused import FusedRowwiseAdagrad
from recmem.train.local import local_source
from recmem.train.loop import train
from tests.conftest import small_schema, tiny_config

SCHEMA = small_schema()
ROWS, NARROW, WIDE, AUX_WEIGHT = 16, 4, 8, 0.1


class ProjectedHashTable(torch.nn.Module):
    """``id mod 16`` rows of width 4, projected to width 8; adds 0.1 * ||projection||^2 to the loss."""

    def __init__(self, feature_names: list[str]) -> None:
        super().__init__()
        self.feature_names = list(feature_names)
        self.embedding_dim = WIDE
        self.rows = FusedRowwiseAdagrad([ROWS] * len(feature_names), NARROW, 0.05, seed=3)
        self.projection = torch.nn.Parameter(torch.randn(WIDE, NARROW, generator=torch.Generator().manual_seed(4)))

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        narrow = self.rows(torch.remainder(features.values(), ROWS), features.offsets())  # [B, F, 4]
        return narrow @ self.projection.T  # [B, F, 8]

    def dense_parameters(self) -> list[torch.nn.Parameter]:
        return [self.projection]

    def auxiliary_loss(self) -> torch.Tensor:
        return AUX_WEIGHT * self.projection.pow(2).sum()

    def to_serving(self) -> list[ServingForm]:
        return [ServingForm("modulo", {"rows": self.rows.weights(i).detach().clone(),
                                       "projection": self.projection.detach().clone()})
                for i in range(len(self.feature_names))]

    def memory_bytes(self) -> int:
        return self.rows.memory_bytes() + tensor_bytes(self.projection)

    def stats(self) -> dict[str, float]:
        return {"projection_bytes": float(tensor_bytes(self.projection))}


def _model(cfg) -> CTRModel:
    torch.manual_seed(cfg.seed)
    tables = TableCollection([ProjectedHashTable(SCHEMA.sparse)], SCHEMA.sparse)
    return CTRModel(tables, build_dense(cfg.model, cfg.data.schema))


def _config(root: Path, workdir: Path, *more: str):
    return tiny_config(root, workdir, "ray.enabled=false", "tracking.enabled=false", "model.embedding_dim=8",
                       "model.tables.0.kind=hash", "model.tables.0.num_embeddings=16",
                       "model.tables.0.embedding_dim=4", "train.log_every=2", *more)


def test_the_test_table_uses_every_hook():
    table = ProjectedHashTable(SCHEMA.sparse)
    assert isinstance(table, HasDenseParameters) and isinstance(table, HasAuxiliaryLoss)
    tables = TableCollection([table], SCHEMA.sparse)
    assert tables.embedding_dim == WIDE and tables.dense_parameters() == [table.projection]
    torch.testing.assert_close(tables.auxiliary_loss(), AUX_WEIGHT * table.projection.pow(2).sum())
    # live bytes: fbgemm's rows and Adagrad state, plus the projection
    expected = (4 * ROWS * NARROW + 4 * ROWS) * 4 + WIDE * NARROW * 4
    assert tables.memory_bytes() == expected


def test_a_collection_without_hooks_adds_nothing(tiny_root):
    tables = build_tables([TableConfig(kind="hash", embedding_dim=8, num_embeddings=8)], SCHEMA.sparse, tiny_root)
    assert tables.dense_parameters() == [] and tables.auxiliary_loss() is None


def test_loop_trains_the_projection_logs_the_aux_loss_and_resumes(tiny_root, tmp_path):
    cfg = _config(tiny_root, tmp_path / "straight", "train.max_steps=8")
    model = _model(cfg)
    start = model.tables.tables[0].projection.detach().clone()
    result = train(cfg, local_source(cfg), track=False, model=model)
    trained = model.tables.tables[0].projection.detach()
    assert not torch.allclose(start, trained), "the dense optimizer must update a table's projection"
    logged = [h for h in result.history if "train/aux_loss" in h]
    assert logged and all(h["train/aux_loss"] > 0 for h in logged)
    assert all(h["train/loss"] < 2.0 for h in logged)  # BCE alone: the aux term is not in it

    # the same 8 steps as 4 + a resumed 4: the projection and its optimizer state travel in checkpoints
    halves = tmp_path / "halves"
    train(_config(tiny_root, halves, "train.max_steps=4"), local_source(cfg), track=False, model=_model(cfg))
    resumed = _model(cfg)
    train(_config(tiny_root, halves, "train.max_steps=8"), local_source(cfg), track=False, model=resumed)
    torch.testing.assert_close(resumed.tables.tables[0].projection.detach(), trained)


def test_export_includes_the_projection(tiny_root, tmp_path):
    from recmem.export.job import export_model

    cfg = _config(tiny_root, tmp_path, "train.max_steps=3")
    model = _model(cfg)
    train(cfg, local_source(cfg), track=False, model=model)
    folder = export_model(model, cfg, tmp_path / "exports", "fp32", {"step": 3})  # checks parity itself
    bundle = load_bundle(folder)
    assert bundle.manifest["export_check"]["max_abs_logit_diff"] <= 1e-5
    assert all(t["width"] == WIDE for t in bundle.manifest["tables"])
    assert all("projection" in t["files"] for t in bundle.manifest["tables"])


def test_model_width_is_separate_from_storage_width(tiny_root, tmp_path):
    cfg = _config(tiny_root, tmp_path)
    assert cfg.model.embedding_dim == 8 and cfg.model.tables[0].embedding_dim == 4
    with pytest.raises(ConfigError, match=r"model.tables.0.embedding_dim: 4 differs from the model's width "
                                          r"model.embedding_dim=8; a 'hash' table"):
        build_tables(cfg.model.tables, SCHEMA.sparse, tiny_root, output_dim=8)
    same = dataclasses.replace(cfg.model.tables[0], embedding_dim=8)
    assert build_tables([same], SCHEMA.sparse, tiny_root, output_dim=8).embedding_dim == 8
    with pytest.raises(ConfigError, match="model.bottom_mlp: .* must end in model.embedding_dim=16"):
        tiny_config(tiny_root, tmp_path, "model.embedding_dim=16")
