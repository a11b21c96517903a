"""Embedding tables: one file per kind, all behind the `EmbeddingTable` contract (see base.py).

Adding a kind is a new file plus one line in ``TABLE_KINDS``; each kind's ``from_config`` turns its
config block into plain constructor arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recmem.config import ConfigError, TableConfig
from recmem.tables.base import HasAuxiliaryLoss, HasDenseParameters, HasPlan, Prefetchable, ServingForm
from recmem.tables.collisionless import CollisionlessTable
from recmem.tables.full import FullTable
from recmem.tables.hash import HashTable
from recmem.tables.mixed_dim import MixedDimTable
from recmem.tables.multihash import MultiHashTable
from recmem.tables.optembed import OptEmbedTable
from recmem.tables.qr import QRTable
from recmem.tables.ssd import SSDTable

TABLE_KINDS = {
    "full": FullTable,
    "hash": HashTable,
    "collisionless": CollisionlessTable,
    "qr": QRTable,
    "multihash": MultiHashTable,
    "ssd": SSDTable,
    "optembed": OptEmbedTable,
    "mixed_dim": MixedDimTable,
}


class TableCollection(torch.nn.Module):
    """All tables of a model: routes each feature of a raw-ID KJT to its table, in schema order.

    Args:
        tables: table modules, each owning some of ``feature_names``.
        feature_names: every sparse feature, in the order the output stacks them.
    """

    def __init__(self, tables: list[torch.nn.Module], feature_names: list[str]) -> None:
        super().__init__()
        widths = {t.embedding_dim for t in tables}
        if len(widths) != 1:
            raise ValueError(f"tables of output widths {sorted(widths)}: the model stacks them, they need one")
        self.tables = torch.nn.ModuleList(tables)
        self.feature_names = list(feature_names)
        self.embedding_dim = widths.pop()
        owned = [f for t in tables for f in t.feature_names]
        # One table covering every feature in order (the common case) needs no KJT re-grouping.
        self._passthrough = len(tables) == 1 and owned == self.feature_names
        self._order = [owned.index(f) for f in self.feature_names]

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Raw-ID KJT of all sparse features -> [B, F, D] pooled embeddings."""
        if self._passthrough:
            return self.tables[0](features)
        pooled = [t(_select(features, t.feature_names)) for t in self.tables]  # each [B, F_t, D]
        return torch.cat(pooled, dim=1)[:, self._order]

    def to_serving(self) -> list[ServingForm]:
        """Every feature's serving form (``base.ServingForm``), in ``feature_names`` order."""
        forms = {f: form for t in self.tables for f, form in zip(t.feature_names, t.to_serving())}
        return [forms[f] for f in self.feature_names]

    def dense_parameters(self) -> list[torch.nn.Parameter]:
        """The tables' own dense parameters (``base.HasDenseParameters``), for the dense optimizer."""
        return [p for t in self.tables if isinstance(t, HasDenseParameters) for p in t.dense_parameters()]

    def auxiliary_loss(self) -> torch.Tensor | None:
        """The sum of the tables' loss terms for the forward that just ran (``base.HasAuxiliaryLoss``);
        None when no table adds one."""
        terms = [t.auxiliary_loss() for t in self.tables if isinstance(t, HasAuxiliaryLoss)]
        return torch.stack(terms).sum() if terms else None

    def plan(self) -> dict[str, str]:
        """The layouts tables chose at build time (``base.HasPlan``), as ``tables.<i>.<key>`` params."""
        return {f"tables.{i}.{k}": v for i, t in enumerate(self.tables) if isinstance(t, HasPlan)
                for k, v in t.plan().items()}

    def prefetching(self) -> bool:
        """Whether any table prefetches (``base.Prefetchable``)."""
        return any(isinstance(t, Prefetchable) for t in self.tables)

    def prefetch(self, features: KeyedJaggedTensor) -> list[tuple[int, object]]:
        """Hand each prefetching table its features of an upcoming batch; returns the tickets to
        :meth:`release` once the step that trains the batch is over."""
        return [(i, t.prefetch(_select(features, t.feature_names)))
                for i, t in enumerate(self.tables) if isinstance(t, Prefetchable)]

    def prefetch_stats(self) -> dict[str, float]:
        """``<i>/<stat>`` of the prefetching tables only (cache hit rates, prefetch wait, disk bytes):
        what the loop reports between validations. Their counters restart, as after ``stats``."""
        return {f"{i}/{k}": v for i, t in enumerate(self.tables) if isinstance(t, Prefetchable)
                for k, v in t.stats().items()}

    def release(self, tickets: list[tuple[int, object]]) -> None:
        """Unpin the rows of the batch :meth:`prefetch` gave ``tickets`` for."""
        for i, ticket in tickets:
            self.tables[i].release(ticket)

    def memory_bytes(self) -> int:
        """Bytes in RAM over all tables."""
        return sum(t.memory_bytes() for t in self.tables)

    def stats(self) -> dict[str, float]:
        """``<kind>_<i>/<stat>`` numbers of every table, plus the total memory."""
        out = {"memory_bytes": float(self.memory_bytes())}
        for i, t in enumerate(self.tables):
            out.update({f"{i}/{k}": v for k, v in t.stats().items()})
        return out


