"""Online training figures (issue 13): online against a frozen model, and landing-to-serving freshness.

    recmem generate --config jobs/configs/online.yaml        # once (the job generates it when missing)
    python jobs/online.py --config jobs/configs/online.yaml --mode frozen --json runs/online_frozen.json
    python jobs/online.py --config jobs/configs/online.yaml --mode freshness --max-files 20 --land-every-s 2
    python jobs/online.py --config jobs/configs/online.yaml --mode freshness ray.num_workers=2 ray.cpus_per_worker=1
    python jobs/online.py --config jobs/configs/online_criteo.yaml --mode frozen --file-rows 500 --warmup-files 2

What each mode measures: ``recmem/bench/online.py``. Prints the summary as JSON (and writes it to
``--json``). ``key=value`` overrides apply to the config.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from recmem.bench.online import OnlineBenchOptions, compare_frozen, freshness
from recmem.config import load_config


def main(argv: list[str] | None = None) -> None:
    """Parse the flags, generate the synthetic data if missing, measure, print the summary."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the job (jobs/configs/online.yaml)")
    p.add_argument("--mode", choices=["frozen", "freshness"], required=True)
    p.add_argument("--out", default="runs/bench_online", help="the benchmark's folder (emptied first)")
    p.add_argument("--file-rows", type=int, default=5000, help="rows per landed file")
    p.add_argument("--warmup-files", type=int, default=3, help="frozen: windows trained before the copy is frozen")
    p.add_argument("--max-files", type=int, default=0, help="files to land (0: the whole split; freshness: 20)")
    p.add_argument("--land-every-s", type=float, default=2.0, help="freshness: seconds between files")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", help="also write the summary here")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    if not (Path(cfg.data.root) / "train").is_dir():
        from recmem.data.synthetic import generate

        generate(cfg.data.synthetic, cfg.data.schema, Path(cfg.data.root), progress=False)
    opts = OnlineBenchOptions(args.config, args.overrides, args.out, args.file_rows, args.warmup_files,
                              args.max_files, args.land_every_s)
    summary = (compare_frozen if args.mode == "frozen" else freshness)(opts, say=print)
    summary["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
