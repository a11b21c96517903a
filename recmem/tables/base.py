"""The contract every table kind meets, and the small optional capabilities some add.

A table module owns one or more sparse features (one table per feature, fused where the kind can
fuse them). It takes a KeyedJaggedTensor of *raw* int64 IDs holding exactly its features and returns
their sum-pooled embeddings stacked in its ``feature_names`` order::

    KJT keys = feature_names, lengths [F * B], values raw int64 IDs
        -> forward ->  [B, F, D] float32   (D = embedding_dim, an empty bag gives a zero row)

``embedding_dim`` is the table's *output* width, the model's one width (``model.embedding_dim``);
what a kind stores behind it may be narrower or compositional.

Tables update their rows themselves: their optimizer (row-wise Adagrad at least) runs inside
backward, fused with the gradient, so the dense optimizer never sees table rows. Small dense
parameters a kind owns (projections) are the exception: it lists them in ``dense_parameters()``
and the trainer's dense optimizer updates them with the dense layers. ``state_dict()`` holds
weights *and* optimizer state *and* any ID mapping, saved together so a restore continues training
identically.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recmem.config import ConfigError, TableConfig


class ServingForm(NamedTuple):
    """One feature's table as serving needs it (see ``recmem/serving/lookup.py``).

    Attributes:
        lookup: ``"keyed"`` (sorted raw IDs, their rows, a default row for other IDs) or
            ``"modulo"`` (row ``id mod n``); ``recmem.serving.lookup.LOOKUPS`` lists every lookup.
        tensors: keyed: ``keys`` [n] int64 ascending, ``rows`` [n, d] float32, ``default`` [d]
            float32; modulo: ``rows`` [n, d] float32. Any lookup may add ``projection`` [D, d]
            float32: the pooled rows are multiplied by its transpose (a table's learned map from
            its storage width d to the output width D). Copies, never views of training storage.
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
        """Bytes held in RAM, measured from the live tensors and arrays (never from the config):
        rows, their optimizer state, projections, ID maps, filters."""
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
class HasDenseParameters(Protocol):
    """A table owning small dense parameters (projections) that the dense optimizer trains."""

    def dense_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the trainer's dense optimizer must update (never the rows)."""
        ...


@runtime_checkable
class HasAuxiliaryLoss(Protocol):
    """A table adding a term to the training loss (a regulariser of its own parameters)."""

    def auxiliary_loss(self) -> torch.Tensor:
        """A scalar added to the loss of the step whose forward just ran (logged apart from it)."""
        ...


@runtime_checkable
class HasPlan(Protocol):
    """A table whose layout is chosen at build time (per-feature widths): worth printing and logging."""

    def plan(self) -> dict[str, str]:
        """``key -> value`` of the chosen layout, logged as MLflow params ``tables.<i>.<key>``."""
        ...


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the storage behind ``tensors``, each storage counted once (views share one)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


def check_width(cfg: TableConfig, where: str, output_dim: int | None) -> None:
    """For kinds whose rows are their output: the block's ``embedding_dim`` must be the model's.

    Raises:
        ConfigError: naming ``<where>.embedding_dim`` and both widths.
    """
    if output_dim is not None and cfg.embedding_dim != output_dim:
        raise ConfigError(f"{where}.embedding_dim: {cfg.embedding_dim} differs from the model's width "
                          f"model.embedding_dim={output_dim}; a {cfg.kind!r} table stores rows of its output width")


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
    """A table that can fetch the rows of upcoming batches ahead of time and pin them.

    The training loop (``recmem/train/lookahead.py``) calls ``prefetch`` with each batch some steps
    before training it and ``release`` once the step that used it is over; between the two calls
    the batch's rows stay in RAM (pinned). Prefetching is not training: it counts no sightings and
    updates no row. ``forward`` still works on a batch nobody prefetched (it fetches on demand).
    """

    def prefetch(self, features: KeyedJaggedTensor) -> object:
        """Start bringing the rows ``features`` will need into RAM and pin them; returns a ticket."""
        ...

    def release(self, ticket: object) -> None:
        """Unpin the rows of the batch ``ticket`` was given for."""
        ...