def _select(features: KeyedJaggedTensor, keys: list[str]) -> KeyedJaggedTensor:
    if features.keys() == keys:
        return features
    return features.permute([features.keys().index(k) for k in keys])


def build_tables(
    configs: list[TableConfig], sparse_features: list[str], data_root: Path, seed: int = 0,
    make: Callable[..., torch.nn.Module] | None = None, output_dim: int = 0,
) -> TableCollection:
    """Turn the ``model.tables`` blocks into a TableCollection covering every sparse feature.

    A block with empty ``feature_names`` takes every feature no earlier block named. ``make(kind,
    cfg, feature_names, seed, data_root, where)`` builds one block's module; the default is the
    kind's ``from_config(..., output_dim=output_dim)`` (the ID-sharded path in ``sharded.py`` passes
    its own).

    Args:
        output_dim: the model's width (``model.embedding_dim``); 0: the blocks' shared ``embedding_dim``.

    Raises:
        ConfigError: an unknown kind or feature, a feature claimed twice or by no block, or a table
            whose output width is not the model's.
    """
    output_dim = output_dim or configs[0].embedding_dim
    claimed = {f for c in configs for f in c.feature_names}
    taken: set[str] = set()
    tables = []
    for i, cfg in enumerate(configs):
        where = f"model.tables.{i}"
        if cfg.kind not in TABLE_KINDS:
            raise ConfigError(f"{where}.kind: unknown table kind {cfg.kind!r} (known: {sorted(TABLE_KINDS)})")
        names = cfg.feature_names or [f for f in sparse_features if f not in claimed and f not in taken]
        for f in names:
            if f not in sparse_features:
                raise ConfigError(f"{where}.feature_names: {f!r} is not a sparse feature of the schema")
            if f in taken:
                raise ConfigError(f"{where}.feature_names: {f!r} already has a table")
        taken.update(names)
        if names:
            build = make or (lambda kind, *args: kind.from_config(*args, output_dim=output_dim))
            table = build(TABLE_KINDS[cfg.kind], cfg, names, seed + i, Path(data_root), where)
            if table.embedding_dim != output_dim:
                raise ConfigError(f"{where}.embedding_dim: this {cfg.kind!r} table yields rows of width "
                                  f"{table.embedding_dim}, the model's width is {output_dim} (model.embedding_dim)")
            tables.append(table)
    missing = [f for f in sparse_features if f not in taken]
    if missing:
        raise ConfigError(f"model.tables: no table for features {missing}")
    return TableCollection(tables, sparse_features)
