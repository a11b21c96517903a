"""Ray scaling on this machine: samples/s for 1 and 2 workers, bytes per step per worker, projection.

    python jobs/bench_scaling.py --rows 60000 --sharding id auto   # ~5 min on 2 busy cores
    python jobs/bench_scaling.py --rows 400000 --workers 1 2 4      # a bigger machine

Trains the quickstart model on one local Ray, once per worker count and sharding, and prints the
Markdown report BENCHMARKS.md quotes: samples/s, wall time, bytes per step per worker (tables and
all-reduce payload measured; ring all-reduce bytes computed from them) and a projection to 8 and 64
workers. What each figure means: ``recmem/bench/scaling.py``. A Ray driver: no torchrec import here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from recmem.bench.scaling import ScalingOptions, report, run_scaling

QUICKSTART = Path(__file__).resolve().parent / "configs" / "quickstart.yaml"


def parse_options(argv: list[str] | None = None) -> ScalingOptions:
    """Flags over the defaults; see ScalingOptions for each."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(QUICKSTART))
    p.add_argument("--rows", type=int, default=ScalingOptions.rows, help="training rows to generate")
    p.add_argument("--workers", type=int, nargs="+", default=list(ScalingOptions.workers))
    p.add_argument("--sharding", nargs="+", default=list(ScalingOptions.sharding),
                   help="ray.sharding values for runs of > 1 worker")
    p.add_argument("--train-cpus", type=float, default=ScalingOptions.train_cpus,
                   help="CPUs reserved for the workers together (each runs one torch thread)")
    p.add_argument("--workdir", default="", help="where data and runs go (default: a temporary folder)")
    a = p.parse_args(argv)
    return ScalingOptions(a.config, a.rows, tuple(a.workers), tuple(a.sharding), a.train_cpus, a.workdir)


def main(argv: list[str] | None = None) -> None:
    """Run every worker count and sharding, print the report."""
    print(report(run_scaling(parse_options(argv))))


if __name__ == "__main__":
    main()
