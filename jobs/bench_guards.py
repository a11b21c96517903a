"""What the reliability guards cost (issue 9): the per-step non-finite agreement across 2 ranks, and a
verified checkpoint against a plain one. Logic and what each figure means: ``recmem/bench/guards.py``.

    python jobs/bench_guards.py              # 26 tables x 200k rows x 16 (~350 MiB checkpoint)
    python jobs/bench_guards.py --rows 20000
"""

from __future__ import annotations

import argparse

from recmem.bench.guards import report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000, help="rows per table of the checkpointed state")
    print(report(p.parse_args(argv).rows))


if __name__ == "__main__":
    main()
