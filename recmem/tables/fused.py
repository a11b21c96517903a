"""fbgemm's fused table-batched embedding bags on CPU, with exact row-wise Adagrad in backward.

Several tables of one width live in one ``SplitTableBatchedEmbeddingBagsCodegen``: one kernel call looks
up and pools every table, and backward updates only the touched rows (sparse), fusing the optimizer
with the gradient. The unsharded torchrec ``EmbeddingBagCollection`` path instead builds a dense
gradient of every row each step (1.1 s/step at 26 x 1M rows here, against ~7 ms for this).
Kinds that map IDs to rows their own way (full, hash, collisionless) store their rows here.
"""

from __future__ import annotations

import math

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    EmbeddingLocation,
    SplitTableBatchedEmbeddingBagsCodegen,
)

from recmem.tables.base import tensor_bytes


class FusedRowwiseAdagrad(torch.nn.Module):
    """T tables of width D in one fbgemm TBE, trained by exact row-wise Adagrad inside backward.

    Args:
        rows: rows of each table.
        embedding_dim: D, shared by all tables.
        learning_rate: the row-wise Adagrad step size.
        seed: seeds the initial rows, uniform in +-sqrt(1/rows) as torchrec initialises tables.
        eps: Adagrad epsilon.
        initialise: draw the initial rows; False leaves them zero, for owners that write every row
            before it is read (collisionless tables initialise a row when an ID is admitted, and
            re-build this module each time they grow: drawing 26 x 64k rows only to overwrite them
            took ~0.25 s per growth).
    """

    def __init__(
        self,
        rows: list[int],
        embedding_dim: int,
        learning_rate: float,
        seed: int = 0,
        eps: float = 1e-8,
        initialise: bool = True,
    ) -> None:
        super().__init__()
        if not rows or min(rows) < 1:
            raise ValueError(f"every table needs at least one row, got rows={rows}")
        self.rows = list(rows)
        self.embedding_dim = embedding_dim
        self.tbe = SplitTableBatchedEmbeddingBagsCodegen(
            [(n, embedding_dim, EmbeddingLocation.HOST, ComputeDevice.CPU) for n in rows],
            optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
            learning_rate=learning_rate,
            eps=eps,
            pooling_mode=PoolingMode.SUM,
        )
        # Each table's slice of the flat buffers, as plain ints: fbgemm's split_embedding_weights()
        # and split_optimizer_states() rebuild every table's view from tensor offsets on each call
        # (~0.2 ms at 26 tables), which made one call per table quadratic in the number of tables.
        self._weight_offsets = [int(o) for o in self.tbe.weights_physical_offsets]
        self._momentum_offsets = [int(o) for o in self.tbe.momentum1_physical_offsets]
        if initialise:
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for t in range(len(rows)):
                    self.reset_rows(t, None, generator)

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Pool rows per bag.

        Args:
            indices: [N] int64 row numbers, local to each table.
            offsets: [T * B + 1] int64 bag boundaries, table-major (all of table 0's bags first),
                exactly the layout of a KeyedJaggedTensor's ``offsets()``.

        Returns:
            [B, T, D] sum-pooled embeddings.
        """
        pooled = self.tbe(indices, offsets)  # [B, T * D]
        return pooled.view(pooled.shape[0], len(self.rows), self.embedding_dim)

    def weights(self, table: int) -> torch.Tensor:
        """A writable view [rows, D] of one table's rows."""
        start, n = self._weight_offsets[table], self.rows[table]
        return self.tbe.weights_host.detach()[start:start + n * self.embedding_dim].view(n, self.embedding_dim)

    def momentum(self, table: int) -> torch.Tensor:
        """A writable view [rows] of one table's row-wise Adagrad accumulator."""
        start = self._momentum_offsets[table]
        return self.tbe.momentum1_host.detach()[start:start + self.rows[table]]

    @torch.no_grad()
    def reset_rows(
        self, table: int, rows: torch.Tensor | None, generator: torch.Generator | None = None
    ) -> None:
        """Give ``rows`` (all when None) fresh initial values and a zero optimizer state."""
        weights, momentum = self.weights(table), self.momentum(table)
        bound = math.sqrt(1.0 / self.rows[table])
        if rows is None:
            weights.uniform_(-bound, bound, generator=generator)
            momentum.zero_()
            return
        fresh = torch.empty(len(rows), self.embedding_dim).uniform_(-bound, bound, generator=generator)
        weights[rows] = fresh
        momentum[rows] = 0.0

    def set_learning_rate(self, learning_rate: float) -> None:
        """Change the Adagrad step size (for schedules)."""
        self.tbe.set_learning_rate(learning_rate)

    def memory_bytes(self) -> int:
        """Bytes of rows and optimizer state, measured from fbgemm's host buffers."""
        return self.row_bytes() + self.optimizer_bytes()

    def row_bytes(self) -> int:
        """Bytes of the rows (fbgemm's ``weights_host``)."""
        return tensor_bytes(self.tbe.weights_host)

    def optimizer_bytes(self) -> int:
        """Bytes of the row-wise Adagrad state (fbgemm's ``momentum1_host``)."""
        return tensor_bytes(self.tbe.momentum1_host)
