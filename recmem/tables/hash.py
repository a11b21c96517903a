"""`hash`: the hashing trick, ``id mod n`` rows per feature, collisions allowed (the baseline)."""

from __future__ import annotations

from pathlib import Path

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recmem.config import ConfigError, TableConfig
from recmem.tables.base import ServingForm, check_width
from recmem.tables.fused import FusedRowwiseAdagrad
from recmem.tables.sharded import RowKeys, RowRouter


class HashTable(torch.nn.Module):
    """Each feature's raw IDs land in ``num_embeddings`` rows by ``id mod num_embeddings``.

    Raw IDs are already well mixed (hashed hex strings, or recmem's random 64-bit synthetic IDs), so
    the modulus alone spreads them; negative IDs fold in through a non-negative remainder.

    Args:
        feature_names: the F features, one table each.
        num_embeddings: rows per table.
        embedding_dim: D.
        learning_rate: row-wise Adagrad step size.
        seed: seeds the initial rows.
    """

    def __init__(
        self,
        feature_names: list[str],
        num_embeddings: int,
        embedding_dim: int,
        learning_rate: float,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.feature_names = list(feature_names)
        self.embedding_dim = embedding_dim
        self.num_embeddings = num_embeddings
        self.rows = FusedRowwiseAdagrad([num_embeddings] * len(feature_names), embedding_dim, learning_rate, seed)

    @classmethod
    def from_config(cls, cfg: TableConfig, feature_names: list[str], seed: int, data_root: Path, where: str,
                    output_dim: int | None = None):
        """Build from a table block; ``num_embeddings`` is required and there are no options."""
        check_width(cfg, where, output_dim)
        _check_config(cfg, where)
        return cls(feature_names, cfg.num_embeddings, cfg.embedding_dim, cfg.learning_rate, seed)

    @classmethod
    def row_keys_from_config(cls, cfg: TableConfig, feature_names: list[str], seed: int, data_root: Path,
                             where: str) -> RowKeys:
        """How the distributed paths split this kind (``recmem/tables/sharded.py``): by row ``id mod n``."""
        _check_config(cfg, where)
        return RowKeys(router=ModRouter(cfg.num_embeddings), rows=[cfg.num_embeddings] * len(feature_names))

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Raw-ID KJT of ``feature_names`` -> [B, F, D]."""
        rows = torch.remainder(features.values(), self.num_embeddings)
        return self.rows(rows, features.offsets())

    def to_serving(self) -> list[ServingForm]:
        """Per feature: all its rows, looked up by ``id mod num_embeddings``."""
        return [ServingForm("modulo", {"rows": self.rows.weights(i).detach().clone()})
                for i in range(len(self.feature_names))]

    def memory_bytes(self) -> int:
        """Rows + Adagrad state."""
        return self.rows.memory_bytes()

    def stats(self) -> dict[str, float]:
        """Rows per table in total."""
        return {"rows": float(sum(self.rows.rows))}


class ModRouter(RowRouter):
    """Routes a sharded `hash` table: raw IDs -> row ``id mod n``, row k owned by worker ``k mod W``.

    Args:
        num_embeddings: n, rows per table.
    """

    def __init__(self, num_embeddings: int) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Raw-ID KJT -> [N] global rows."""
        return torch.remainder(features.values(), self.num_embeddings)


def _check_config(cfg: TableConfig, where: str) -> None:
    if cfg.num_embeddings < 1:
        raise ConfigError(f"{where}.num_embeddings: the hash kind needs rows per table (> 0)")
    if cfg.options:
        raise ConfigError(f"{where}.options: the hash kind has no options, got {sorted(cfg.options)}")
