"""`full`: one row per ID of a known vocabulary, built from the training data's feature statistics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numba import njit
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recmem.config import TableConfig, from_dict
from recmem.serving.hashing import buckets
from recmem.tables.base import ServingForm, check_width
from recmem.tables.fused import FusedRowwiseAdagrad
from recmem.tables.sharded import RowKeys, RowRouter


@dataclass
class FullOptions:
    """Knobs of the `full` kind.

    Attributes:
        min_count: IDs seen fewer times than this in the training split share one out-of-vocabulary row.
    """

    min_count: int = 1


class FullTable(torch.nn.Module):
    """Each feature's vocabulary (sorted raw IDs) maps to rows 0..n-1; unknown IDs share row n.

    Args:
        feature_names: the F features, one table each.
        vocabularies: per feature, the sorted unique raw int64 IDs that own a row.
        embedding_dim: D.
        learning_rate: row-wise Adagrad step size.
        seed: seeds the initial rows.
    """

    def __init__(
        self,
        feature_names: list[str],
        vocabularies: list[np.ndarray],
        embedding_dim: int,
        learning_rate: float,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.feature_names = list(feature_names)
        self.embedding_dim = embedding_dim
        for i, vocab in enumerate(vocabularies):
            self.register_buffer(f"vocab_{i}", torch.as_tensor(np.asarray(vocab, dtype=np.int64)))
        rows = [len(v) + 1 for v in vocabularies]  # + the out-of-vocabulary row
        self.rows = FusedRowwiseAdagrad(rows, embedding_dim, learning_rate, seed)

    @classmethod
    def from_config(cls, cfg: TableConfig, feature_names: list[str], seed: int, data_root: Path, where: str,
                    output_dim: int | None = None):
        """Build from a table block, reading vocabularies from ``data_root``'s statistics."""
        from recmem.data.stats import load_ids

        check_width(cfg, where, output_dim)
        options = from_dict(FullOptions, cfg.options, f"{where}.options")
        vocabs = [load_ids(data_root, f, options.min_count) for f in feature_names]
        return cls(feature_names, vocabs, cfg.embedding_dim, cfg.learning_rate, seed)

    @classmethod
    def row_keys_from_config(cls, cfg: TableConfig, feature_names: list[str], seed: int, data_root: Path,
                             where: str) -> RowKeys:
        """How the distributed paths split this kind (``recmem/tables/sharded.py``): by vocabulary row.

        Every worker keeps the vocabularies (8 bytes per ID) to turn IDs into rows; the rows
        themselves (``4 * (D + 1)`` bytes each with their Adagrad state) are split over the workers.
        """
        from recmem.data.stats import load_ids

        options = from_dict(FullOptions, cfg.options, f"{where}.options")
        vocabs = [load_ids(data_root, f, options.min_count) for f in feature_names]
        return RowKeys(router=VocabRouter(vocabs), rows=[len(v) + 1 for v in vocabs])

    def _vocab(self, i: int) -> torch.Tensor:
        return getattr(self, f"vocab_{i}")

    def remap(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Raw IDs -> table-local rows [N]; IDs outside the vocabulary get the OOV row."""
        return vocab_rows(features, [self._vocab(i) for i in range(len(self.feature_names))])

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Raw-ID KJT of ``feature_names`` -> [B, F, D]."""
        return self.rows(self.remap(features), features.offsets())

    def to_serving(self) -> list[ServingForm]:
        """Per feature: its vocabulary and rows, the out-of-vocabulary row as the default."""
        out = []
        for i in range(len(self.feature_names)):
            weights = self.rows.weights(i).detach()  # [n + 1, D], the OOV row last
            out.append(ServingForm("keyed", {"keys": self._vocab(i).clone(), "rows": weights[:-1].clone(),
                                             "default": weights[-1].clone()}))
        return out

    def memory_bytes(self) -> int:
        """Rows + Adagrad state + the vocabularies (8 bytes per ID)."""
        vocab = sum(self._vocab(i).numel() * 8 for i in range(len(self.feature_names)))
        return self.rows.memory_bytes() + vocab

    def stats(self) -> dict[str, float]:
        """Rows per table in total."""
        return {"rows": float(sum(self.rows.rows))}


def vocab_rows(features: KeyedJaggedTensor, vocabs: list[torch.Tensor]) -> torch.Tensor:
    """Raw IDs -> rows [N]: an ID's position in its feature's sorted vocabulary, else ``len(vocab)``."""
    values = features.values().contiguous()
    rows = torch.empty_like(values)
    start = 0
    for vocab, n in zip(vocabs, features.length_per_key()):
        _vocab_positions(vocab.numpy(), values[start : start + n].numpy(), rows[start : start + n].numpy())
        start += n
    return rows


def hashed_vocab_rows(features: KeyedJaggedTensor, vocabs: list[torch.Tensor], oov_hash: torch.Tensor,
                      oov_buckets: int) -> torch.Tensor:
    """Raw IDs -> rows [N]: the vocabulary position, else ``len(vocab) + bucket`` where ``bucket``
    hashes the ID into ``oov_buckets`` shared rows (``oov_hash`` [F, 2]: each feature's hash
    multiplier and offset, ``recmem.serving.hashing``); one bucket is :func:`vocab_rows`."""
    rows = vocab_rows(features, vocabs)
    if oov_buckets == 1:
        return rows
    values, start = features.values(), 0
    for f, (vocab, n) in enumerate(zip(vocabs, features.length_per_key())):
        part, ids = rows[start:start + n], values[start:start + n]  # views: written in place
        unseen = part == len(vocab)
        mult, offset = (int(x) for x in oov_hash[f])
        part[unseen] = len(vocab) + buckets(ids[unseen], mult, offset, oov_buckets)
        start += n
    return rows


_LOCKSTEP = 32
"""IDs whose binary searches advance together (see :func:`_vocab_positions`)."""


@njit(cache=True, nogil=True)
def _vocab_positions(vocab: np.ndarray, ids: np.ndarray, out: np.ndarray) -> None:
    """``out[i]`` = position of ``ids[i]`` in the sorted ``vocab``, or ``len(vocab)`` when absent.

    A large vocabulary does not fit in cache, so each step of a binary search is a cache miss. The
    searches of ``_LOCKSTEP`` IDs advance one level at a time with a select instead of a branch, so
    the CPU issues the group's loads together and their misses overlap: 2-2.5x faster than
    ``torch.searchsorted`` plus a gather on 1M-ID vocabularies (measured, one thread).
    """
    n = len(vocab)
    base = np.zeros(_LOCKSTEP, np.int64)
    for start in range(0, len(ids), _LOCKSTEP):
        group = min(_LOCKSTEP, len(ids) - start)
        base[:group] = 0
        size = n
        while size > 1:  # invariant: the lower bound of each ID lies in [base, base + size]
            half = size // 2
            for q in range(group):
                probe = base[q] + half
                base[q] = probe if vocab[probe] < ids[start + q] else base[q]
            size -= half
        for q in range(group):
            x = ids[start + q]
            p = base[q] + (1 if n > 0 and vocab[base[q]] < x else 0)
            out[start + q] = p if p < n and vocab[p] == x else n


class VocabRouter(RowRouter):
    """Routes a sharded `full` table: raw IDs -> vocabulary rows, row k owned by worker ``k mod W``.

    Args:
        vocabularies: per feature, the sorted unique raw int64 IDs that own a row.
    """

    def __init__(self, vocabularies: list[np.ndarray]) -> None:
        super().__init__()
        self.num_features = len(vocabularies)
        for i, vocab in enumerate(vocabularies):
            self.register_buffer(f"vocab_{i}", torch.as_tensor(np.asarray(vocab, dtype=np.int64)))

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Raw-ID KJT -> [N] global rows (the OOV row is ``len(vocab)``)."""
        return vocab_rows(features, [getattr(self, f"vocab_{i}") for i in range(self.num_features)])
