"""A collisionless table inside the training loop: TTL eviction in data time keeps live rows bounded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recmem.train.local import train_local
from tests.conftest import small_schema, tiny_config

DAYS, ROWS_PER_DAY, FRESH_PER_DAY, LASTING = 8, 1000, 30, 10
DAY = 86_400


def write_drifting_root(root: Path, seed: int = 0) -> Path:
    """Train on days 0..DAYS-1, validate on day DAYS. Each field has LASTING IDs that live throughout
    and FRESH_PER_DAY IDs that live for one day only; labels follow per-ID effects."""
    schema = small_schema()
    rng = np.random.default_rng(seed)
    n = (DAYS + 1) * ROWS_PER_DAY
    day = np.repeat(np.arange(DAYS + 1), ROWS_PER_DAY)
    cols: dict[str, np.ndarray] = {"event_time": day * DAY + rng.integers(0, DAY, n)}
    logit = np.full(n, -1.0)
    for f in schema.sparse:
        pool = rng.integers(-2**62, 2**62, size=LASTING + (DAYS + 1) * FRESH_PER_DAY)
        effect = rng.normal(0.0, 1.0, size=pool.size)
        lasting = rng.random(n) < 0.5
        fresh = LASTING + day * FRESH_PER_DAY + rng.integers(0, FRESH_PER_DAY, n)  # today's IDs only
        pick = np.where(lasting, rng.integers(0, LASTING, n), fresh)
        cols[f] = pool[pick]
        logit += effect[pick]
    for f in schema.dense:
        cols[f] = rng.random(n).astype(np.float32)
    prob = 1.0 / (1.0 + np.exp(-logit))
    cols["label"] = (rng.random(n) < prob).astype(np.float32)
    cols["true_prob"] = prob.astype(np.float32)
    order = np.argsort(cols["event_time"], kind="stable")
    table = pa.table({k: v[order] for k, v in cols.items()})
    split = DAYS * ROWS_PER_DAY
    for name, part in (("train", table.slice(0, split)), ("valid", table.slice(split))):
        (root / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(part, root / name / "part-00000.parquet", row_group_size=1000)
    return root


@pytest.fixture(scope="module")
def drifting_root(tmp_path_factory) -> Path:
    return write_drifting_root(tmp_path_factory.mktemp("drift"))


def run(root: Path, workdir: Path, ttl: str):
    return train_local(tiny_config(
        root, workdir, "model.tables.0.kind=collisionless", f"model.tables.0.options.ttl={ttl}",
        "model.tables.0.options.initial_rows=16", "model.tables.0.options.capacity=4096",
        "train.evict_every=2", "train.eval_every=4", "tracking.enabled=false",
    ))


def test_ttl_keeps_live_rows_bounded_while_the_model_learns(drifting_root, tmp_path):
    features = len(small_schema().sparse)
    # Live at any time: the lasting IDs, the fresh ones of the last TTL (one day) and of the day in
    # progress, plus those of the day before that until the next sweep (every 2 batches of 256 rows).
    bound = features * (LASTING + 3 * FRESH_PER_DAY)
    every_id = features * (LASTING + DAYS * FRESH_PER_DAY)

    kept = run(drifting_root, tmp_path / "no_ttl", "null")
    expired = run(drifting_root, tmp_path / "ttl", str(DAY))

    live_kept = [h["tables/0/rows_live"] for h in kept.history if "tables/0/rows_live" in h]
    live_expired = [h["tables/0/rows_live"] for h in expired.history if "tables/0/rows_live" in h]
    assert live_kept[-1] > 0.9 * every_id > bound, "without TTL every ID seen keeps its row"
    assert len(live_expired) >= 5 and max(live_expired) <= bound
    assert expired.metrics["tables/0/expired"] > every_id - bound
    assert expired.metrics["tables/0/rows_allocated"] < kept.metrics["tables/0/rows_allocated"]
    assert expired.metrics["valid/auc"] > 0.65, expired.metrics
    assert expired.metrics["valid/auc"] > kept.metrics["valid/auc"] - 0.02
