"""The serving form of a ``multihash`` table (``recmem/tables/multihash.py``): k hashed rows per ID.

Kept apart from ``lookup.py`` (which dispatches to it) as the lookup of one kind; pure torch.
"""

from __future__ import annotations

import torch

from recmem.serving.hashing import PRIME, buckets
from recmem.serving.lookup import QuantizedRows, pool

COMBINES = ("sum", "concat")
"""How the k rows of an ID combine (``params[1]`` indexes this)."""


class MultiHashLookup:
    """Raw ID -> k rows of one shared table, picked by k hashes, summed or concatenated.

    Args:
        rows: the n shared rows (width d).
        params: [2 + 2k] int64: k, combine (index in :data:`COMBINES`), then each hash's multiplier
            and offset (``recmem.serving.hashing``).
    """

    kind = "multihash"

    def __init__(self, rows: QuantizedRows, params: torch.Tensor) -> None:
        self.rows, self.params = rows, params
        values = [int(x) for x in params]
        self.num_hashes, self.combine = values[0], COMBINES[values[1]]
        self._hashes = list(zip(values[2::2], values[3::2]))

    @property
    def width(self) -> int:
        """The embedding width (k times the rows' under concat)."""
        return self.rows.width * (self.num_hashes if self.combine == "concat" else 1)

    def slots(self, values: torch.Tensor) -> torch.Tensor:
        """[N] raw IDs -> [N, k] int64 rows."""
        n = len(self.rows)
        return torch.stack([buckets(values, m, o, n) for m, o in self._hashes], dim=1)

    def __call__(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """values [N] int64, lengths [B] -> [B, width] summed embeddings."""
        picked = self.rows.gather(self.slots(values).flatten()).view(len(values), self.num_hashes, -1)  # [N, k, d]
        per_id = picked.sum(1) if self.combine == "sum" else picked.flatten(1)  # [N, width]
        return pool(per_id, lengths)

    def with_rows(self, ids: torch.Tensor, rows: torch.Tensor, deleted: torch.Tensor) -> "MultiHashLookup":
        """A new lookup with shared rows number ``ids`` [k] (in ``[0, n)``) set to ``rows`` [k, d]."""
        if deleted.numel():
            raise ValueError("a multihash table has no IDs to delete; send its rows")
        return MultiHashLookup(self.rows.replaced(ids, rows), self.params)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a bundle stores of it."""
        return {"params": self.params, **self.rows.tensors()}

    def nbytes(self) -> int:
        """Bytes held."""
        return self.rows.nbytes() + self.params.numel() * 8


def multihash_lookup(params: torch.Tensor, rows: QuantizedRows) -> MultiHashLookup:
    """Check ``params`` (1-D int64) against ``rows`` and build the lookup.

    Raises:
        ValueError: a count, combination or hash parameter out of range, or no rows.
    """
    values = [int(x) for x in params]
    if len(values) < 4 or values[0] < 1 or len(values) != 2 + 2 * values[0] or not 0 <= values[1] < len(COMBINES):
        raise ValueError(f"params {values[:8]} are not k, combine and k (multiplier, offset) pairs")
    if not all(1 <= m < PRIME and 0 <= o < PRIME for m, o in zip(values[2::2], values[3::2])):
        raise ValueError("a hash multiplier or offset is out of range")
    if len(rows) < 1:
        raise ValueError("a multihash table needs at least one row")
    return MultiHashLookup(rows, params)
