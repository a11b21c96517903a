"""`optembed` in the memory/quality frontier (``frontier_kinds.FRONTIER_KINDS``): its size rule and
its training in three phases (``recmem/train/optembed.py``).

Its retrained tables' bytes are known only after the supernet has pruned and the search has chosen
widths, so sizing fixes what can be fixed before: the smallest ``min_count`` of 1, 2, 4, ... whose
vocabulary fits the target with every row kept at width 1 (measured: the compact table of that plan
is built), and ``options.max_bytes`` = the target (with the frontier's overshoot), which the search
holds every candidate to. The
point's bytes are the retrained tables' own, measured after training. Both phases that train take
the point's full step budget, so a point reports twice the steps of the others (plus the search's
validation passes, :data:`SEARCH`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from recmem.config import Config, TableConfig

SEARCH = {"population": 10, "top_k": 5, "mutations": 5, "crossovers": 5, "iterations": 5, "search_batches": 20}
"""The frontier's search: 35 candidates, each scored on 20 validation batches (the paper's 20 per
generation over 30 generations would cost more than the two trainings together)."""


def _all_kept_at_width_one(budget, min_count: int, folder: Path) -> list[TableConfig]:
    """The compact block of a plan keeping every ID seen ``min_count`` times, at width 1."""
    from recmem.data.stats import load_counts
    from recmem.tables.optembed import Plan

    schema, root = budget.cfg.data.schema, Path(budget.cfg.data.root)
    keys = []
    for f in schema.sparse:
        ids, counts = load_counts(root, f)
        keys.append(torch.as_tensor(ids[counts >= min_count].copy()))
    path = folder / f"width1-min{min_count}.pt"
    if not path.is_file():
        Plan(list(schema.sparse), budget.base.embedding_dim, [1] * len(schema.sparse), keys,
             [True] * len(schema.sparse)).save(path)
    return [budget.block("optembed", options={"plan": str(path)})]


def size_optembed(budget):
    """``frontier_kinds`` size function of `optembed` (see the module docstring)."""
    from recmem.bench.frontier_kinds import OVERSHOOT, Sizing, _min_count_ladder

    folder = Path(tempfile.mkdtemp(prefix="recmem-frontier-optembed-"))
    for m in _min_count_ladder(budget):
        least = budget.measure(_all_kept_at_width_one(budget, m, folder))
        if least <= budget.target * OVERSHOOT:
            limit = int(budget.target * OVERSHOOT)  # at least ``least``: width 1 is always allowed
            options = {"min_count": m, "max_bytes": limit, **SEARCH}
            return Sizing([budget.block("optembed", options=options)], least,
                          f"min_count={m}, max_bytes={limit:,} (every row kept at width 1: {least:,} bytes)")
    return Sizing(None, least, f"cannot reach {budget.ratio:g}x: even with no vocabulary its table at width 1 "
                               f"takes {least:,} bytes")


def train_optembed(cfg: Config):
    """``frontier_kinds`` train function of `optembed`: ``recmem optembed`` on the point's job; the
    retrained model's metrics and speed, the steps of both trainings."""
    from recmem.bench.frontier_kinds import PointRun
    from recmem.train.optembed import run_optembed

    result = run_optembed(cfg)
    metrics = {**result.retrain.metrics, "optembed/supernet_auc": result.supernet.metrics.get("valid/auc", 0.0),
               "optembed/supernet_samples_per_second": result.supernet.samples_per_second}
    return PointRun(metrics, result.supernet.step + result.retrain.step, result.retrain.samples_per_second)
