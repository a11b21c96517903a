"""`qr`: compositional quotient-remainder embeddings (Shi et al., "Compositional Embeddings Using
Complementary Partitions for Memory-Efficient Recommendation Systems", KDD 2020).

An ID first gets its row number r as `full` gives it (its position in the feature's vocabulary from
the statistics; an unseen or rare ID is hashed into ``oov_buckets`` rows after the vocabulary), so a
feature has R = n + oov_buckets row numbers. With c collisions the feature keeps two tables::

    quotient   ceil(R / c) rows, row r // c        remainder   c rows, row r % c

and the ID's embedding combines the two rows: element-wise product (the paper's default), sum, or
concatenation (each half of the output width). The quotient and remainder partitions are
complementary: r -> (r // c, r % c) is one-to-one on [0, R), so no two row numbers share both rows.
Each ID's embedding is composed *before* its bag is summed (a product of sums is not a sum of
products). A feature whose R is at most ``threshold`` (or at most c, where composing saves nothing)
keeps one full table.

Rows start uniform in +-sqrt(1 / rows) of their own table, symmetric about zero, so products of
quotient and remainder rows take both signs (an initialisation in [0, 1) would make them all
positive).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recmem.config import NON_NEGATIVE, POSITIVE, ConfigError, TableConfig, checked, from_dict
from recmem.serving.hashing import hash_params
from recmem.serving.lookup import COMPOSE_OPS
from recmem.tables.base import ServingForm, tensor_bytes
from recmem.tables.full import hashed_vocab_rows
from recmem.tables.fused import FusedRowwiseAdagrad

Operation = Literal["mult", "add", "concat"]


@dataclass
class QROptions:
    """``options`` of a ``qr`` table block.

    Attributes:
        collisions: c, row numbers sharing one quotient row (the memory ratio is about c for large
            features).
        operation: how the quotient and remainder rows combine: ``mult`` (element-wise), ``add``, or
            ``concat`` (rows of the block's ``embedding_dim``, output twice that wide).
        threshold: features with at most this many row numbers keep one full table.
        min_count: IDs seen fewer times than this in the training split get no vocabulary row (as `full`).
        oov_buckets: hashed rows shared by unseen and rare IDs (1: one OOV row, as `full`).
    """

    collisions: int = checked(4, POSITIVE)
    operation: Operation = "mult"
    threshold: int = checked(200, NON_NEGATIVE)
    min_count: int = checked(1, NON_NEGATIVE)
    oov_buckets: int = checked(1, POSITIVE)


def qr_rows(row_numbers: torch.Tensor, collisions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row numbers r [N] -> (quotient rows r // c [N], remainder rows r % c [N]), both table-local."""
    quotient = torch.div(row_numbers, collisions, rounding_mode="floor")
    return quotient, torch.remainder(row_numbers, collisions)


class QRTable(torch.nn.Module):
    """Quotient-remainder tables per feature (full tables for small features), in two fused kernels.

    Args:
        feature_names: the F features.
        vocabularies: per feature, the sorted unique raw int64 IDs that own a row number.
        embedding_dim: D, the output width.
        learning_rate: row-wise Adagrad step size.
        collisions, operation, threshold, oov_buckets: as in :class:`QROptions`.
        seed: seeds the initial rows and the OOV hashes.
    """

    def __init__(self, feature_names: list[str], vocabularies: list[np.ndarray], embedding_dim: int,
                 learning_rate: float, collisions: int = 4, operation: Operation = "mult", threshold: int = 200,
                 oov_buckets: int = 1, seed: int = 0) -> None:
        super().__init__()
        if operation == "concat" and embedding_dim % 2:
            raise ValueError(f"concat needs an even output width, got {embedding_dim}")
        self.feature_names = list(feature_names)
        self.embedding_dim = embedding_dim
        self.collisions, self.operation, self.oov_buckets = collisions, operation, oov_buckets
        self.storage_dim = embedding_dim // 2 if operation == "concat" else embedding_dim
        for i, vocab in enumerate(vocabularies):
            self.register_buffer(f"vocab_{i}", torch.as_tensor(np.asarray(vocab, dtype=np.int64)))
        self.register_buffer("oov_hash", torch.tensor([hash_params(seed, i) for i in range(len(feature_names))],
                                                      dtype=torch.int64).view(-1, 2))  # [F, 2]
        self.row_numbers = [len(v) + oov_buckets for v in vocabularies]  # R per feature
        self.composed = [f for f, r in enumerate(self.row_numbers) if r > max(threshold, collisions)]
        self.plain = [f for f in range(len(feature_names)) if f not in self.composed]
        self.quotient_rows = {f: -(-self.row_numbers[f] // collisions) for f in self.composed}
        # tables 2k and 2k + 1: quotient and remainder of the k-th composed feature
        sizes = [n for f in self.composed for n in (self.quotient_rows[f], collisions)]
        self.parts = FusedRowwiseAdagrad(sizes, self.storage_dim, learning_rate, seed) if sizes else None
        self.full = (FusedRowwiseAdagrad([self.row_numbers[f] for f in self.plain], embedding_dim, learning_rate,
                                         seed + 1) if self.plain else None)
        self._order = torch.argsort(torch.tensor(self.plain + self.composed))  # [F] output order

    @classmethod
    def from_config(cls, cfg: TableConfig, feature_names: list[str], seed: int, data_root: Path, where: str,
                    output_dim: int | None = None) -> "QRTable":
        """Build from a table block (``options``: :class:`QROptions`), reading vocabularies from the
        statistics; ``embedding_dim`` is each stored row's width (the output's half under concat)."""
        from recmem.data.stats import load_ids

        o = from_dict(QROptions, cfg.options, f"{where}.options")
        output = cfg.embedding_dim * (2 if o.operation == "concat" else 1)
        if output_dim is not None and output != output_dim:
            raise ConfigError(f"{where}.embedding_dim: {cfg.embedding_dim} gives qr ({o.operation}) rows of width "
                              f"{output}, the model's width is model.embedding_dim={output_dim}")
        if cfg.num_embeddings:
            raise ConfigError(f"{where}.num_embeddings: qr tables are sized by the statistics and options.collisions")
        vocabs = [load_ids(data_root, f, o.min_count) for f in feature_names]
        return cls(feature_names, vocabs, output, cfg.learning_rate, o.collisions, o.operation, o.threshold,
                   o.oov_buckets, seed)

    def _vocab(self, i: int) -> torch.Tensor:
        return getattr(self, f"vocab_{i}")

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Raw-ID KJT of ``feature_names`` -> [B, F, D]."""
        num, batch = len(self.feature_names), features.stride()
        rows = hashed_vocab_rows(features, [self._vocab(i) for i in range(num)], self.oov_hash, self.oov_buckets)
        segments = torch.split(rows, features.length_per_key())
        lengths = features.lengths().view(num, batch).long()  # [F, B]
        pooled = []
        if self.plain:
            indices = torch.cat([segments[f] for f in self.plain])
            offsets = _offsets(lengths[self.plain].flatten())
            pooled.append(self.full(indices, offsets))  # [B, F_plain, D]
        if self.composed:
            pooled.append(self._composed(segments, lengths))  # [B, F_comp, D]
        return torch.cat(pooled, dim=1)[:, self._order]

    def _composed(self, segments: tuple[torch.Tensor, ...], lengths: torch.Tensor) -> torch.Tensor:
        """Per-ID quotient and remainder rows (one bag per ID in the fused kernel), composed, then
        summed per bag -> [B, F_comp, D]."""
        counts = torch.tensor([len(segments[f]) for f in self.composed])  # [K] IDs per feature
        slots = max(int(counts.max()), 1)
        indices = torch.cat([part for f in self.composed for part in qr_rows(segments[f], self.collisions)])
        single = (torch.arange(slots)[None, :] < counts[:, None]).long()  # [K, slots] one ID per bag
        offsets = _offsets(single.repeat_interleave(2, dim=0).flatten())  # [2K * slots + 1]
        per_id = self.parts(indices, offsets)  # [slots, 2K, d]
        batch = lengths.shape[1]
        if slots == batch and bool((lengths[self.composed] == 1).all()):  # one ID per bag (Criteo): no pooling
            return self._combine(*per_id.view(batch, len(self.composed), 2, self.storage_dim).unbind(2))
        per_id = per_id.view(slots, len(self.composed), 2, self.storage_dim).transpose(0, 1)  # [K, slots, 2, d]
        emb = self._combine(*per_id[single.bool()].unbind(1))  # [N_comp, D], feature-major
        bags = torch.repeat_interleave(torch.arange(len(self.composed) * batch), lengths[self.composed].flatten())
        out = emb.new_zeros(len(self.composed) * batch, self.embedding_dim).index_add_(0, bags, emb)
        return out.view(len(self.composed), batch, self.embedding_dim).transpose(0, 1)  # [B, K, D]

    def _combine(self, quotient: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
        """Quotient and remainder rows [..., d] -> embeddings [..., D] by the table's operation."""
        if self.operation == "mult":
            return quotient * remainder
        if self.operation == "add":
            return quotient + remainder
        return torch.cat([quotient, remainder], dim=-1)

    def to_serving(self) -> list[ServingForm]:
        """Per feature a ``composed`` lookup: the vocabulary, the OOV hash, and the quotient then
        remainder rows (or the full rows of a small feature)."""
        out = []
        for f in range(len(self.feature_names)):
            mult, offset = (int(x) for x in self.oov_hash[f])
            if f in self.plain:
                rows = self.full.weights(self.plain.index(f)).detach().clone()
                params = [self.oov_buckets, mult, offset, 1, COMPOSE_OPS.index("single"), self.row_numbers[f]]
            else:
                k = self.composed.index(f)
                rows = torch.cat([self.parts.weights(2 * k), self.parts.weights(2 * k + 1)]).detach().clone()
                params = [self.oov_buckets, mult, offset, self.collisions, COMPOSE_OPS.index(self.operation),
                          self.quotient_rows[f]]
            out.append(ServingForm("composed", {"keys": self._vocab(f).clone(), "rows": rows,
                                                "params": torch.tensor(params, dtype=torch.int64)}))
        return out

    def memory_bytes(self) -> int:
        """Rows and Adagrad state of both kernels, vocabularies and OOV hashes (live tensors)."""
        kernels = sum(k.memory_bytes() for k in (self.parts, self.full) if k is not None)
        return kernels + tensor_bytes(*self.buffers(recurse=False))

    def stats(self) -> dict[str, float]:
        """Rows stored, composed features, and memory by part."""
        kernels = [k for k in (self.parts, self.full) if k is not None]
        return {"rows": float(sum(sum(k.rows) for k in kernels)), "composed_features": float(len(self.composed)),
                "row_bytes": float(sum(k.row_bytes() for k in kernels)),
                "optimizer_bytes": float(sum(k.optimizer_bytes() for k in kernels)),
                "memory_bytes": float(self.memory_bytes())}


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    """Bag lengths [n] -> offsets [n + 1] int64."""
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)]).long()
