"""Speed of the collisionless ID -> row map against a Python dict and torchrec's MCH, on one core.

    python jobs/bench_collisionless.py                  # 10M live rows, 26 features, batches 4096 x 26
    python jobs/bench_collisionless.py --rows 1000000   # a quick run

What each implementation does and how IDs are drawn: ``recmem/bench/collisionless_map.py``.
"""

from __future__ import annotations

import argparse

import torch

from recmem.bench.collisionless_map import MapOptions, report, run_map_bench


def parse_options(argv: list[str] | None = None) -> MapOptions:
    """Flags over the defaults; see MapOptions for each."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=MapOptions.rows, help="live rows over all features")
    p.add_argument("--features", type=int, default=MapOptions.features)
    p.add_argument("--batch", type=int, default=MapOptions.batch)
    p.add_argument("--dim", type=int, default=MapOptions.dim)
    p.add_argument("--zipf", type=float, default=MapOptions.zipf)
    p.add_argument("--batches", type=int, default=MapOptions.batches, help="timed batches for recmem")
    p.add_argument("--peer-batches", type=int, default=MapOptions.peer_batches, help="timed batches for the peers")
    p.add_argument("--seed", type=int, default=MapOptions.seed)
    return MapOptions(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    """One thread, then the benchmark; progress lines as they come, the table at the end."""
    opts = parse_options(argv)
    torch.set_num_threads(1)
    print(report(run_map_bench(opts, say=print)))


if __name__ == "__main__":
    main()
