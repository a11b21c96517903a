"""Training throughput of recmem against torchrec's DLRM, measured in one run on the same batches.

    python jobs/bench_train.py                 # 26 tables x 1M rows, dim 16, batch 4096 (a few minutes)
    python jobs/bench_train.py --quick         # tiny sizes, seconds (the smoke test)
    python jobs/bench_train.py --rows 100000 --steps 16
    python jobs/bench_train.py --threads 1 --clock cpu   # on a machine other jobs are using

Prints the CPU's capability (and whether it runs bf16 natively), a table of samples/s with each
variant's ratio to torchrec's DistributedModelParallel DLRM, recmem's step split into phases (ID
lookup, TBE forward/backward, dense forward/backward/optimizer), then one JSON line with every number.
What each variant is: ``recmem/bench/throughput.py``; the phases: ``recmem/bench/phases.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from recmem.bench.throughput import QUICK, ThroughputOptions, run_throughput
from recmem.bench.throughput_report import report


def parse_options(argv: list[str] | None = None) -> ThroughputOptions:
    """Flags over the defaults (or over the ``--quick`` sizes)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="What each option means: ThroughputOptions in recmem/bench/throughput.py.")
    p.add_argument("--quick", action="store_true", help="tiny sizes that run in seconds")
    for f in dataclasses.fields(ThroughputOptions):
        kind = {"ids": str, "clock": str, "max_seconds": float}.get(f.name, int)
        choices = {"ids": ["zipf", "uniform"], "clock": ["wall", "cpu"]}.get(f.name)
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, choices=choices,
                       help=f"default {f.default} ({getattr(QUICK, f.name)} with --quick)")
    args = vars(p.parse_args(argv))
    base = QUICK if args.pop("quick") else ThroughputOptions()
    return dataclasses.replace(base, **{k: v for k, v in args.items() if v is not None})


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the machine line, the tables, then the JSON line."""
    opts = parse_options(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    with tempfile.TemporaryDirectory(prefix="recmem-bench-") as workdir:
        measured = run_throughput(opts, Path(workdir))
    text, record = report(measured, opts)
    print(text)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
