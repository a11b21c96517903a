"""Speed of the collisionless ID -> row map against a Python dict and torchrec's MCH, on one core.

Each feature's IDs are random 64-bit values drawn by a Zipf law (exponent ``zipf``) over a universe of
twice its live rows: the first half is pre-loaded (live), the tail brings new IDs as a real log does.
Three implementations do the same work on the same batches:

- ``find``: look up IDs of the live half (evaluation); nothing changes.
- ``find_or_insert``: training lookups with admission ``min_count = 2``: known IDs are touched (data
  time, count), unknown IDs are counted by the filter and get a row on their second sighting.

recmem's map is :class:`~recmem.tables.slotmap.SlotMap` (numba) writing new rows' initial values into
flat [R, 16] storage. The dict peer keeps one dict per feature (ID -> row) plus an exact Counter for
admission. torchrec's ``MCHManagedCollisionModule`` (one per feature, unsharded, LFU, coalescing its
history every batch) does its remap for ``find``, and profile + LFU update + remap for
``find_or_insert`` with a threshold of 2 sightings within the batch (the closest it has to admission).
Peers run fewer batches (they are slow); every figure is IDs over seconds, on the calling thread's
torch settings (``jobs/bench_collisionless.py`` pins one thread).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from recmem.tables.slotmap import ArrayRows, SlotMap

INIT_BOUND = 1e-3
OPERATIONS = ("find", "find_or_insert")

Say = Callable[[str], None]
"""Where progress lines go (``print`` in the job)."""


@dataclass(frozen=True)
class MapOptions:
    """Sizes of one run.

    Attributes:
        rows: live rows over all features (split evenly, rounded up).
        features: F.
        batch: IDs per feature per batch (B).
        dim: row width of recmem's storage.
        zipf: exponent of the ID popularity law.
        batches: timed batches for recmem.
        peer_batches: timed batches for the peers.
        seed: seeds the IDs and the batches.
    """

    rows: int = 10_000_000
    features: int = 26
    batch: int = 4096
    dim: int = 16
    zipf: float = 1.05
    batches: int = 40
    peer_batches: int = 4
    seed: int = 0


def zipf_batches(rng: np.random.Generator, universe: int, exponent: float, features: int, batch: int,
                 count: int, live: int) -> list[np.ndarray]:
    """``count`` batches of feature-major ranks [features * batch], drawn by Zipf over ``universe``.

    ``live`` > 0 keeps only ranks below it (the find workload reads existing IDs only).
    """
    weights = 1.0 / np.arange(1, universe + 1, dtype=np.float64) ** exponent
    cdf = np.cumsum(weights) / weights.sum()
    if live:
        cdf = cdf[:live] / cdf[live - 1]
    ranks = np.searchsorted(cdf, rng.random((count, features * batch)))
    return [np.minimum(r, len(cdf) - 1) for r in ranks]


def to_ids(ranks: np.ndarray, id_table: np.ndarray, batch: int) -> np.ndarray:
    """Ranks [F * B] -> raw IDs [F * B]: feature f's rank r is id_table[f, r]."""
    feature = np.repeat(np.arange(id_table.shape[0]), batch)
    return id_table[feature, ranks]


class DictMap:
    """The plain-Python peer: per feature a dict ID -> row, an exact Counter, row time and count lists.

    Args:
        id_table: [F, U] the IDs of every feature; the first ``live`` of each are pre-loaded.
        live: rows pre-loaded per feature.
        capacity: rows per feature.
        min_count: sightings before an ID gets a row.
    """

    def __init__(self, id_table: np.ndarray, live: int, capacity: int, min_count: int) -> None:
        self.maps = [dict(zip(ids[:live].tolist(), range(live))) for ids in id_table]
        self.counts: list[dict[int, int]] = [{} for _ in id_table]
        self.time = [[0] * capacity for _ in id_table]
        self.hits = [[1] * capacity for _ in id_table]
        self.next_row = [live] * len(id_table)
        self.min_count = min_count

    def find(self, values: np.ndarray, batch: int) -> list[list[int]]:
        """Feature-major IDs [F * B] -> per feature B rows (-1: no row)."""
        return [[m.get(v, -1) for v in values[f * batch:(f + 1) * batch].tolist()] for f, m in enumerate(self.maps)]

    def assign(self, values: np.ndarray, batch: int, now: int) -> list[list[int]]:
        """Find-or-insert with admission at data time ``now``; rows as :meth:`find` returns them."""
        out = []
        for f, m in enumerate(self.maps):
            counts, times, hits, rows = self.counts[f], self.time[f], self.hits[f], []
            for v in values[f * batch:(f + 1) * batch].tolist():
                r = m.get(v)
                if r is None:
                    seen = counts.get(v, 0) + 1
                    if seen < self.min_count:
                        counts[v] = seen
                        rows.append(-1)
                        continue
                    counts.pop(v, None)
                    r = m[v] = self.next_row[f]
                    self.next_row[f] += 1
                    hits[r] = 0
                times[r] = now
                hits[r] += 1
                rows.append(r)
            out.append(rows)
        return out


