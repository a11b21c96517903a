"""The contract every table kind meets, and the small optional capabilities some add.

A table module owns one or more sparse features (one table per feature, fused where the kind can
fuse them). It takes a KeyedJaggedTensor of *raw* int64 IDs holding exactly its features and returns
their sum-pooled embeddings stacked in its ``feature_names`` order::

    KJT keys = feature_names, lengths [F * B], values raw int64 IDs
        -> forward ->  [B, F, D] float32   (D = embedding_dim, an empty bag gives a zero row)

Tables update themselves: their optimizer (row-wise Adagrad at least) runs inside backward, fused with
the gradient, so the dense optimizer never sees table weights. ``state_dict()`` holds weights *and*
optimizer state *and* any ID mapping, saved together so a restore continues training identically.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


class ServingForm(NamedTuple):
    """One feature's table as serving needs it (see ``recmem/serving/lookup.py``).

    Attributes:
        lookup: ``"keyed"`` (sorted raw IDs, their rows, a default row for other IDs) or
            ``"modulo"`` (row ``id mod n``).
        tensors: keyed: ``keys`` [n] int64 ascending, ``rows`` [n, D] float32, ``default`` [D]
            float32; modulo: ``rows`` [n, D] float32. Copies, never views of training storage.
    """

    lookup: str
    tensors: dict[str, torch.Tensor]


@runtime_checkable
class EmbeddingTable(Protocol):
    """What the models and the trainer rely on (an ``nn.Module`` in practice)."""

    feature_names: list[str]
    embedding_dim: int

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Raw-ID KJT of ``feature_names`` -> pooled embeddings [B, F, D]."""
        ...

    def memory_bytes(self) -> int:
        """Bytes held in RAM: rows, optimizer state, ID maps, filters."""
        ...

    def stats(self) -> dict[str, float]:
        """Numbers worth logging as ``tables/<name>`` metrics (rows live, memory by part, ...)."""
        ...

    def to_serving(self) -> list[ServingForm]:
        """The serving form of each feature's table, in ``feature_names`` order: what a bundle stores
        (rows, no optimizer state) and ``recmem.serving.lookup.lookup_from_tensors`` turns into a
        pure-torch lookup that answers exactly as ``forward`` does in eval mode. A new kind brings
        its own; the contract suite checks it (``tests/test_tables_contract.py``)."""
        ...


@runtime_checkable
class Evictable(Protocol):
    """A table whose rows age in *data* time (the batches' event time, never the wall clock)."""

    def observe_time(self, now: int) -> None:
        """Stamp the data time of the batch about to be trained; touched rows record it."""
        ...

    def evict(self, now: int) -> int:
        """Free rows idle longer than the table's TTL at data time ``now``; returns rows freed."""
        ...


@runtime_checkable
class Prefetchable(Protocol):
    """A table that can fetch the rows of upcoming batches ahead of time.

    No kind implements it yet and the training loop does not call it: it is the capability the
    planned SSD-backed kind will add.
    """

    def prefetch(self, features: KeyedJaggedTensor) -> None:
        """Start bringing the rows ``features`` will need into RAM."""
        ...
