"""Serving latency over loopback: the embedded server, its peer stacks and Ray Serve, on one bundle.

    python jobs/bench_serving_latency.py --config jobs/configs/quickstart.yaml \\
        --bundle runs/bench_serving/quickstart/exports/<version>          # a bundle of the 26-table DLRM
    python jobs/bench_serving_latency.py --config jobs/configs/quickstart.yaml --servers embedded --seconds 5

Needs the config's data (``recmem generate --config ...``) for its rows and a bundle (``recmem export`` or
``jobs/bench_serving.py``). Prints a markdown table (with the CPU capability) and one JSON line. What it
does: ``recmem/bench/serving_latency.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recmem.bench.serving_latency import SERVERS, report, run_latency_bench
from recmem.config import load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", required=True, help="the job's YAML config (its data gives the rows)")
    p.add_argument("--bundle", required=True, help="the bundle folder to serve")
    p.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated, of {', '.join(SERVERS)}")
    p.add_argument("--seconds", type=float, default=10.0, help="most seconds per phase (default 10)")
    p.add_argument("--clients", type=int, default=8, help="client threads at saturation (default 8)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    servers = tuple(s for s in args.servers.split(",") if s)
    if not servers or set(servers) - set(SERVERS):
        p.error(f"--servers: choose from {', '.join(SERVERS)}")
    result = run_latency_bench(Path(args.bundle).resolve(), Path(cfg.data.root), cfg.data.schema, servers,
                               args.seconds, args.clients)
    print(report(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
