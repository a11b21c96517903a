"""`multihash`: Bloom embeddings, spaCy's multi-hash embeddings (Serrà and Karatzoglou, "Getting Deep
Recommenders Fit: Bloom Embeddings for Sparse Binary Input/Output Networks", RecSys 2017; Svenstrup
et al., "Hash Embeddings for Efficient Word Representations", NeurIPS 2017; spaCy's ``HashEmbed``).

Each feature keeps one shared table of n rows; k independent hashes of the raw ID pick k of its rows
(``recmem.serving.hashing``: the same buckets in every process and in a server), and the ID's
embedding combines them::

    sum      e(id) = W[h_1(id)] + ... + W[h_k(id)]           rows of width D
    concat   e(id) = [W[h_1(id)], ..., W[h_k(id)]]           rows of width D / k

Two IDs share the whole embedding only when all k hashes collide (about n^-k of pairs against
n^-1 for the hashing trick), so the same rows tell far more IDs apart. Pooling is a sum, so a bag of
L IDs under ``sum`` is one bag of k * L rows in the fused kernel; under ``concat`` hash j of every
bag is a bag of its own (a batch k times as large) and the k pooled parts are laid side by side.

The table size is ``num_embeddings`` rows per feature, or ``options.compression``: each feature gets
ceil(distinct IDs / compression) rows from the training split's statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recmem.config import NON_NEGATIVE, POSITIVE, ConfigError, TableConfig, checked, from_dict
from recmem.serving.hashing import buckets, hash_params
from recmem.tables.base import ServingForm, tensor_bytes
from recmem.tables.fused import FusedRowwiseAdagrad

Combine = Literal["sum", "concat"]
COMBINES = ("sum", "concat")
"""Index of each combination in a serving form's ``params``."""


@dataclass
class MultiHashOptions:
    """``options`` of a ``multihash`` table block.

    Attributes:
        num_hashes: k, rows per ID.
        combine: ``sum`` (rows of the block's ``embedding_dim``) or ``concat`` (rows of the block's
            ``embedding_dim``, the output k times as wide).
        compression: with ``num_embeddings`` 0: rows per feature = ceil(distinct IDs / compression).
    """

    num_hashes: int = checked(2, POSITIVE)
    combine: Combine = "sum"
    compression: float = checked(0.0, NON_NEGATIVE)


