"""SSD-offloaded tables: samples/s of the same DLRM with its tables (a) in RAM, (b) on disk fetched on
demand, (c) on disk with lookahead prefetch, and the disk figures that bound (b) and (c).

One run interleaves the three variants in rounds on Zipf batches (``recmem/bench/throughput.py``'s
IDs), so other load on the machine hits them alike; (b) and (c) train one SSD table in turn, so they see
the same cache. The disk is measured cold: reads use O_DIRECT (``direct_io``), and the disk's own
random-read rate is timed on the same file before training. The SSD table is built and warmed before
the in-RAM one exists, so the peak RSS then is the SSD variant's alone.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recmem.bench.throughput import make_step, schema_for, ThroughputOptions
from recmem.config import Config, SchemaConfig, TableConfig
from recmem.data.batch import Batch
from recmem.models import CTRModel, build_dense
from recmem.tables import TableCollection
from recmem.tables.hash import HashTable
from recmem.tables.ssd import SSDTable
from recmem.train.lookahead import lookahead
from recmem.train.loop import make_dense_optimizer


@dataclass
class SSDBenchOptions:
    """Sizes of one run; the defaults are the issue's (26 tables of 800k rows: 20.8M rows x dim 16).

    Attributes:
        tables, rows, dim, batch: F tables of ``rows`` rows of width D; B rows a batch.
        cache_fraction: the cache's share of all rows.
        depth: batches prefetched ahead in (c).
        warmup: most untimed steps before the timed rounds. They run in chunks of ``warmup_chunk``
            steps and stop once the cache is full and a chunk's hit rate (per unique row) rose by
            less than ``warmup_rise`` over the chunk before, so the rounds see a steady state
            (evictions and write-backs), not a cache filling up; a larger cache needs more steps.
        warmup_seconds: the warm-up stops after this long in any case (then its hit rate is
            still rising: the report says so).
        warmup_chunk, warmup_rise: see ``warmup``.
        rounds, steps: the variants take turns ``rounds`` times, ``steps`` steps each.
        disk_reads: random blocks read to time the disk.
        io_depth: reads in flight through kernel AIO (the table's ``io_depth``; 0: threads).
        io_threads: threads reading at once where reads do not go through kernel AIO.
        seed: seeds data and models.
        folder: where the row file goes (under ``<folder>/rows``, removed afterwards; empty: a
            temporary folder).
    """

    tables: int = 26
    rows: int = 800_000
    dim: int = 16
    batch: int = 4096
    cache_fraction: float = 0.1
    depth: int = 2
    warmup: int = 3000
    warmup_seconds: float = 300.0
    warmup_chunk: int = 16
    warmup_rise: float = 0.002
    rounds: int = 3
    steps: int = 6
    disk_reads: int = 40_000
    io_depth: int = 256
    io_threads: int = 16
    seed: int = 0
    folder: str = ""


QUICK = SSDBenchOptions(tables=4, rows=20_000, dim=8, batch=256, warmup=8, warmup_chunk=4, rounds=2, steps=3,
                        disk_reads=2000)
"""Tiny sizes that run every variant in seconds (the smoke test)."""


@dataclass
class SSDMeasured:
    """What one run measured."""

    samples_per_second: dict[str, float] = field(default_factory=dict)
    cpu_seconds_per_step: dict[str, float] = field(default_factory=dict)
    ssd_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    disk_reads_per_second: float = 0.0
    table_bytes: int = 0
    cache_bytes: int = 0
    peak_rss_ssd: int = 0
    peak_rss_all: int = 0
    rss_baseline: int = 0
    warmup_steps: int = 0
    warmup_seconds: float = 0.0
    warmup_hit_rates: list[float] = field(default_factory=list)
    io_engine: str = ""
    cpu: str = ""


# Ranks become IDs by r * _SPREAD + offset mod rows: a prime that divides no table size makes it a
# permutation, so hot IDs lie scattered over the file, as a random permutation would leave them,
# without holding a permutation of every table in RAM (26 x 800k int64 would count in the RSS).
_SPREAD = 1_000_003


def zipf_batch(opts: SSDBenchOptions, index: int) -> Batch:
    """Batch ``index`` of a stream of one ID per field: rank r drawn with P ~ 1/(r+1) (log-uniform,
    as ``throughput.synthetic_rows``), ranks scattered over the rows of each field."""
    rng = np.random.default_rng([opts.seed, index])
    offsets = np.random.default_rng(opts.seed).integers(0, opts.rows, opts.tables)
    rank = np.floor(np.exp(rng.random((opts.tables, opts.batch)) * math.log(opts.rows + 1))).astype(np.int64) - 1
    ids = (np.minimum(rank, opts.rows - 1) * _SPREAD + offsets[:, None]) % opts.rows  # [F, B]
    kjt = KeyedJaggedTensor(keys=[f"C{i}" for i in range(1, opts.tables + 1)], values=torch.from_numpy(ids.ravel()),
                            lengths=torch.ones(opts.tables * opts.batch, dtype=torch.int32))
    dense = torch.from_numpy(np.log1p(rng.exponential(10.0, (opts.batch, 13))).astype(np.float32))
    labels = torch.from_numpy((rng.random(opts.batch) < 0.25).astype(np.float32))
    return Batch(dense, kjt, labels)


def _model(table: torch.nn.Module, schema: SchemaConfig, cfg: Config) -> tuple[CTRModel, callable]:
    torch.manual_seed(0)
    model = CTRModel(TableCollection([table], schema.sparse), build_dense(cfg.model, schema))
    loss = lambda b: torch.nn.functional.binary_cross_entropy_with_logits(model(b), b.labels)  # noqa: E731
    return model, make_step(loss, make_dense_optimizer(cfg, list(model.dense.parameters())))


def disk_random_reads(table: SSDTable, reads: int, seed: int) -> float:
    """Random 4 KiB blocks read per second from the table's file (O_DIRECT, the table's threads)."""
    store = table.disk.store
    rows = np.random.default_rng(seed).choice(store.num_rows, size=min(reads, store.num_rows), replace=False)
    rows = rows[np.unique(rows // store.per_block, return_index=True)[1]]  # one row per block
    started = time.perf_counter()
    store.read(np.sort(rows))
    return len(rows) / (time.perf_counter() - started)


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_ssd_bench(opts: SSDBenchOptions) -> SSDMeasured:
    """Build, warm and time the three variants (see the module docstring)."""
    schema = schema_for(ThroughputOptions(tables=opts.tables))
    cfg = Config()
    cfg.model.bottom_mlp = [*cfg.model.bottom_mlp[:-1], opts.dim]
    cfg.model.tables = [TableConfig(embedding_dim=opts.dim)]
    lr = cfg.model.tables[0].learning_rate
    measured = SSDMeasured(cpu=torch.backends.cpu.get_cpu_capability())
    measured.rss_baseline = _rss_now()
    with tempfile.TemporaryDirectory(prefix="recmem-ssd-bench-") as tmp:
        folder = Path(opts.folder or tmp) / "rows"
        cache_rows = max(int(opts.cache_fraction * opts.tables * opts.rows), 1)
        disk = SSDTable(schema.sparse, opts.rows, opts.dim, lr, folder, cache_rows, opts.seed,
                        opts.io_threads, direct_io=True, io_depth=opts.io_depth)
        measured.io_engine = disk.disk.store.io_engine
        measured.disk_reads_per_second = disk_random_reads(disk, opts.disk_reads, opts.seed)
        ssd_model, ssd_step = _model(disk, schema, cfg)
        tables = ssd_model.tables
        position = 0

        # Every SSD step trains a batch of its own (a stream, as in training): (b) and (c) take turns
        # on one table, and neither may find its rows cached because the other just trained them.
        # The batches are made before the clock starts, as (a)'s are.
        def ssd_round(depth: int | None, steps: int) -> tuple[int, float, float]:
            nonlocal position
            chosen = [zipf_batch(opts, i) for i in range(position, position + steps)]
            position += steps
            source = chosen if depth is None else lookahead(chosen, tables, depth)
            started, cpu = time.perf_counter(), time.process_time()
            for batch in source:
                ssd_step(batch)
            return steps * opts.batch, time.perf_counter() - started, time.process_time() - cpu

        started = time.perf_counter()
        while position < opts.warmup and time.perf_counter() - started < opts.warmup_seconds:
            ssd_round(opts.depth, opts.warmup_chunk)
            rates = measured.warmup_hit_rates
            rates.append(disk.stats()["cache_unique_hit_rate"])  # counters restart after each call
            if (disk.disk.cache.row_of >= 0).all() and len(rates) > 1 and rates[-1] - rates[-2] < opts.warmup_rise:
                break
        measured.warmup_steps, measured.warmup_seconds = position, time.perf_counter() - started
        # The disk again, after the warm-up: the larger of the two rates bounds (c) (the first may be
        # slowed by the new file's write-back).
        measured.disk_reads_per_second = max(measured.disk_reads_per_second,
                                             disk_random_reads(disk, opts.disk_reads, opts.seed + 1))
        disk.stats()
        measured.peak_rss_ssd = _peak_rss()
        measured.cache_bytes = disk.memory_bytes()
        measured.table_bytes = opts.tables * opts.rows * (opts.dim + 1) * 4
        ram_model, ram_step = _model(HashTable(schema.sparse, opts.rows, opts.dim, lr, opts.seed), schema, cfg)
        ram_batches = [zipf_batch(opts, 10**9 + i) for i in range(opts.steps)]  # apart from the stream
        for batch in ram_batches[:2]:
            ram_step(batch)
        totals = {"ram": [0, 0.0, 0.0], "ssd_no_prefetch": [0, 0.0, 0.0], "ssd_prefetch": [0, 0.0, 0.0]}
        for _ in range(opts.rounds):
            started, cpu = time.perf_counter(), time.process_time()
            for i in range(opts.steps):
                ram_step(ram_batches[i])
            ram = (opts.steps * opts.batch, time.perf_counter() - started, time.process_time() - cpu)
            totals["ram"] = [t + got for t, got in zip(totals["ram"], ram)]
            for name, depth in (("ssd_no_prefetch", None), ("ssd_prefetch", opts.depth)):
                totals[name] = [t + got for t, got in zip(totals[name], ssd_round(depth, opts.steps))]
                stats = disk.stats()
                merged = measured.ssd_stats.setdefault(name, {})
                for k, v in stats.items():
                    merged[k] = merged.get(k, 0.0) + v / opts.rounds
        measured.samples_per_second = {k: s / max(t, 1e-9) for k, (s, t, _) in totals.items()}
        measured.cpu_seconds_per_step = {k: c * opts.batch / s for k, (s, _, c) in totals.items()}
        measured.peak_rss_all = _peak_rss()
        disk.close()
        shutil.rmtree(folder)  # gigabytes: a run leaves none behind, also under --folder
        del ram_model, ssd_model
    return measured


def report(m: SSDMeasured, opts: SSDBenchOptions) -> tuple[str, dict]:
    """The printed table and the JSON record, with the targets checked."""
    sps = m.samples_per_second
    pre = m.ssd_stats.get("ssd_prefetch", {})
    misses = pre.get("misses_per_step", 0.0)
    disk_bound = opts.batch * m.disk_reads_per_second / misses if misses else math.inf
    bound = min(sps["ram"], disk_bound)
    # (c) >= 0.7 (a) needs the disk to read a step's misses in 1 / (0.7 (a) / B) seconds.
    allowed = opts.batch * m.disk_reads_per_second / (0.7 * sps["ram"])
    rates = m.warmup_hit_rates
    rising = len(rates) < 2 or rates[-1] - rates[-2] >= opts.warmup_rise
    lines = [f"cpu capability: {m.cpu}; {os.cpu_count()} cores; tables {opts.tables} x {opts.rows:,} rows x dim "
             f"{opts.dim} = {m.table_bytes / 2**30:.2f} GiB of rows + Adagrad state on disk; cache "
             f"{opts.cache_fraction:.0%} of rows ({m.cache_bytes / 2**20:.0f} MiB in RAM with its maps); batch {opts.batch}",
             f"disk: {m.disk_reads_per_second:,.0f} random 4 KiB reads/s (O_DIRECT, {m.io_engine})",
             f"{'variant':<18}{'samples/s':>12}{'hit rate':>10}{'unique hit':>11}{'misses/step':>13}{'wait s':>8}"
             f"{'CPU s/step':>12}"]
    for name in ("ram", "ssd_no_prefetch", "ssd_prefetch"):
        s = m.ssd_stats.get(name, {})
        lines.append(f"{name:<18}{sps[name]:>12,.0f}{s.get('cache_hit_rate', 1.0):>10.3f}"
                     f"{s.get('cache_unique_hit_rate', 1.0):>11.3f}{s.get('misses_per_step', 0.0):>13,.0f}"
                     f"{s.get('prefetch_wait_seconds', 0.0):>8.2f}{m.cpu_seconds_per_step.get(name, 0.0):>12.3f}")
    record = {"samples_per_second": sps, "cpu_seconds_per_step": m.cpu_seconds_per_step,
              "disk_reads_per_second": m.disk_reads_per_second,
              "disk_bound_samples_per_second": disk_bound, "ssd_stats": m.ssd_stats,
              "prefetch_vs_bound": sps["ssd_prefetch"] / bound, "prefetch_vs_no_prefetch":
              sps["ssd_prefetch"] / max(sps["ssd_no_prefetch"], 1e-9), "prefetch_vs_ram": sps["ssd_prefetch"] / sps["ram"],
              "table_bytes": m.table_bytes, "cache_bytes": m.cache_bytes, "peak_rss_ssd": m.peak_rss_ssd,
              "peak_rss_all": m.peak_rss_all, "rss_baseline": m.rss_baseline, "warmup_steps": m.warmup_steps,
              "warmup_seconds": m.warmup_seconds, "warmup_hit_rates": m.warmup_hit_rates,
              "misses_allowed_for_0.7x_ram": allowed, "io_engine": m.io_engine, "cpu": m.cpu}
    lines.append(f"disk-bound rate at these misses: {disk_bound:,.0f} samples/s; (c) / min((a), disk bound) = "
                 f"{record['prefetch_vs_bound']:.2f} (target >= 0.9); (c) / (b) = {record['prefetch_vs_no_prefetch']:.2f}; "
                 f"(c) / (a) = {record['prefetch_vs_ram']:.2f}")
    lines.append(f"peak RSS with the SSD model only: {m.peak_rss_ssd / 2**30:.2f} GiB, of which "
                 f"{m.rss_baseline / 2**30:.2f} GiB before any model (libraries); rows on disk "
                 f"{m.table_bytes / 2**30:.2f} GiB; with the in-RAM model too: {m.peak_rss_all / 2**30:.2f} GiB; "
                 f"warm-up: {m.warmup_steps} steps in {m.warmup_seconds:.0f} s, unique hit rate "
                 f"{m.warmup_hit_rates[-1] if m.warmup_hit_rates else 0.0:.3f} at its end"
                 + (" (still rising: a cold cache)" if rising else " (no longer rising)"))
    lines.append(f"(c) >= 0.7x (a) needs <= {allowed:,.0f} misses per step at this disk's rate: "
                 f"{'the misses allow it' if misses <= allowed else 'the misses do not allow it'} at this cache size "
                 f"({misses:,.0f})")
    return "\n".join(lines), record
