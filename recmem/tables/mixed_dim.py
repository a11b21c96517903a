"""`mixed_dim`: mixed-dimension embeddings (Ginart et al., "Mixed Dimension Embeddings with
Application to Memory-Efficient Recommendation Systems", ISIT 2021).

Each feature keeps one row per ID as `full` does (its vocabulary from the statistics; rare and unseen
IDs share ``oov_buckets`` hashed rows), but its rows are as narrow as its size allows. Feature i of
n_i row numbers gets the width::

    d_i = max(1, floor(d0 * (n_min / n_i) ** alpha))      n_min: the smallest n_i the rule applies to

(alpha 0: every feature d0; larger alpha: large, sparse features narrower), optionally rounded down
to a power of two. Features of at most ``threshold`` row numbers keep d0 and take no part in n_min.
Instead of d0 a ``budget`` of row parameters may be given: d0 is then the largest width (at most
the model's) whose stored rows fit in it. A narrow feature's pooled rows [B, d_i] are mapped to the
model's width D by a learned bias-free linear map [D, d_i] (a dense parameter the trainer's dense
optimizer steps); a feature of width D needs none.

Storage: fbgemm's fused CPU kernel takes rows of a multiple of 4 floats only, so a planned width is
*stored* rounded up to the next multiple of 4 (widths 1..3 are stored as 4, 6 as 8): a fixed cost
the live memory accounting shows, chosen over padding kernels or a slower unfused path. Features of
one stored width share one fused kernel (one call each; power-of-two widths give at most a few).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recmem.config import NON_NEGATIVE, POSITIVE, ConfigError, TableConfig, checked, from_dict
from recmem.serving.lookup import COMPOSE_OPS
from recmem.tables.base import ServingForm, tensor_bytes
from recmem.tables.full import hashed_vocab_rows, oov_hashes
from recmem.tables.fused import FusedRowwiseAdagrad


@dataclass
class MixedDimOptions:
    """``options`` of a ``mixed_dim`` block (the block's ``embedding_dim`` is d0 unless ``budget``).

    Attributes:
        alpha: the temperature: widths shrink as ``(n_min / n_i) ** alpha``.
        power_of_two: round each width down to a power of two.
        budget: the most row parameters (sum over features of rows x *stored* width); d0 is then
            solved for and the block's ``embedding_dim`` only caps it. 0: no budget.
        threshold: features of at most this many row numbers keep d0.
        min_count: IDs seen fewer times than this in the training split own no row (as `full`).
        oov_buckets: hashed rows shared by rare and unseen IDs (1: one OOV row, as `full`).
    """

    alpha: float = checked(0.3, NON_NEGATIVE)
    power_of_two: bool = False
    budget: int = checked(0, NON_NEGATIVE)
    threshold: int = checked(0, NON_NEGATIVE)
    min_count: int = checked(1, NON_NEGATIVE)
    oov_buckets: int = checked(1, POSITIVE)


def mixed_widths(rows: list[int], base_dim: int, alpha: float, power_of_two: bool = False,
                 threshold: int = 0) -> list[int]:
    """Planned widths d_i of features of ``rows`` (n_i) row numbers, by the module's rule."""
    ruled = [n for n in rows if n > threshold]
    n_min = min(ruled) if ruled else 1
    widths = []
    for n in rows:
        # the 1e-9 keeps an exact product (d0 * 1.0) from flooring one below itself
        d = base_dim if n <= threshold else max(1, math.floor(base_dim * (n_min / n) ** alpha + 1e-9))
        widths.append(2 ** int(math.log2(d)) if power_of_two else d)
    return widths


def stored_width(width: int) -> int:
    """A planned width as stored: rounded up to a multiple of 4 (fbgemm's CPU kernel needs one)."""
    return -(-width // 4) * 4


def row_parameters(rows: list[int], widths: list[int]) -> int:
    """Row parameters held for ``widths``: sum of rows x stored width."""
    return sum(n * stored_width(d) for n, d in zip(rows, widths))


def budget_base_dim(rows: list[int], budget: int, alpha: float, power_of_two: bool, threshold: int,
                    max_dim: int) -> int:
    """The largest d0 in [1, ``max_dim``] whose widths hold at most ``budget`` row parameters.

    Raises:
        ValueError: even d0 = 1 needs more (the message gives that minimum).
    """
    def cost(d0: int) -> int:
        return row_parameters(rows, mixed_widths(rows, d0, alpha, power_of_two, threshold))

    if cost(1) > budget:
        raise ValueError(f"a budget of {budget:,} row parameters is below the least these features take "
                         f"({cost(1):,}, every width stored as 4)")
    low, high = 1, max_dim  # cost is non-decreasing in d0: bisect for the last d0 within the budget
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if cost(mid) <= budget else (low, mid - 1)
    return low


class MixedDimTable(torch.nn.Module):
    """One table per feature, of the feature's own width, projected to the model's width.

    Args:
        feature_names: the F features.
        vocabularies: per feature, the sorted unique raw int64 IDs that own a row.
        widths: per feature, its planned width d_i (stored rounded up to a multiple of 4).
        embedding_dim: D, the output width.
        learning_rate: row-wise Adagrad step size.
        oov_buckets: hashed rows after each vocabulary shared by the other IDs.
        seed: seeds the rows, the projections and the OOV hashes.
    """

    def __init__(self, feature_names: list[str], vocabularies: list[np.ndarray], widths: list[int],
                 embedding_dim: int, learning_rate: float, oov_buckets: int = 1, seed: int = 0) -> None:
        super().__init__()
        if len(widths) != len(feature_names) or min(widths, default=1) < 1 or max(widths, default=1) > embedding_dim:
            raise ValueError(f"widths {widths}: one per feature, each in [1, {embedding_dim}]")
        self.feature_names = list(feature_names)
        self.embedding_dim, self.widths, self.oov_buckets = embedding_dim, list(widths), oov_buckets
        for i, vocab in enumerate(vocabularies):
            self.register_buffer(f"vocab_{i}", torch.as_tensor(np.asarray(vocab, dtype=np.int64)))
        self.register_buffer("oov_hash", oov_hashes(seed, len(feature_names)) if oov_buckets > 1 else None)
        self.row_numbers = [len(v) + oov_buckets for v in vocabularies]
        stored = [stored_width(d) for d in widths]
        self.groups = [[f for f in range(len(widths)) if stored[f] == w] for w in sorted(set(stored))]
        self.kernels = torch.nn.ModuleList(
            FusedRowwiseAdagrad([self.row_numbers[f] for f in group], stored[group[0]], learning_rate, seed + g)
            for g, group in enumerate(self.groups))
        generator = torch.Generator().manual_seed(seed)
        self.projections = torch.nn.ParameterDict()
        for g, group in enumerate(self.groups):
            width = stored[group[0]]
            if width != embedding_dim:  # [F_g, D, w], uniform in +-1/sqrt(w): a projected row keeps its scale
                bound = 1.0 / math.sqrt(width)
                init = torch.empty(len(group), embedding_dim, width).uniform_(-bound, bound, generator=generator)
                self.projections[str(g)] = torch.nn.Parameter(init)
        self._order = torch.argsort(torch.tensor([f for group in self.groups for f in group]))  # [F] output order

    @classmethod
    def from_config(cls, cfg: TableConfig, feature_names: list[str], seed: int, data_root: Path, where: str,
                    output_dim: int | None = None) -> "MixedDimTable":
        """Build from a table block (``options``: :class:`MixedDimOptions`): vocabularies from the
        statistics, then the widths (``embedding_dim`` is d0, or d0's cap under a budget)."""
        from recmem.data.stats import load_ids

        o = from_dict(MixedDimOptions, cfg.options, f"{where}.options")
        output = output_dim or cfg.embedding_dim
        if cfg.embedding_dim > output:
            raise ConfigError(f"{where}.embedding_dim: d0={cfg.embedding_dim} is wider than the model's width "
                              f"model.embedding_dim={output}; mixed_dim widths project up to it, never down")
        if cfg.num_embeddings:
            raise ConfigError(f"{where}.num_embeddings: mixed_dim tables are sized by the statistics")
        vocabs = [load_ids(data_root, f, o.min_count) for f in feature_names]
        rows = [len(v) + o.oov_buckets for v in vocabs]
        base = cfg.embedding_dim
        if o.budget:
            try:
                base = budget_base_dim(rows, o.budget, o.alpha, o.power_of_two, o.threshold, cfg.embedding_dim)
            except ValueError as e:
                raise ConfigError(f"{where}.options.budget: {e}") from None
        widths = mixed_widths(rows, base, o.alpha, o.power_of_two, o.threshold)
        return cls(feature_names, vocabs, widths, output, cfg.learning_rate, o.oov_buckets, seed)

    def _vocab(self, i: int) -> torch.Tensor:
        return getattr(self, f"vocab_{i}")

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Raw-ID KJT of ``feature_names`` -> [B, F, D]."""
        num, batch = len(self.feature_names), features.stride()
        rows = hashed_vocab_rows(features, [self._vocab(i) for i in range(num)], self.oov_hash, self.oov_buckets)
        segments = torch.split(rows, features.length_per_key())
        lengths = features.lengths().view(num, batch).long()  # [F, B]
        pooled = []
        for g, (group, kernel) in enumerate(zip(self.groups, self.kernels)):
            indices = torch.cat([segments[f] for f in group])
            offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths[group].flatten(), 0)])
            narrow = kernel(indices, offsets)  # [B, F_g, w]
            projection = self.projections[str(g)] if str(g) in self.projections else None
            pooled.append(narrow if projection is None else torch.einsum("bfw,fdw->bfd", narrow, projection))
        return torch.cat(pooled, dim=1)[:, self._order]  # [B, F, D]

    def dense_parameters(self) -> list[torch.nn.Parameter]:
        """The projections (one [F_g, D, w] per stored width below D)."""
        return list(self.projections.values())

    def plan(self) -> dict[str, str]:
        """Each feature's planned and stored width, for the run's params and the printed plan."""
        return {f"width.{name}": f"{d} (stored {stored_width(d)})" if stored_width(d) != d else str(d)
                for name, d in zip(self.feature_names, self.widths)}

    def to_serving(self) -> list[ServingForm]:
        """Per feature: its vocabulary and rows (``keyed`` with the OOV row as default, or
        ``composed`` with hashed buckets, as `full`), and its ``projection`` [D, w] when w < D."""
        out = []
        for g, (group, kernel) in enumerate(zip(self.groups, self.kernels)):
            for j, f in enumerate(group):
                weights = kernel.weights(j).detach()  # [n + oov_buckets, w], the OOV rows last
                tensors = {"keys": self._vocab(f).clone()}
                if self.oov_hash is None:
                    tensors.update(rows=weights[:-1].clone(), default=weights[-1].clone())
                else:
                    mult, offset = (int(x) for x in self.oov_hash[f])
                    params = [self.oov_buckets, mult, offset, 1, COMPOSE_OPS.index("single"), len(weights)]
                    tensors.update(rows=weights.clone(), params=torch.tensor(params, dtype=torch.int64))
                if str(g) in self.projections:
                    tensors["projection"] = self.projections[str(g)][j].detach().clone()
                out.append((f, ServingForm("keyed" if self.oov_hash is None else "composed", tensors)))
        return [form for _, form in sorted(out, key=lambda pair: pair[0])]

    def memory_bytes(self) -> int:
        """Rows and Adagrad state of every kernel, projections, vocabularies and OOV hashes (live)."""
        own = [*self.projections.values(), *self.buffers(recurse=False)]
        return sum(k.memory_bytes() for k in self.kernels) + tensor_bytes(*own)

    def stats(self) -> dict[str, float]:
        """Rows stored, mean planned width, and memory by part."""
        return {"rows": float(sum(self.row_numbers)), "mean_width": float(np.mean(self.widths)),
                "row_bytes": float(sum(k.row_bytes() for k in self.kernels)),
                "optimizer_bytes": float(sum(k.optimizer_bytes() for k in self.kernels)),
                "projection_bytes": float(tensor_bytes(*self.projections.values())) if self.projections else 0.0,
                "memory_bytes": float(self.memory_bytes())}
