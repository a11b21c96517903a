"""Bytes per ID and samples/s of the memory-efficient table kinds against `full`, on a prepared data
root (default: the quickstart's synthetic data). Logic and what each figure means:
``recmem/bench/memory_kinds.py``.

    python jobs/bench_memory_kinds.py                          # data/synthetic, batch 4096, D=16
    python jobs/bench_memory_kinds.py --steps 8 data.batch_size=1024
    python jobs/bench_memory_kinds.py --optembed-plan runs/optembed/checkpoints/search/plan-0.pt
"""

from __future__ import annotations

import argparse

from recmem.bench.memory_kinds import VARIANTS, measure, report
from recmem.bench.throughput import ThroughputOptions
from recmem.config import TableConfig, load_config


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="a recmem config (default: the embedded quickstart)")
    p.add_argument("--steps", type=int, default=24, help="timed steps per variant")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds the steps are split into")
    p.add_argument("--optembed-plan", help="a plan `recmem optembed` wrote (one block over every feature): adds "
                                           "its retrained tables as the variant optembed_retrained")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    opts = ThroughputOptions(steps=args.steps, rounds=args.rounds, warmup=2, max_seconds=600.0)
    variants = dict(VARIANTS)
    if args.optembed_plan:
        variants["optembed_retrained"] = TableConfig(kind="optembed", options={"plan": args.optembed_plan})
    print(report(measure(cfg, variants, opts), cfg))


if __name__ == "__main__":
    main()
