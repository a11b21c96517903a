"""The Ray path's speed against the single-process loop on the quickstart, in one run.

    python jobs/bench_ray.py                                    # the quickstart's 600k rows, 3 rounds (~5 min here)
    python jobs/bench_ray.py data.synthetic.train_rows=60000    # any override, for every run

Runs ``recmem train`` three times as a user would: (a) single-process, (b) Ray with 1 worker, (c) Ray
with 2 workers; prints their wall time, samples/s over the whole training pass (data waits
included), start-up to the first step and its parts, and the data stream's own rate per worker on
one core. What each figure means: ``recmem/bench/ray_path.py``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from recmem.bench.ray_path import VARIANTS, RayPathOptions, report, run_ray_path

QUICKSTART = Path(__file__).resolve().parent / "configs" / "quickstart.yaml"


def parse_options(argv: list[str] | None = None) -> RayPathOptions:
    """Flags and ``key=value`` overrides."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(QUICKSTART))
    p.add_argument("--workdir", default="", help="where data and runs go (default: a new temporary folder)")
    p.add_argument("--variant", action="append", choices=list(VARIANTS), help="run only this one (repeatable)")
    p.add_argument("--repeat", type=int, default=3, help="rounds of the variants; the median round counts")
    p.add_argument("--no-floor", action="store_true", help="skip Ray's floors (an empty Ray Train job, a plain Ray actor)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args(argv)
    workdir = a.workdir or tempfile.mkdtemp(prefix="recmem-bench-ray-")
    return RayPathOptions(a.config, workdir, tuple(a.overrides), tuple(a.variant or VARIANTS), not a.no_floor, a.repeat)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark; print the report, then one JSON line with every number."""
    result = run_ray_path(parse_options(argv))
    print(report(result))
    print(json.dumps({"cpu_capability": result.cpu, "runs": result.runs,
                      "stream_rows_per_second": {f"{w}/{r}": v for (w, r), v in result.stream.items()}}))


if __name__ == "__main__":
    main()
