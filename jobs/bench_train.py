"""Training throughput of recmem against torchrec's DLRM, measured in one run on the same batches.

    python jobs/bench_train.py                 # 26 tables x 1M rows, dim 16, batch 4096 (a few minutes)
    python jobs/bench_train.py --quick         # tiny sizes, seconds (the smoke test)
    python jobs/bench_train.py --rows 100000 --steps 16
    python jobs/bench_train.py --threads 1 --clock cpu   # on a machine other jobs are using

Prints a table of samples/s with each variant's ratio to torchrec's DistributedModelParallel DLRM,
then one JSON line with every number. What each variant is: ``recmem/bench/throughput.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
from pathlib import Path

import torch

from recmem.bench.throughput import QUICK, ThroughputOptions, Timing, run_throughput

BASELINE = "torchrec_dmp"
LABELS = {
    "recmem_fp32": "(a)  recmem, pre-collated, fp32",
    "recmem_bf16": "(a') recmem, pre-collated, bf16 dense",
    "torchrec_dmp": "(b)  torchrec DLRM + DMP (fused TBE)",
    "torchrec_naive": "(c)  torchrec DLRM, unsharded EBC",
    "dense_fp32": "(d)  dense part alone, fp32",
    "dense_bf16": "(d') dense part alone, bf16",
    "recmem_parquet_fp32": "(e)  recmem from Parquet, fp32",
    "parquet_pipeline": "(e') Parquet -> Batch alone",
}


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


def report(timings: dict[str, Timing], opts: ThroughputOptions) -> tuple[str, dict]:
    """A readable table and the JSON record of one run."""
    base = timings[BASELINE].samples_per_second
    best = timings[BASELINE].best_round
    lines = [f"{'variant':40s} {'samples/s':>10s} {'vs (b)':>7s} {'best round':>11s} {'vs (b)':>7s} {'steps':>6s}"]
    for key, label in LABELS.items():
        t = timings[key]
        lines.append(f"{label:40s} {t.samples_per_second:10,.0f} {t.samples_per_second / base:6.2f}x "
                     f"{t.best_round:11,.0f} {t.best_round / best:6.2f}x {t.samples // opts.batch:6d}")
    record = {
        "options": dataclasses.asdict(opts),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__},
        "samples_per_second": {k: round(t.samples_per_second, 1) for k, t in timings.items()},
        "ratio_to_" + BASELINE: {k: round(t.samples_per_second / base, 3) for k, t in timings.items()},
        "best_round_ratio_to_" + BASELINE: {k: round(t.best_round / best, 3) for k, t in timings.items()},
        "per_round": {k: [round(r, 1) for r in t.per_round] for k, t in timings.items()},
        "last_loss": {k: round(t.last_loss, 4) for k, t in timings.items()},
    }
    return "\n".join(lines), record


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table, then the JSON line."""
    opts = parse_options(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    with tempfile.TemporaryDirectory(prefix="recmem-bench-") as workdir:
        timings = run_throughput(opts, Path(workdir))
    table, record = report(timings, opts)
    print(table)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
