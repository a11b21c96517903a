"""The one batch type that flows from collate to the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass
class Batch:
    """A training batch of B rows.

    Attributes:
        dense_features: [B, n_dense] float32, already transformed (log(1+x), negatives clipped).
        sparse_features: a KeyedJaggedTensor of raw int64 IDs, one key per sparse field::

                        row0     row1   ...
            "C1"     [id_a]   [id_b]          lengths [B] per key, values int64 raw IDs
            "C2"     [id_c]   []              (an empty bag pools to a zero vector)

        labels: [B] float32 in {0, 1}.
        event_time: [B] int64 data time (seconds) of each row, or None when the data has none.
        true_prob: [B] float32 ground-truth click probability (synthetic data only), or None.
    """

    dense_features: torch.Tensor
    sparse_features: KeyedJaggedTensor
    labels: torch.Tensor
    event_time: torch.Tensor | None = None
    true_prob: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """The same batch on ``device``."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(
            dense_features=move(self.dense_features),
            sparse_features=self.sparse_features.to(device, non_blocking=non_blocking),
            labels=move(self.labels),
            event_time=move(self.event_time),
            true_prob=move(self.true_prob),
        )

    def max_event_time(self) -> int | None:
        """The latest data time in the batch: the clock that drives table expiry."""
        return None if self.event_time is None else int(self.event_time.max())
