"""Each table kind at a memory ratio of `full`, and how it trains: the frontier's registry.

``FRONTIER_KINDS`` maps a kind's name in the frontier to a :class:`FrontierKind`: ``size(budget)``
picks the kind's table blocks whose *measured* bytes (the built tables' ``memory_bytes()``) come
closest to ``budget.target`` = full's measured bytes / ratio from below, and ``train(cfg)`` trains the
job it makes and returns what the point reports. Most kinds train with ``recmem train``'s
single-process loop (:func:`train_plain`); a kind trained in phases (``optembed``: supernet, search,
retrain) brings its own ``train`` and adds one line here.

Every size function searches one knob, the other knobs following fixed rules stated beside it; each
candidate is built and measured (cached by its blocks), never computed from the config. A kind whose
smallest candidate is still above the target says so (``Sizing.blocks`` None, the reason in
``note``): nothing falls back to a larger table.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recmem.bench.frontier_optembed import size_optembed, train_optembed
from recmem.config import Config, TableConfig
from recmem.tables import build_tables

OVERSHOOT = 1.05
"""A point's measured bytes may exceed its target by this factor (knobs are integers)."""


@dataclass
class Budget:
    """What sizing needs: the base job, full's measured bytes, the ratio and the byte target.

    Attributes:
        measure: blocks -> bytes of the built tables (``TableCollection.memory_bytes()``), cached.
        multihash: `multihash`'s k hashes and how their rows combine (``sum`` or ``concat``); 4
            concatenated by default: on synthetic-2m-ids the best validation AUC at each ratio against
            2 summed, 2 concatenated and (at 1x, 64x) 3 summed (benchmarks/frontier/synthetic-2m-ids.md).
    """

    cfg: Config
    full_bytes: int
    ratio: float
    measure: Callable[[list[TableConfig]], int]
    multihash: tuple[int, str] = (4, "concat")

    @property
    def target(self) -> int:
        """full's bytes / ratio."""
        return int(self.full_bytes / self.ratio)

    @property
    def base(self) -> TableConfig:
        """The config's first block: the width and learning rate every kind starts from."""
        return self.cfg.model.tables[0]

    def block(self, kind: str, **fields) -> TableConfig:
        """A block of ``kind`` over every feature, with the base block's width and learning rate."""
        return TableConfig(kind=kind, embedding_dim=self.base.embedding_dim, learning_rate=self.base.learning_rate,
                           **fields)

    def counts(self) -> list[np.ndarray]:
        """Per sparse feature, the training split's count of each distinct ID."""
        from recmem.data.stats import load_counts

        return [load_counts(Path(self.cfg.data.root), f)[1] for f in self.cfg.data.schema.sparse]


@dataclass
class Sizing:
    """A kind at one ratio: its blocks (None: the ratio is out of its reach), their measured bytes,
    and how they were chosen (or why none fits)."""

    blocks: list[TableConfig] | None
    bytes: int
    note: str


@dataclass
class PointRun:
    """What training one point gives: the final validation's metrics (``tables/memory_bytes`` among
    them, measured from the trained tables), steps taken and training samples/s."""

    metrics: dict[str, float]
    steps: int
    samples_per_second: float


@dataclass
class FrontierKind:
    """A kind in the frontier: ``size(budget) -> Sizing`` and ``train(cfg) -> PointRun``."""

    size: Callable[[Budget], Sizing]
    train: Callable[[Config], PointRun]


def train_plain(cfg: Config) -> PointRun:
    """``recmem train``'s single-process loop on ``cfg``."""
    from recmem.train.local import train_local

    result = train_local(cfg)
    return PointRun(dict(result.metrics), result.step, result.samples_per_second)


def _search(make: Callable[[int], list[TableConfig]], budget: Budget, low: int, high: int,
            growing: bool) -> tuple[int, int] | None:
    """The knob in [low, high] whose blocks' measured bytes are the most within the target: the
    largest knob when bytes grow with it, else the smallest; None when none is within it."""
    limit = budget.target * OVERSHOOT
    fits = lambda x: budget.measure(make(x)) <= limit  # noqa: E731
    edge = low if growing else high
    if not fits(edge):
        return None
    while low < high:  # bisect over the monotone knob
        if growing:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if fits(mid) else (low, mid - 1)
        else:
            mid = (low + high) // 2
            low, high = (low, mid) if fits(mid) else (mid + 1, high)
    return low, budget.measure(make(low))


def _unreachable(budget: Budget, smallest: list[TableConfig], what: str) -> Sizing:
    least = budget.measure(smallest)
    return Sizing(None, least, f"cannot reach {budget.ratio:g}x: its smallest tables ({what}) take {least:,} bytes, "
                               f"{budget.full_bytes / least:.1f}x smaller than full")


