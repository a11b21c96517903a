"""Models: any table kind (a TableCollection) under a dense architecture (DLRM, DCNv2)."""

from __future__ import annotations

from pathlib import Path

import torch

from recmem.config import ModelConfig, SchemaConfig
from recmem.data.batch import Batch
from recmem.models.dcn import DCNv2Dense
from recmem.models.dlrm import DLRMDense
from recmem.tables import TableCollection, build_tables


class CTRModel(torch.nn.Module):
    """Tables + a dense architecture: Batch -> click logits.

    Tables run in fp32 and update themselves in backward; the dense part may run under bf16 autocast
    (fp32 master weights), which halves its cost on CPUs with AVX512-BF16.

    Args:
        tables: pooled embeddings of every sparse feature, [B, F, D].
        dense: (dense [B, n_dense], pooled [B, F, D]) -> logits [B].
        bf16: run the dense part under ``torch.autocast("cpu", dtype=torch.bfloat16)``.
    """

    def __init__(self, tables: TableCollection, dense: torch.nn.Module, bf16: bool = False) -> None:
        super().__init__()
        self.tables = tables
        self.dense = dense
        self.bf16 = bf16

    def forward(self, batch: Batch) -> torch.Tensor:
        """Batch of B rows -> logits [B] (float32)."""
        pooled = self.tables(batch.sparse_features)  # [B, F, D]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.dense(batch.dense_features, pooled)
        return logits.float()


def build_model(
    cfg: ModelConfig, schema: SchemaConfig, data_root: Path, seed: int = 0, bf16: bool = False
) -> CTRModel:
    """Build tables and the dense arch named by ``cfg.arch`` for ``schema``'s features."""
    torch.manual_seed(seed)
    tables = build_tables(cfg.tables, schema.sparse, data_root, seed)
    return CTRModel(tables, build_dense(cfg, schema), bf16)


def build_dense(cfg: ModelConfig, schema: SchemaConfig) -> torch.nn.Module:
    """The dense arch named by ``cfg.arch``: (dense [B, n_dense], pooled [B, F, D]) -> logits [B].

    Initialised from torch's global generator (``build_model`` seeds it; sharded workers too).
    """
    dim = cfg.tables[0].embedding_dim
    n_dense, n_sparse = len(schema.dense), len(schema.sparse)
    if cfg.arch == "dlrm":
        return DLRMDense(n_dense, n_sparse, dim, cfg.bottom_mlp, cfg.top_mlp)
    return DCNv2Dense(n_dense, n_sparse, dim, cfg.bottom_mlp, cfg.top_mlp, cfg.cross_layers)
