"""Serving bundle bytes and AUC per row format (fp32, fp16, int8) for a configured job.

    python jobs/bench_serving.py --config jobs/configs/quickstart.yaml            # ~3 min (trains once)
    python jobs/bench_serving.py --config jobs/configs/criteo_kaggle_10k.yaml     # after `recmem prepare`
    python jobs/bench_serving.py --config jobs/configs/quickstart.yaml train.max_steps=20   # a quick look

Trains single-process into ``--workdir`` (default ``runs/bench_serving/<config name>``; a finished run
there is reused), exports each format and scores every bundle on the validation split; prints a
markdown table (with the CPU capability) and one JSON line. What it does: ``recmem/bench/serving.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recmem.bench.serving import report, run_serving_bench
from recmem.config import load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", required=True, help="the job's YAML config")
    p.add_argument("--workdir", help="where the training and the bundles go")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    workdir = Path(args.workdir or f"runs/bench_serving/{Path(args.config).stem}").resolve()
    result = run_serving_bench(cfg, workdir)
    print(report(Path(args.config).stem, result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
