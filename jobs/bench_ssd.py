"""SSD-offloaded tables: the same DLRM with its tables in RAM, on disk, and on disk with prefetch.

    python jobs/bench_ssd.py                  # 26 tables x 800k rows (20.8M rows x dim 16), cache 10%, batch 4096
    python jobs/bench_ssd.py --quick          # tiny sizes, seconds (the smoke test)
    python jobs/bench_ssd.py --rows 200000 --folder /mnt/nvme/tmp
    python jobs/bench_ssd.py --formats        # the row formats compared: recmem's block file, LMDB, RocksDB
    python jobs/bench_ssd.py --cache-fraction 0.75 --warmup-seconds 600   # a cache where the misses allow 0.7x of RAM
    python jobs/bench_ssd.py --io-depth 0     # reads by a pool of threads instead of kernel AIO

Needs rows x tables x (dim + 1) x 4 bytes free under --folder (the system's temporary folder by default;
~1.4 GB at the defaults), and as much again for the log of rows written back. Prints the CPU's
capability, the disk's random-read rate, samples/s, hit rates, misses per step and prefetch wait of each
variant, the targets, peak RSS, then one JSON line. What is measured how: ``recmem/bench/ssd.py`` (and
``recmem/bench/ssd_formats.py`` for ``--formats``, whose peers need ``pip install lmdb rocksdict``: they
are not recmem dependencies).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from recmem.bench.ssd import QUICK, SSDBenchOptions, report, run_ssd_bench
from recmem.bench.ssd_formats import QUICK_FORMATS, FormatOptions, compare_formats


def parse_options(argv: list[str] | None = None) -> tuple[SSDBenchOptions, FormatOptions | None]:
    """Flags over the defaults (or over the ``--quick`` sizes); the format comparison's sizes with
    ``--formats``, else None."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="What each option means: SSDBenchOptions in recmem/bench/ssd.py.")
    p.add_argument("--quick", action="store_true", help="tiny sizes that run in seconds")
    p.add_argument("--formats", action="store_true",
                   help="compare row formats instead (FormatOptions' sizes; --quick: 20k rows)")
    for f in dataclasses.fields(SSDBenchOptions):
        kind = type(f.default)
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind,
                       help=f"default {f.default!r} ({getattr(QUICK, f.name)!r} with --quick)")
    args = vars(p.parse_args(argv))
    quick = args.pop("quick")
    formats = (QUICK_FORMATS if quick else FormatOptions()) if args.pop("formats") else None
    base = QUICK if quick else SSDBenchOptions()
    return dataclasses.replace(base, **{k: v for k, v in args.items() if v is not None}), formats


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the report, then the JSON line."""
    opts, formats = parse_options(argv)
    if formats is not None:
        rates = compare_formats(formats, opts.folder)
        for name, rate in rates.items():
            print(f"{name:<8} {rate:,.0f} rows/s" if isinstance(rate, float) else f"{name:<8} {rate}")
        print(json.dumps({"formats": rates, "options": dataclasses.asdict(formats)}))
        return
    text, record = report(run_ssd_bench(opts), opts)
    print(text)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
