"""Training speed of a DLRM on `collisionless` tables against the same DLRM on `full` tables.

    python jobs/bench_collisionless_train.py                          # 26 features, batch 4096 (~2 min)
    python jobs/bench_collisionless_train.py --threads 1 --clock cpu  # on a machine other jobs are using
    python jobs/bench_collisionless_train.py --quick                  # tiny sizes, seconds

Prints samples/s per variant with its ratio to ``full``, then one JSON line with every number. What
each variant is: ``recmem/bench/collisionless_train.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from recmem.bench.collisionless_train import report, run_collisionless_train
from recmem.bench.throughput import QUICK, ThroughputOptions


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


def main(argv: list[str] | None = None) -> None:
    """Set the threads, run the benchmark, print the table and the JSON line."""
    opts = parse_options(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    record = run_collisionless_train(opts, say=print)
    print(report(record))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
