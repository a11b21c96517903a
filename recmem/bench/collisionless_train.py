"""Training speed of a DLRM on `collisionless` tables against the same DLRM on `full` tables.

One process, the same pre-collated batches for every variant (:mod:`recmem.bench.throughput`'s
Criteo-shaped rows: 13 dense fields, ``tables`` sparse fields of one ID each, Zipf-like IDs over
``rows`` values), the same dense initialisation, the training loop's step (forward, BCE, backward
with the tables' fused row-wise Adagrad, dense Adagrad step, reading the loss), variants interleaved
in rounds so a neighbour's load slows them alike. Variants:

- ``full``: one row per distinct ID of the batches (the vocabulary ``recmem prepare``'s statistics
  would give), ID -> row by binary search.
- ``collisionless``: capacity ``rows``, the default 4096 initial rows per feature, so the timed
  steps include every growth (new IDs keep arriving: no timed batch has been seen before).
- ``collisionless_sized``: ``initial_rows`` = the most distinct IDs of any feature (no growth).
- ``collisionless_admit2_ttl``: sized, admission after 2 sightings, a TTL (eviction itself runs on
  the loop's cadence and is timed apart: ``evict_ms``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np
import torch

from recmem.bench.throughput import (
    ThroughputOptions, bench_config, interleave, recmem_step, schema_for, synthetic_rows,
)
from recmem.config import Config, SchemaConfig
from recmem.data.collate import collate
from recmem.models import CTRModel, build_dense
from recmem.tables import TableCollection
from recmem.tables.collisionless import CollisionlessTable
from recmem.tables.full import FullTable

BASELINE = "full"

Say = Callable[[str], None]
"""Where progress lines go (``print`` in the job)."""


def variants(opts: ThroughputOptions, schema: SchemaConfig, cfg: Config,
             vocabs: list[np.ndarray]) -> dict[str, Callable[[], torch.nn.Module]]:
    """Builders of each variant's tables (see the module docstring)."""
    lr, sized = cfg.model.tables[0].learning_rate, max(len(v) for v in vocabs)

    def collisionless(**kw) -> CollisionlessTable:
        return CollisionlessTable(schema.sparse, opts.dim, lr, capacity=opts.rows, seed=opts.seed, **kw)

    return {
        "full": lambda: FullTable(schema.sparse, vocabs, opts.dim, lr, opts.seed),
        "collisionless": lambda: collisionless(),
        "collisionless_sized": lambda: collisionless(initial_rows=sized),
        "collisionless_admit2_ttl": lambda: collisionless(initial_rows=sized, min_count=2, ttl=86_400),
    }


def model_on(tables: torch.nn.Module, opts: ThroughputOptions, schema: SchemaConfig, cfg: Config) -> CTRModel:
    """``tables`` under the default DLRM dense part, initialised alike for every variant."""
    torch.manual_seed(opts.seed)
    return CTRModel(TableCollection([tables], schema.sparse), build_dense(cfg.model, schema))


def evict_ms(table: CollisionlessTable) -> float:
    """Milliseconds of one TTL sweep over every row (nothing is idle: it measures the scan)."""
    table.evict(0)  # the first call loads the compiled kernel
    tick = time.perf_counter()
    table.evict(0)
    return (time.perf_counter() - tick) * 1e3


def run_collisionless_train(opts: ThroughputOptions, say: Say = print) -> dict:
    """Build the batches and the variants, time them interleaved, on the calling thread's torch settings.

    Args:
        opts: sizes (``ThroughputOptions``; ``naive_steps`` and ``ids`` are not used).
        say: takes one line per variant built, with its build time.

    Returns:
        The record the job prints as JSON: ``options``, ``threads``, per variant ``samples_per_second``,
        ``ratio_to_full``, ``per_round``, ``rows_live``, ``memory_mib``, ``last_loss``; and ``evict_ms``.
    """
    cfg, schema = bench_config(opts), schema_for(opts)
    rows = synthetic_rows(opts, schema)
    batches = [collate(rows.slice(i, opts.batch), schema) for i in range(0, rows.num_rows, opts.batch)]
    vocabs = [np.unique(rows.column(name).to_numpy()) for name in schema.sparse]
    models = {}
    for name, build in variants(opts, schema, cfg, vocabs).items():
        tick = time.perf_counter()
        models[name] = model_on(build(), opts, schema, cfg)
        say(f"built {name} in {time.perf_counter() - tick:.2f}s")
    timings = interleave({k: recmem_step(m, cfg) for k, m in models.items()}, batches, opts)
    base = timings[BASELINE].samples_per_second
    record: dict = {"options": dataclasses.asdict(opts), "threads": torch.get_num_threads()}
    for name, t in timings.items():
        table = models[name].tables.tables[0]
        stats = table.stats()
        record[name] = {"samples_per_second": round(t.samples_per_second, 1),
                        "ratio_to_full": round(t.samples_per_second / base, 3),
                        "best_round": round(t.best_round, 1),
                        "per_round": [round(r, 1) for r in t.per_round],
                        "rows_live": stats.get("rows_live", stats.get("rows", 0.0)),
                        "memory_mib": round(table.memory_bytes() / 2**20, 2), "last_loss": round(t.last_loss, 4)}
    record["evict_ms"] = round(evict_ms(models["collisionless_admit2_ttl"].tables.tables[0]), 2)
    return record


def report(record: dict) -> str:
    """Samples/s per variant with its ratio to ``full``, then the TTL sweep's time."""
    lines = [f"\n{'variant':28s} {'samples/s':>10s} {'vs full':>8s} {'best round':>11s} {'rows':>10s} {'MiB':>8s}"]
    for name, v in record.items():
        if not (isinstance(v, dict) and "ratio_to_full" in v):
            continue  # options, threads, evict_ms
        lines.append(f"{name:28s} {v['samples_per_second']:10,.0f} {v['ratio_to_full']:7.2f}x "
                     f"{v['best_round']:11,.0f} {v['rows_live']:10,.0f} {v['memory_mib']:8.1f}")
    lines.append(f"one TTL sweep over collisionless_admit2_ttl's rows: {record['evict_ms']:.1f} ms")
    return "\n".join(lines)