def mch_modules(id_table: np.ndarray, live: int, capacity: int, interval: int) -> list[torch.nn.Module]:
    """One torchrec MCH module per feature, pre-loaded with the live IDs (sorted, as it keeps them).

    ``interval``: batches between two coalescings of its history (LFU update, new IDs get slots).
    """
    from torchrec.modules.mc_modules import LFU_EvictionPolicy, MCHManagedCollisionModule

    def at_least_two(counts: torch.Tensor) -> tuple[torch.Tensor, float]:
        return counts >= 2, 2.0

    modules = []
    for ids in id_table:
        m = MCHManagedCollisionModule(
            zch_size=capacity, device=torch.device("cpu"), eviction_interval=interval,
            eviction_policy=LFU_EvictionPolicy(threshold_filtering_func=at_least_two),
        )
        with torch.no_grad():
            m._mch_sorted_raw_ids[:live] = torch.from_numpy(np.sort(ids[:live]))
            m._mch_counts[:live] = 1
        modules.append(m)
    return modules


def mch_run(modules: list[torch.nn.Module], values: np.ndarray, batch: int) -> None:
    """One batch through every feature's MCH module (remap only in eval mode, profile + remap in train)."""
    from torchrec.sparse.jagged_tensor import JaggedTensor

    lengths = torch.ones(batch, dtype=torch.int64)
    for f, m in enumerate(modules):
        m({"f": JaggedTensor(values=torch.from_numpy(values[f * batch:(f + 1) * batch]), lengths=lengths)})


def rate(work: Callable[[np.ndarray], object], batches: list[np.ndarray]) -> float:
    """IDs per second of ``work`` over ``batches`` (after one untimed warm-up batch)."""
    work(batches[0])
    start = time.perf_counter()
    for values in batches[1:]:
        work(values)
    return sum(len(v) for v in batches[1:]) / (time.perf_counter() - start)


def bench_recmem(opts: MapOptions, id_table: np.ndarray, live: int, capacity: int,
                 batches: dict[str, list[np.ndarray]], say: Say) -> dict[str, float]:
    """Load the live IDs into a SlotMap (admission min_count = 2), then time find and find-or-insert."""
    F = id_table.shape[0]
    tick = time.perf_counter()
    slots = SlotMap(F, capacity, capacity, 2, 1 << 20, "lru", opts.seed, False)
    rows = ArrayRows(opts.dim)
    for lo in range(0, live, 1 << 18):  # each ID twice in a row: admitted at its second sighting
        chunk = np.repeat(id_table[:, lo:min(lo + (1 << 18), live)], 2, axis=1)
        slots.assign(chunk.reshape(-1), np.arange(F + 1) * chunk.shape[1], 0, INIT_BOUND, rows)
    loaded = slots.stats()
    say(f"recmem: loaded {loaded['rows_live']:,.0f} rows in {time.perf_counter() - tick:.1f}s "
        f"(map {slots.memory_bytes()['key_bytes'] / 2**20:,.0f} MiB, rows {rows.weights.nbytes / 2**20:,.0f} MiB)")
    bounds = np.arange(F + 1, dtype=np.int64) * opts.batch
    clock = iter(range(1, 10**9))
    out = {"find": rate(lambda v: slots.find(v, bounds), batches["find"]),
           "find_or_insert": rate(lambda v: slots.assign(v, bounds, next(clock), INIT_BOUND, rows),
                                  batches["train"])}
    s = slots.stats()
    say(f"recmem: admitted {s['admitted'] - loaded['admitted']:,.0f} new IDs, "
        f"filter rejected {s['rejected'] - loaded['rejected']:,.0f} sightings")
    return out


