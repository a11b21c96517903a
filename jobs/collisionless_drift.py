"""Collisionless tables on drifting data: TTL and admission against no expiry and the hashing trick.

    python jobs/collisionless_drift.py --config jobs/configs/collisionless_drift.yaml --threads 1 \\
        --figure benchmarks/collisionless_drift.png          # ~7 min on 2 shared cores
    python jobs/collisionless_drift.py --config jobs/configs/collisionless_drift.yaml train.max_steps=30

Generates the config's data when missing, trains six variants (no TTL, TTL, a short TTL, TTL with
admission after 2 and 3 sightings, the hashing trick at ``ttl_min2``'s memory) on the same batches,
logs the comparison to MLflow, then prints the summary as JSON and the MLflow run's URL. What each
variant is: ``recmem/bench/collisionless_drift.py``. ``key=value`` overrides apply to every variant.
"""

from __future__ import annotations

import argparse
import json

import torch

from recmem.bench.collisionless_drift import DriftOptions, run_drift


def main(argv: list[str] | None = None) -> None:
    """Parse the flags, run the comparison, print the summary and the run URL."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the base config (jobs/configs/collisionless_drift.yaml)")
    p.add_argument("--figure", help="also write the comparison figure here (PNG)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: torch's default; 1 is faster on a machine other jobs load)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every variant")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    summary, run_url = run_drift(DriftOptions(args.config, args.overrides, args.figure), say=print)
    print(json.dumps(summary, indent=2))
    print(run_url)


if __name__ == "__main__":
    main()