def size_full(budget: Budget) -> Sizing:
    """The reference, the config's own `full` block (the frontier runs it at 1x only)."""
    blocks = copy.deepcopy(budget.cfg.model.tables)
    return Sizing(blocks, budget.measure(blocks), "the reference: " + (
        ", ".join(f"{k}={v}" for k, v in blocks[0].options.items()) or "one row per ID"))


SMALL_FEATURE = 200
"""Features with at most this many distinct training IDs keep a `full` table in `hash`, `qr` and
`multihash` alike (the QR paper leaves tables under a threshold uncompressed; ``QROptions``'s
default threshold): compressing them saves next to nothing and a 3-ID field would lose its rows."""

PER = 10_000
"""The unit of the row knob of `hash` and `multihash`: ``s`` rows per :data:`PER` IDs."""


def _split(budget: Budget) -> tuple[list[TableConfig], list[tuple[str, int]]]:
    """The `full` block of the features of at most :data:`SMALL_FEATURE` distinct training IDs (no
    block when there are none) and (name, n distinct training IDs) of each of the others."""
    sized = list(zip(budget.cfg.data.schema.sparse, (len(c) for c in budget.counts())))
    small = [f for f, n in sized if n <= SMALL_FEATURE]
    return ([budget.block("full", feature_names=small)] if small else []), [(f, n) for f, n in sized
                                                                           if n > SMALL_FEATURE]


def _small_note(full: list[TableConfig]) -> str:
    return f"; {len(full[0].feature_names)} features of <= {SMALL_FEATURE} IDs full" if full else ""


def size_hash(budget: Budget) -> Sizing:
    """Each feature of n > :data:`SMALL_FEATURE` IDs gets ``ceil(n s / PER)`` rows (ID mod rows, one
    block per feature), ``s`` the most that fit: about n / r rows at ratio r (a little more: `full`
    pays 8 bytes per ID for its vocabulary, hash none)."""
    full, large = _split(budget)
    make = lambda s: full + [budget.block("hash", feature_names=[f], num_embeddings=_rows(n, s))  # noqa: E731
                             for f, n in large]
    found = _search(make, budget, 1, 2 * PER, growing=True)
    if found is None:
        return _unreachable(budget, make(1), f"n / {PER} rows per feature")
    return Sizing(make(found[0]), found[1], f"n x {found[0] / PER:.4g} rows per feature (ID mod rows)"
                                            + _small_note(full))


def _rows(n: int, s: int) -> int:
    return max(1, math.ceil(n * s / PER))


def size_multihash(budget: Budget) -> Sizing:
    """k hashes of the raw ID (``budget.multihash``: k and ``sum`` or ``concat``) into ``ceil(n s /
    PER)`` shared rows per feature of n > :data:`SMALL_FEATURE` IDs (``options.compression`` PER / s),
    ``s`` the most that fit: under ``sum`` rows of width D, the same rows as `hash` at the same bytes;
    under ``concat`` rows of width D / k, so up to k times the rows (each row's Adagrad state is one
    float whatever its width: 3.4 times at D = 16, k = 4)."""
    full, large = _split(budget)
    names = [f for f, _ in large]
    k, combine = budget.multihash
    width = budget.base.embedding_dim // k if combine == "concat" else budget.base.embedding_dim
    make = lambda s: full + [dataclasses.replace(budget.block(  # noqa: E731
        "multihash", feature_names=names, options={"num_hashes": k, "combine": combine, "compression": PER / s}),
        embedding_dim=width)]
    found = _search(make, budget, 1, 2 * PER * (k if combine == "concat" else 1), growing=True)
    if found is None:
        return _unreachable(budget, make(1), f"n / {PER} rows per feature")
    return Sizing(make(found[0]), found[1], f"num_hashes={k}, combine={combine}, n x {found[0] / PER:.4g} rows "
                                            "per feature" + _small_note(full))


def size_qr(budget: Budget) -> Sizing:
    """Quotient-remainder (mult) as in the paper: a feature of R row numbers keeps a quotient table
    of ceil(R / c) rows and a remainder table of c rows, one c for every feature of n >
    :data:`SMALL_FEATURE` IDs, the smallest that fits. The row number is the ID's index (the
    vocabulary, 8 bytes per ID, R = n + 1 OOV row) where that fits at some c; else, as no
    vocabulary fits below ~9x (a vocabulary key costs 1/9.5 of `full`'s bytes per ID), each ID is
    hashed into R = n row numbers (no vocabulary: ``min_count`` above every count, ``oov_buckets``
    n, one block per feature). No frequency decides anything: no ``min_count`` tail that `hash`
    does not get. c is searched up to the square root of the largest R (R / c + c is least there)."""
    full, large = _split(budget)
    names = [f for f, _ in large]
    above = int(max(int(c.max()) for c in budget.counts())) + 1  # no ID is seen this often: no vocabulary

    def indexed(c: int) -> list[TableConfig]:
        return full + [budget.block("qr", feature_names=names, options={"collisions": c, "threshold": 0})]

    def hashed(c: int) -> list[TableConfig]:
        return full + [budget.block("qr", feature_names=[f], options={
            "collisions": c, "threshold": 0, "min_count": above, "oov_buckets": n}) for f, n in large]

    widest = math.isqrt(max((n for _, n in large), default=1) + 1) + 1
    for make, how in ((indexed, "row number = the ID's index (vocabulary)"),
                      (hashed, "row number = hash(ID) mod n, no vocabulary")):
        found = _search(make, budget, 1, widest, growing=False)
        if found is not None:
            return Sizing(make(found[0]), found[1], f"collisions={found[0]}, {how}" + _small_note(full))
    return _unreachable(budget, hashed(widest), f"no vocabulary, {widest} collisions")