def bench_peers(opts: MapOptions, id_table: np.ndarray, live: int, capacity: int,
                batches: dict[str, list[np.ndarray]], say: Say) -> dict[str, dict[str, float]]:
    """The dict peer and torchrec's MCH on the first ``peer_batches`` batches."""
    n, B = opts.peer_batches + 1, opts.batch
    clock = iter(range(1, 10**9))
    tick = time.perf_counter()
    peer = DictMap(id_table, live, capacity, 2)
    say(f"dict: loaded in {time.perf_counter() - tick:.1f}s")
    out = {"dict": {"find": rate(lambda v: peer.find(v, B), batches["find"][:n]),
                    "find_or_insert": rate(lambda v: peer.assign(v, B, next(clock)), batches["train"][:n])}}
    del peer
    modules = mch_modules(id_table, live, capacity, interval=1)
    for m in modules:
        m.eval()
    mch = {"find": rate(lambda v: mch_run(modules, v, B), batches["find"][:n])}
    for m in modules:
        m.train()
    mch["find_or_insert"] = rate(lambda v: mch_run(modules, v, B), batches["train"][:n])
    out["torchrec_mch"] = mch
    del modules
    # Coalescing every 10 batches amortizes MCH's sort, but new IDs then wait up to 10 batches for a slot.
    modules = mch_modules(id_table, live, capacity, interval=10)
    out["torchrec_mch_every10"] = {"find": mch["find"], "find_or_insert": rate(
        lambda v: mch_run(modules, v, B), batches["train"][:11])}
    return out


def run_map_bench(opts: MapOptions, say: Say = print) -> dict[str, dict[str, float]]:
    """Draw the IDs and batches, time recmem's map, then its peers.

    Args:
        opts: sizes.
        say: takes the progress lines (sizes, load times, admissions).

    Returns:
        ``{implementation: {"find": IDs/s, "find_or_insert": IDs/s}}``, ``recmem`` first.
    """
    rng = np.random.default_rng(opts.seed)
    F, B = opts.features, opts.batch
    live = -(-opts.rows // F)
    capacity = live + live // 4 + opts.batches * B  # room for every new ID the timed batches can admit
    id_table = rng.integers(-(2**63), 2**63 - 1, size=(F, 2 * live), dtype=np.int64)
    ranks = {"find": zipf_batches(rng, 2 * live, opts.zipf, F, B, max(opts.batches, 10) + 1, live),
             "train": zipf_batches(rng, 2 * live, opts.zipf, F, B, max(opts.batches, 10) + 1, 0)}
    batches = {k: [to_ids(r, id_table, B) for r in v] for k, v in ranks.items()}
    threads = torch.get_num_threads()
    say(f"{F} features x {live:,} live rows (= {F * live:,}), dim {opts.dim}, batches {B} x {F}, Zipf {opts.zipf} "
        f"over 2x the live IDs ({np.mean([(r >= live).mean() for r in ranks['train']]):.1%} of training "
        f"IDs not live); {'one thread' if threads == 1 else f'{threads} threads'}")
    results = {"recmem": bench_recmem(opts, id_table, live, capacity, batches, say)}
    results.update(bench_peers(opts, id_table, live, capacity, batches, say))
    return results


def report(results: dict[str, dict[str, float]]) -> str:
    """IDs/s of every implementation, then recmem's ratio to each peer."""
    lines = [f"\n{'IDs/s':<32}{'find':>14}{'find_or_insert':>16}"]
    for impl, r in results.items():
        lines.append(f"{impl:<32}{r['find']:>14,.0f}{r['find_or_insert']:>16,.0f}")
    for peer in list(results)[1:]:
        ratios = [results["recmem"][op] / results[peer][op] for op in OPERATIONS]
        lines.append(f"{'recmem / ' + peer:<32}{ratios[0]:>13.1f}x{ratios[1]:>15.1f}x")
    return "\n".join(lines)
