"""Models: any table kind (a TableCollection) under a dense architecture (DLRM, DCNv2)."""

from __future__ import annotations

from pathlib import Path

import torch

from recmem.config import ModelConfig, SchemaConfig, model_embedding_dim
from recmem.data.batch import Batch
from recmem.models.dcn import DCNv2Dense
from recmem.models.dlrm import DLRMDense
from recmem.tables import TableCollection, build_tables


class CTRModel(torch.nn.Module):
    """Tables + a dense architecture: Batch -> click logits.

    Tables live in host memory, run in fp32 and update themselves in backward (fbgemm's CPU kernels;
    the collisionless kind keeps its ID maps on the host too). The dense part runs on
    ``device``: the CPU, or a GPU that receives the pooled rows and sends their gradients back, and
    may run under bf16 autocast (fp32 master weights), which halves its cost on CPUs with AVX512-BF16
    and on GPUs (``train.precision: auto`` turns it on exactly there: ``recmem/train/device.py``).

    Args:
        tables: pooled embeddings of every sparse feature, [B, F, D] (D: the model's width; the
            tables' own dense parameters train with ``dense``'s, see ``dense_parameters``).
        dense: (dense [B, n_dense], pooled [B, F, D]) -> logits [B]; moved to ``device``.
        bf16: run the dense part under ``torch.autocast(device.type, dtype=torch.bfloat16)``.
        device: where the dense part runs.
    """

    def __init__(self, tables: TableCollection, dense: torch.nn.Module, bf16: bool = False,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.tables = tables
        self.dense = dense.to(self.device)
        self.bf16 = bf16

    def dense_parameters(self) -> list[torch.nn.Parameter]:
        """Everything the dense optimizer trains: the dense layers, then the tables' projections."""
        return list(self.dense.parameters()) + self.tables.dense_parameters()

    def forward(self, batch: Batch) -> torch.Tensor:
        """Batch of B rows -> logits [B] (float32, on the CPU whatever ``device`` is)."""
        pooled = self.tables(batch.sparse_features).to(self.device, non_blocking=True)  # [B, F, D]
        dense = batch.dense_features.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.dense(dense, pooled)
        return logits.float().cpu()


def build_model(
    cfg: ModelConfig, schema: SchemaConfig, data_root: Path, seed: int = 0, bf16: bool = False,
    device: torch.device | str = "cpu",
) -> CTRModel:
    """Build tables and the dense arch named by ``cfg.arch`` for ``schema``'s features."""
    torch.manual_seed(seed)
    tables = build_tables(cfg.tables, schema.sparse, data_root, seed, output_dim=model_embedding_dim(cfg))
    return CTRModel(tables, build_dense(cfg, schema), bf16, device)


def build_dense(cfg: ModelConfig, schema: SchemaConfig) -> torch.nn.Module:
    """The dense arch named by ``cfg.arch``: (dense [B, n_dense], pooled [B, F, D]) -> logits [B].

    Initialised from torch's global generator (``build_model`` seeds it; sharded workers too).
    """
    dim = model_embedding_dim(cfg)
    n_dense, n_sparse = len(schema.dense), len(schema.sparse)
    if cfg.arch == "dlrm":
        return DLRMDense(n_dense, n_sparse, dim, cfg.bottom_mlp, cfg.top_mlp)
    return DCNv2Dense(n_dense, n_sparse, dim, cfg.bottom_mlp, cfg.top_mlp, cfg.cross_layers)
