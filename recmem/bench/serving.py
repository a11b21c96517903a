"""Serving bundles by row format: bytes on disk and in memory, and what quantization costs in AUC.

One single-process training of the configured job (into its own workdir, no MLflow), then one export
per format (fp32, fp16, int8) and a full pass over the validation split with each loaded bundle,
scored as the trainer scores (``recmem/train/metrics.py``). The trainer's own validation AUC is
printed beside them: the fp32 bundle must reproduce it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from recmem.config import Config
from recmem.data.dataset import iter_batches
from recmem.export.job import export_job
from recmem.export.writer import bundle_bytes
from recmem.serving import load_bundle
from recmem.serving.lookup import FORMATS
from recmem.train.local import train_local
from recmem.train.metrics import MetricAccumulator


def score_bundle(folder: Path, cfg: Config) -> dict[str, float]:
    """``valid/auc`` and ``valid/logloss`` of the bundle in ``folder`` over ``cfg``'s validation split."""
    bundle, sparse = load_bundle(folder), list(cfg.data.schema.sparse)
    acc = MetricAccumulator("valid")
    for batch in iter_batches(Path(cfg.data.root), "valid", cfg.data.schema, cfg.data.batch_size, drop_last=False):
        kjt = batch.sparse_features
        logits = bundle.logits(batch.dense_features, [kjt[f].values() for f in sparse],
                               [kjt[f].lengths().to(torch.int64) for f in sparse])
        acc.update(batch, logits)
    return acc.compute()


def run_serving_bench(cfg: Config, workdir: Path, formats: tuple[str, ...] = FORMATS) -> dict[str, Any]:
    """Train ``cfg`` single-process into ``workdir`` (resuming a finished run there), export each
    format and score it.

    Returns:
        ``{"trainer": {"valid/auc", "valid/logloss"}, "formats": [{"format", "bundle_bytes",
        "table_bytes", "valid/auc", "valid/logloss", "export_s"}, ...], "cpu": capability}``.
    """
    cfg = dataclasses.replace(
        cfg, workdir=str(workdir),
        train=dataclasses.replace(cfg.train, precision="fp32", progress=False),
        tracking=dataclasses.replace(cfg.tracking, enabled=False),
        ray=dataclasses.replace(cfg.ray, enabled=False))
    trained = train_local(cfg)
    rows = []
    for fmt in formats:
        start = time.perf_counter()
        folder = export_job(cfg, workdir / "exports", fmt)
        seconds = time.perf_counter() - start
        metrics = score_bundle(folder, cfg)
        manifest = load_bundle(folder).manifest
        rows.append({"format": fmt, "bundle_bytes": bundle_bytes(folder),
                     "table_bytes": sum(t["bytes"] for t in manifest["tables"]),
                     "valid/auc": metrics["valid/auc"], "valid/logloss": metrics["valid/logloss"],
                     "check_max_abs_logit_diff": manifest.get("export_check", {}).get("max_abs_logit_diff"),
                     "export_s": seconds, "folder": str(folder)})
    return {"trainer": {k: trained.metrics[k] for k in ("valid/auc", "valid/logloss")}, "formats": rows,
            "cpu": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def report(name: str, result: dict[str, Any]) -> str:
    """A markdown table of one :func:`run_serving_bench` result."""
    base = result["formats"][0]
    lines = [f"{name} (CPU capability {result['cpu']}, torch {result['torch']}); trainer's own valid AUC "
             f"{result['trainer']['valid/auc']:.5f}, logloss {result['trainer']['valid/logloss']:.5f}",
             "",
             "| format | bundle bytes | table bytes | vs fp32 | valid AUC | AUC - fp32 | logloss | check (max logit diff) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["formats"]:
        lines.append(f"| {r['format']} | {r['bundle_bytes']:,} | {r['table_bytes']:,} | "
                     f"{r['bundle_bytes'] / base['bundle_bytes']:.2f}x | {r['valid/auc']:.5f} | "
                     f"{r['valid/auc'] - base['valid/auc']:+.5f} | {r['valid/logloss']:.5f} | "
                     f"{r['check_max_abs_logit_diff']:.2e} |")
    return "\n".join(lines)