def _tail_buckets(budget: Budget, row_bytes: int) -> int:
    """Hashed OOV rows per feature for frequency-aware kinds: a quarter of the target's bytes."""
    return max(1, budget.target // (4 * len(budget.cfg.data.schema.sparse) * row_bytes))


def size_full_buckets(budget: Budget) -> Sizing:
    """Frequency-aware `full`: a quarter of the bytes to hashed tail rows (``oov_buckets``), the
    rest to the IDs seen at least ``min_count`` times, the smallest ``min_count`` that fits."""
    buckets = _tail_buckets(budget, 4 * (budget.base.embedding_dim + 1))
    make = lambda m: [budget.block("full", options={"min_count": m, "oov_buckets": buckets})]  # noqa: E731
    top = int(max(c.max() for c in budget.counts())) + 1  # above every count: no ID owns a row
    found = _search(make, budget, 1, top, growing=False)
    if found is None:
        return _unreachable(budget, make(top), f"{buckets} hashed rows per feature")
    return Sizing(make(found[0]), found[1], f"min_count={found[0]}, oov_buckets={buckets}")


def _min_count_ladder(budget: Budget) -> list[int]:
    top = int(max(c.max() for c in budget.counts())) + 1
    return sorted({1, *(2 ** i for i in range(int(np.log2(top)) + 1)), top})


MIXED_ALPHA = 0.3
"""mixed_dim's temperature in the frontier (Ginart et al. find 0.2-0.3 best on Criteo)."""


def size_mixed_dim(budget: Budget) -> Sizing:
    """Mixed dimensions (alpha :data:`MIXED_ALPHA`): the smallest ``min_count`` of 1, 2, 4, ...
    whose tables fit at d0 = 1 (every width stored as 4), a quarter of the bytes to hashed tail rows
    when IDs are dropped, then the largest d0 (the block's ``embedding_dim``, at most the model's)."""
    width = budget.base.embedding_dim

    def make_with(m: int) -> Callable[[int], list[TableConfig]]:
        buckets = _tail_buckets(budget, 4 * 5) if m > 1 else 1
        options = {"alpha": MIXED_ALPHA, "min_count": m, "oov_buckets": buckets}
        return lambda d0: [dataclasses.replace(budget.block("mixed_dim", options=options), embedding_dim=d0)]

    for m in _min_count_ladder(budget):
        found = _search(make_with(m), budget, 1, width, growing=True)
        if found is not None:
            blocks = make_with(m)(found[0])
            opts = ", ".join(f"{k}={v}" for k, v in blocks[0].options.items())
            return Sizing(blocks, found[1], f"d0={found[0]}, {opts}")
    return _unreachable(budget, make_with(_min_count_ladder(budget)[-1])(1), "no vocabulary, widths 4")


FRONTIER_KINDS: dict[str, FrontierKind] = {
    "full": FrontierKind(size_full, train_plain),
    "hash": FrontierKind(size_hash, train_plain),
    "qr": FrontierKind(size_qr, train_plain),
    "mixed_dim": FrontierKind(size_mixed_dim, train_plain),
    "optembed": FrontierKind(size_optembed, train_optembed),
    "multihash": FrontierKind(size_multihash, train_plain),
    "full_buckets": FrontierKind(size_full_buckets, train_plain),
}
"""Kinds in the frontier, in its table's order. ``optembed`` brings its own size and train (three
phases, ``frontier_optembed.py``)."""

WANTED_KINDS = ("full", "hash", "qr", "mixed_dim", "optembed", "multihash", "full_buckets")
"""The kinds issue 11 asks the frontier for; one without an entry shows as such in the table."""


def measurer(cfg: Config) -> Callable[[list[TableConfig]], int]:
    """blocks -> measured bytes of the tables they build on ``cfg``'s data (each distinct blocks once)."""
    cache: dict[str, int] = {}

    def measure(blocks: list[TableConfig]) -> int:
        key = repr(blocks)
        if key not in cache:
            model = copy.deepcopy(cfg.model)
            tables = build_tables(blocks, cfg.data.schema.sparse, Path(cfg.data.root), cfg.seed,
                                  output_dim=model.embedding_dim or model.tables[0].embedding_dim)
            cache[key] = tables.memory_bytes()
        return cache[key]

    return measure
