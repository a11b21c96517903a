"""The training-throughput benchmark's output: the machine line, the variants' table, the step phases,
and one JSON record with every number (``jobs/bench_train.py`` prints them)."""

from __future__ import annotations

import dataclasses
import platform
from typing import Any

import torch

from recmem.bench.phases import PHASES
from recmem.bench.throughput import Measured, ThroughputOptions
from recmem.config import TrainConfig
from recmem.train.device import dense_precision

BASELINE = "torchrec_dmp"
"""The variant every ratio is taken to."""
LABELS = {
    "recmem_fp32": "(a)  recmem, pre-collated, fp32",
    "recmem_bf16": "(a') recmem, pre-collated, bf16 dense",
    "torchrec_dmp": "(b)  torchrec DLRM + DMP (fused TBE)",
    "torchrec_naive": "(c)  torchrec DLRM, unsharded EBC",
    "dense_fp32": "(d)  dense part alone, fp32",
    "dense_bf16": "(d') dense part alone, bf16",
    "recmem_parquet_fp32": "(e)  recmem from Parquet, fp32",
    "parquet_pipeline": "(e') Parquet -> Batch alone",
    "torchrec_fused_recmem_dense": "(f)  torchrec fused EBC + recmem dense",
    "torchrec_fused": "(g)  torchrec DLRM, fused EBC, no DMP",
    "recmem_torchrec_interaction": "(h)  recmem, torchrec InteractionArch",
}
"""Each variant's row label, in table order (the letters of earlier runs kept)."""


def machine() -> dict[str, Any]:
    """What the figures depend on: CPU capability, native bf16, threads, torch."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
        "amx": torch.cpu._is_amx_tile_supported(),
        "auto_precision": dense_precision(TrainConfig(precision="auto"), torch.device("cpu")),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def machine_line(m: dict[str, Any]) -> str:
    """The machine as one line, printed above the table."""
    yes = {True: "yes", False: "no"}
    return (f"cpu capability {m['cpu_capability']}, oneDNN bf16 {yes[m['onednn_bf16']]} "
            f"(AVX512-BF16 {yes[m['avx512_bf16']]}, AMX {yes[m['amx']]}; train.precision=auto takes "
            f"{m['auto_precision']}), torch threads {m['threads']}, torch {m['torch']}")


def variants_table(measured: Measured, opts: ThroughputOptions) -> list[str]:
    """samples/s of every variant and its ratio to :data:`BASELINE`, overall and in its best round."""
    timings = measured.timings
    base, best = timings[BASELINE].samples_per_second, timings[BASELINE].best_round
    lines = [f"{'variant':42s} {'samples/s':>10s} {'vs (b)':>7s} {'best round':>11s} {'vs (b)':>7s} {'steps':>6s}"]
    for key, label in LABELS.items():
        t = timings[key]
        lines.append(f"{label:42s} {t.samples_per_second:10,.0f} {t.samples_per_second / base:6.2f}x "
                     f"{t.best_round:11,.0f} {t.best_round / best:6.2f}x {t.samples // opts.batch:6d}")
    return lines


def phases_table(measured: Measured) -> list[str]:
    """ms per step of each phase of recmem's step, per precision, their sum and a whole step."""
    ms = {name: p.per_step_ms() for name, p in measured.phases.items()}
    steps = ", ".join(f"{p.steps} {name}" for name, p in measured.phases.items())
    lines = [f"recmem's step by phase, ms per step ({steps} steps; a whole step after each phased one):",
             f"{'phase':24s}" + "".join(f"{name:>9s}" for name in ms)]
    for phase in (*PHASES, "sum", "whole"):
        label = {"sum": "sum of the phases", "whole": "whole step"}.get(phase, phase)
        lines.append(f"{label:24s}" + "".join(f"{m[phase]:9.1f}" for m in ms.values()))
    return lines


def report(measured: Measured, opts: ThroughputOptions) -> tuple[str, dict[str, Any]]:
    """The readable output (machine line, variants, phases) and the JSON record of one run."""
    timings, m = measured.timings, machine()
    base, best = timings[BASELINE].samples_per_second, timings[BASELINE].best_round
    text = "\n".join([machine_line(m), *variants_table(measured, opts), "", *phases_table(measured)])
    record = {
        "options": dataclasses.asdict(opts),
        "machine": m,
        "samples_per_second": {k: round(t.samples_per_second, 1) for k, t in timings.items()},
        "ratio_to_" + BASELINE: {k: round(t.samples_per_second / base, 3) for k, t in timings.items()},
        "best_round_ratio_to_" + BASELINE: {k: round(t.best_round / best, 3) for k, t in timings.items()},
        "per_round": {k: [round(r, 1) for r in t.per_round] for k, t in timings.items()},
        "last_loss": {k: round(t.last_loss, 4) for k, t in timings.items()},
        "phases_ms": {k: {n: round(v, 2) for n, v in p.per_step_ms().items()} for k, p in measured.phases.items()},
        "phase_steps": {k: p.steps for k, p in measured.phases.items()},
    }
    return text, record
