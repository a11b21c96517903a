"""The memory/quality frontier on three datasets: the synthetic 2M rows, the same log with per-ID effects
(``frontier_synthetic_ids.yaml``: tail IDs keep their own effects, so collisions cost AUC; both
generated on first run) and the real Criteo sample (prepared from ../shared/data/criteo_kaggle_head10k
when present, skipped otherwise). Each is ``recmem frontier --config <its config>``; logic and figures:
``recmem/bench/frontier.py``.

    python jobs/frontier.py                       # every dataset, 1x 4x 16x 64x, each config's step budget
    python jobs/frontier.py --quick               # tiny synthetic data and the Criteo sample, 1x and 16x, 6 steps
    python jobs/frontier.py --steps 600 --lr qr=0.1
    python jobs/frontier.py --seeds 3             # every point with seeds 0, 1, 2: mean, spread, paired verdicts
"""

from __future__ import annotations

import argparse
import sys

from recmem import cli

CONFIGS = ("jobs/configs/frontier_synthetic.yaml", "jobs/configs/frontier_synthetic_ids.yaml",
           "jobs/configs/criteo_kaggle_10k.yaml")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the test suite's size: tiny data, 1x and 16x, 6 steps")
    p.add_argument("--steps", default="0", help="steps per point (default: each config's budget)")
    p.add_argument("--lr", action="append", default=[], metavar="KIND=RATE", help="a kind's table learning rate")
    p.add_argument("--seeds", default="1", help="seeds per point: a count, or a comma-separated list")
    args = p.parse_args(argv)
    for config in CONFIGS:
        command = ["frontier", "--config", config, "--steps", args.steps, "--seeds", args.seeds,
                   *(f"--lr={x}" for x in args.lr)]
        code = cli.main(command + (["--quick"] if args.quick else []))
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