class MultiHashTable(torch.nn.Module):
    """k hashed rows of one shared table per feature, summed or concatenated, in one fused kernel.

    Args:
        feature_names: the F features.
        rows: rows of each feature's shared table.
        embedding_dim: D, the output width (k times the stored width under concat).
        learning_rate: row-wise Adagrad step size.
        num_hashes: k.
        combine: ``sum`` or ``concat``.
        seed: seeds the initial rows and the hashes.
    """

    def __init__(self, feature_names: list[str], rows: list[int], embedding_dim: int, learning_rate: float,
                 num_hashes: int = 2, combine: Combine = "sum", seed: int = 0) -> None:
        super().__init__()
        if combine == "concat" and embedding_dim % num_hashes:
            raise ValueError(f"concat of {num_hashes} rows needs an output width divisible by it, got {embedding_dim}")
        self.storage_dim = embedding_dim // num_hashes if combine == "concat" else embedding_dim
        if self.storage_dim % 4:  # fbgemm's CPU kernel takes rows of a multiple of 4 floats
            raise ValueError(f"rows of width {self.storage_dim}: the fused kernel needs a multiple of 4")
        self.feature_names = list(feature_names)
        self.embedding_dim, self.num_hashes, self.combine = embedding_dim, num_hashes, combine
        params = [hash_params(seed, f * num_hashes + j) for f in range(len(feature_names)) for j in range(num_hashes)]
        self.register_buffer("hashes", torch.tensor(params, dtype=torch.int64).view(len(feature_names), num_hashes, 2))
        self.rows = FusedRowwiseAdagrad(rows, self.storage_dim, learning_rate, seed)

    @classmethod
    def from_config(cls, cfg: TableConfig, feature_names: list[str], seed: int, data_root: Path, where: str,
                    output_dim: int | None = None) -> "MultiHashTable":
        """Build from a table block (``options``: :class:`MultiHashOptions`); ``embedding_dim`` is the
        stored rows' width, ``num_embeddings`` the rows per feature (or 0 and ``options.compression``)."""
        from recmem.data.stats import load_ids

        o = from_dict(MultiHashOptions, cfg.options, f"{where}.options")
        output = cfg.embedding_dim * (o.num_hashes if o.combine == "concat" else 1)
        if output_dim is not None and output != output_dim:
            raise ConfigError(f"{where}.embedding_dim: {cfg.embedding_dim} gives multihash ({o.combine} of "
                              f"{o.num_hashes}) rows of width {output}, the model's width is "
                              f"model.embedding_dim={output_dim}")
        if (cfg.num_embeddings > 0) == (o.compression > 0):
            raise ConfigError(f"{where}.num_embeddings: a multihash table needs either num_embeddings (rows per "
                              "feature) or options.compression (rows = distinct IDs / compression), exactly one")
        rows = ([cfg.num_embeddings] * len(feature_names) if cfg.num_embeddings else
                [max(1, math.ceil(len(load_ids(data_root, f, 1)) / o.compression)) for f in feature_names])
        return cls(feature_names, rows, output, cfg.learning_rate, o.num_hashes, o.combine, seed)

    def slots(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Raw-ID KJT -> [N, k] int64: the k table-local rows of each ID."""
        values, out, start = features.values(), [], 0
        params = self.hashes.tolist()  # [F][k][2], read once (a checkpoint may have replaced the buffer)
        for f, n in enumerate(features.length_per_key()):
            ids = values[start:start + n]
            out.append(torch.stack([buckets(ids, m, o, self.rows.rows[f]) for m, o in params[f]], dim=1))  # [n_f, k]
            start += n
        return torch.cat(out) if out else values.new_zeros(0, self.num_hashes)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Raw-ID KJT of ``feature_names`` -> [B, F, D]."""
        slots, k = self.slots(features), self.num_hashes
        if self.combine == "sum":  # each ID's k rows stay inside its bag: a bag of k * L rows
            return self.rows(slots.flatten(), features.offsets().long() * k)
        num, batch = len(self.feature_names), features.stride()
        lengths = features.lengths().view(num, 1, batch).long().expand(num, k, batch)  # [F, k, B]
        per_feature = torch.split(slots, features.length_per_key())
        indices = torch.cat([part.T.flatten() for part in per_feature])  # per feature: hash-major
        offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths.flatten(), 0)])
        pooled = self.rows(indices, offsets)  # [k * B, F, d], bag j * B + b
        return pooled.view(k, batch, num, self.storage_dim).permute(1, 2, 0, 3).reshape(batch, num, -1)  # [B, F, D]

    def to_serving(self) -> list[ServingForm]:
        """Per feature a ``multihash`` lookup (``recmem/serving/hashed.py``): its rows and hashes."""
        out = []
        for f in range(len(self.feature_names)):
            params = [self.num_hashes, COMBINES.index(self.combine), *self.hashes[f].flatten().tolist()]
            out.append(ServingForm("multihash", {"rows": self.rows.weights(f).detach().clone(),
                                                 "params": torch.tensor(params, dtype=torch.int64)}))
        return out

    def memory_bytes(self) -> int:
        """Rows and Adagrad state (fbgemm's buffers) and the hash parameters (live tensors)."""
        return self.rows.memory_bytes() + tensor_bytes(self.hashes)

    def stats(self) -> dict[str, float]:
        """Rows stored and memory by part."""
        return {"rows": float(sum(self.rows.rows)), "row_bytes": float(self.rows.row_bytes()),
                "optimizer_bytes": float(self.rows.optimizer_bytes()), "memory_bytes": float(self.memory_bytes())}
