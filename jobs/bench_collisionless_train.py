"""Training speed of a DLRM on `collisionless` tables against the same DLRM on `full` tables.

    python jobs/bench_collisionless_train.py                          # 26 features, batch 4096 (~2 min)
    python jobs/bench_collisionless_train.py --threads 1 --clock cpu  # on a machine other jobs are using
    python jobs/bench_collisionless_train.py --quick                  # tiny sizes, seconds

One process, the same pre-collated batches for every variant (recmem/bench/throughput.py's
Criteo-shaped rows: 13 dense fields, ``--tables`` sparse fields of one ID each, Zipf-like IDs over
``--rows`` values), the same dense initialisation, the training loop's step (forward, BCE, backward
with the tables' fused row-wise Adagrad, dense Adagrad step, reading the loss), variants interleaved
in rounds so a neighbour's load slows them alike. Variants:

- ``full``: one row per distinct ID of the batches (the vocabulary ``recmem prepare``'s statistics
  would give), ID -> row by binary search.
- ``collisionless``: capacity ``--rows``, the default 4096 initial rows per feature, so the timed
  steps include every growth (new IDs keep arriving: no timed batch has been seen before).
- ``collisionless_sized``: ``initial_rows`` = the most distinct IDs of any feature (no growth).
- ``collisionless_admit2_ttl``: sized, admission after 2 sightings, a TTL (eviction itself runs on
  the loop's cadence and is timed apart: ``evict_ms``).

Prints samples/s per variant with its ratio to ``full``, then one JSON line with every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable

import numpy as np
import torch

from recmem.bench.throughput import (
    QUICK, ThroughputOptions, bench_config, interleave, recmem_step, schema_for, synthetic_rows,
)
from recmem.config import Config, SchemaConfig
from recmem.data.collate import collate
from recmem.models import CTRModel, build_dense
from recmem.tables import TableCollection
from recmem.tables.collisionless import CollisionlessTable
from recmem.tables.full import FullTable

BASELINE = "full"


def parse_options(argv: list[str] | None = None) -> ThroughputOptions:
    """Flags over the defaults (or over the ``--quick`` sizes); see ThroughputOptions for each."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes that run in seconds")
    for name in ("tables", "rows", "batch", "steps", "warmup", "rounds", "parquet_rows", "seed", "threads"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"default {getattr(ThroughputOptions, name)}")
    p.add_argument("--max-seconds", type=float, help="a variant's time budget (default 30)")
    p.add_argument("--clock", choices=["wall", "cpu"], help="default wall")
    args = vars(p.parse_args(argv))
    base = QUICK if args.pop("quick") else ThroughputOptions()
    return dataclasses.replace(base, **{k: v for k, v in args.items() if v is not None})


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


def main(argv: list[str] | None = None) -> None:
    """Build the batches and the variants, time them interleaved, print the table and the JSON line."""
    opts = parse_options(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    cfg, schema = bench_config(opts), schema_for(opts)
    rows = synthetic_rows(opts, schema)
    batches = [collate(rows.slice(i, opts.batch), schema) for i in range(0, rows.num_rows, opts.batch)]
    vocabs = [np.unique(rows.column(name).to_numpy()) for name in schema.sparse]
    models = {}
    for name, build in variants(opts, schema, cfg, vocabs).items():
        tick = time.perf_counter()
        models[name] = model_on(build(), opts, schema, cfg)
        print(f"built {name} in {time.perf_counter() - tick:.2f}s")
    timings = interleave({k: recmem_step(m, cfg) for k, m in models.items()}, batches, opts)
    base = timings[BASELINE].samples_per_second
    print(f"\n{'variant':28s} {'samples/s':>10s} {'vs full':>8s} {'best round':>11s} {'rows':>10s} {'MiB':>8s}")
    record: dict = {"options": dataclasses.asdict(opts), "threads": torch.get_num_threads()}
    for name, t in timings.items():
        table = models[name].tables.tables[0]
        stats = table.stats()
        live = stats.get("rows_live", stats.get("rows", 0.0))
        mib = table.memory_bytes() / 2**20
        print(f"{name:28s} {t.samples_per_second:10,.0f} {t.samples_per_second / base:7.2f}x "
              f"{t.best_round:11,.0f} {live:10,.0f} {mib:8.1f}")
        record[name] = {"samples_per_second": round(t.samples_per_second, 1),
                        "ratio_to_full": round(t.samples_per_second / base, 3),
                        "per_round": [round(r, 1) for r in t.per_round], "rows_live": live,
                        "memory_mib": round(mib, 2), "last_loss": round(t.last_loss, 4)}
    record["evict_ms"] = round(evict_ms(models["collisionless_admit2_ttl"].tables.tables[0]), 2)
    print(f"one TTL sweep over collisionless_admit2_ttl's rows: {record['evict_ms']:.1f} ms")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
