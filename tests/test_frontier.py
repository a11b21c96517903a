"""The memory/quality frontier (recmem/bench/frontier.py): the quick run end to end through
``recmem frontier --quick`` (bytes measured from the live tables, never from the config; no kind
silently at full size; report, plot and nested MLflow runs), and the targets' verdicts."""

from __future__ import annotations

import json
import math

import mlflow
import pytest

from recmem import cli
from recmem.bench.frontier import Point
from recmem.bench.frontier_kinds import SMALL_FEATURE
from recmem.bench.frontier_report import paired, summarize, table, targets
from recmem.config import SchemaConfig
from recmem.data.stats import load_counts
from recmem.tables.hash import HashTable
from recmem.tables.multihash import MultiHashTable

ALL_KINDS = "full,hash,qr,mixed_dim,optembed,multihash,full_buckets"


@pytest.mark.slow
def test_quick_frontier_measures_every_point(tmp_path, monkeypatch):
    # Measured, not computed: a hash table claiming one byte more than its tensors shows it in every
    # hash point (real bytes are multiples of 4; one hash table per feature of over SMALL_FEATURE
    # IDs); multihash tables claiming 1 GB reach no ratio.
    real = HashTable.memory_bytes
    monkeypatch.setattr(HashTable, "memory_bytes", lambda self: real(self) + 1)
    monkeypatch.setattr(MultiHashTable, "memory_bytes", lambda self: 10**9)
    out, db = tmp_path / "out", f"sqlite:///{tmp_path}/mlflow.db"
    assert cli.main(["frontier", "--config", "jobs/configs/frontier_synthetic.yaml", "--quick", "--out", str(out),
                     "--kinds", ALL_KINDS, f"workdir={tmp_path}", f"tracking.tracking_uri={db}"]) == 0
    points = [Point(**p) for p in json.loads((out / "points.json").read_text())]
    assert {(p.kind, p.ratio) for p in points} == {("full", 1)} | {
        (k, r) for k in ALL_KINDS.split(",")[1:] for r in (1, 16)}
    full = next(p for p in points if p.kind == "full")
    for p in points:
        if p.kind == "optembed":  # two trainings of the point's steps (supernet, retrain), bytes its own
            assert p.trained and p.steps == 12 and p.achieved * 1.05 >= p.ratio
        elif p.kind == "multihash":
            assert not p.trained and p.bytes > 10**9 and "cannot reach" in p.note  # + the small features' full table
        elif p.trained:  # a trained point reached its ratio, by its own measured bytes
            assert p.steps == 6 and p.achieved * 1.05 >= p.ratio and p.achieved == pytest.approx(full.bytes / p.bytes)
            assert not math.isnan(p.oracle_gap) and p.samples_per_second > 0
        else:
            assert "cannot reach" in p.note and p.ratio > 1
    hashed = sum(len(c) > SMALL_FEATURE for c in (load_counts(out / "quick-data", f)[1] for f in SchemaConfig().sparse))
    assert hashed % 4 and all(p.trained and p.bytes % 4 == hashed % 4 for p in points if p.kind == "hash")
    assert any(p.trained and p.ratio == 16 for p in points)
    assert (out / "frontier.png").stat().st_size > 0 and "| mixed_dim | 16x |" in (out / "frontier.md").read_text()
    client = mlflow.MlflowClient(db)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(nested) == sum(p.trained for p in points)
    assert "frontier.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def _point(kind, ratio, auc, achieved=None):
    return Point(kind, ratio, int(1000 / (achieved or ratio)), achieved or ratio, auc, 0.5, 0.01, 1000.0, 10)


def test_targets_pass_and_fail_by_the_numbers():
    points = [_point("full", 1, 0.800), _point("hash", 16, 0.790), _point("qr", 16, 0.7985),
              _point("hash", 64, 0.780), _point("multihash", 64, 0.7895), _point("qr", 64, 0.779),
              _point("multihash", 16, 0.789)]
    lines = targets(points)
    assert lines[0].startswith("PASS at 16x: best qr AUC 0.7985") and "+0.0015" in lines[0]
    assert lines[1].startswith("FAIL at 64x: best multihash AUC 0.7895") and "+0.0105" in lines[1]
    assert "PASS qr vs hash at 16x" in lines[2] and "FAIL qr vs hash at 64x" in lines[3]
    assert "FAIL multihash vs hash at 16x" in lines[4] and "PASS multihash vs hash at 64x" in lines[5]


def test_a_point_trained_longer_does_not_count():
    longer = Point("optembed", 16, 60, 16.7, 0.81, 0.5, 0.0, 1000.0, 20)
    lines = targets([_point("full", 1, 0.8), _point("hash", 16, 0.79), longer])
    assert lines[0] == "NOTE at 16x: optembed (AUC 0.8100) trained 20 steps, not full's 10: not counted"
    assert lines[1].startswith("FAIL at 16x: best hash AUC 0.7900")


def test_a_point_short_of_its_ratio_does_not_count():
    # qr measured at 10x does not stand for 16x; no other kind reached it
    lines = targets([_point("full", 1, 0.8), _point("qr", 16, 0.8, achieved=10.0), _point("hash", 16, 0.7)])
    assert lines[0] == "FAIL at 16x: best hash AUC 0.7000 vs full 0.8000: +0.1000 below it (target: at most 0.002)"
    assert "FAIL qr vs hash at 16x: not both reached it" in lines
    assert targets([_point("hash", 16, 0.7)]) == ["FAIL: no trained full point at 1x, the reference of every target"]


def test_table_shows_unreached_points_without_metrics():
    text = table([_point("full", 1, 0.8), Point("qr", 64, 5000, 0.2, note="cannot reach 64x: ...")], 1000, 10)
    assert "| qr | 64x | 5,000 | 0.2x | - | - | - | - | - | - | - | - | cannot reach 64x: ... |" in text
    assert "| full | 1x | 1,000 | 1.0x | 0.8000 |" in text


def test_a_missing_raw_log_skips_the_dataset(tmp_path, capsys):
    missing = tmp_path / "criteo_kaggle_head10k" / "train_10k.txt"
    assert cli.main(["frontier", "--config", "jobs/configs/criteo_kaggle_10k.yaml", "--quick", f"workdir={tmp_path}",
                     f"data.root={tmp_path}/criteo", f"data.raw.path={missing}"]) == 0
    assert f"{missing}: no such raw log (data.raw.path); dataset skipped" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


def _seeded(kind, ratio, aucs):
    return [Point(kind, ratio, int(1000 / ratio), ratio, auc, 0.5, 0.01, 1000.0, 10, seed=seed)
            for seed, auc in enumerate(aucs)]


def test_seeds_give_mean_spread_and_paired_verdicts():
    points = (_seeded("full", 1, [0.800, 0.801, 0.802]) + _seeded("hash", 16, [0.790, 0.792, 0.791])
              + _seeded("qr", 16, [0.7920, 0.7935, 0.7925]) + _seeded("multihash", 16, [0.7905, 0.7925, 0.7905]))
    hashed = next(g for g in summarize(points) if g.kind == "hash")
    assert (hashed.auc, hashed.std, hashed.low, hashed.high, hashed.seeds) == pytest.approx(
        (0.791, 0.001, 0.790, 0.792, 3))
    # qr - hash per seed: +0.002, +0.0015, +0.0015: mean 0.00167, SE 0.00017 -> beats hash
    mean, se, n = paired(points[6:9], points[3:6])
    assert (mean, se, n) == pytest.approx((0.005 / 3, math.sqrt(1 / 12) * 1e-3 / math.sqrt(3), 3))
    lines = targets(points)
    assert lines[0].startswith("FAIL at 16x: best qr AUC 0.7927 vs full 0.8010") and "+0.0083" in lines[0]
    assert lines[2].startswith("PASS qr vs hash at 16x: 0.7927 vs 0.7910 (+0.0017; paired over 3 seeds")
    # multihash - hash: +0.0005, +0.0005, -0.0005: mean 0.00017 < 2 SE (0.00067): within the noise
    assert lines[3].startswith("FAIL multihash vs hash at 16x") and "needs > 0.0007" in lines[3]
    assert "| hash | 16x | 62 | 16.0x | 0.7910 | 0.0010 | 0.7900-0.7920 |" in table(points, 1000, 10)


def test_a_paired_verdict_uses_only_seeds_both_trained():
    mine = _seeded("qr", 4, [0.80, 0.81, math.nan])
    assert paired(mine, _seeded("hash", 4, [0.79, 0.80])) == pytest.approx((0.01, 0.0, 2))
    assert paired(_seeded("qr", 4, [0.8]), _seeded("hash", 4, [0.7]))[2] == 1


@pytest.mark.parametrize("seeds", ["0", "1,1", "a", "-1,2"])
def test_bad_seeds_are_refused(seeds, capsys):
    assert cli.main(["frontier", "--config", "jobs/configs/frontier_synthetic.yaml", f"--seeds={seeds}"]) == 2
    assert "--seeds" in capsys.readouterr().err


@pytest.mark.parametrize("multihash", ["0:sum", "2:max", "two:concat", "2"])
def test_bad_multihash_is_refused(multihash, capsys):
    assert cli.main(["frontier", "--config", "jobs/configs/frontier_synthetic.yaml", f"--multihash={multihash}"]) == 2
    assert "--multihash" in capsys.readouterr().err


def test_multihash_concat_buys_more_rows_at_the_same_bytes(tmp_path):
    # Under concat each of the k rows is D / k wide, so the same bytes hold nearly k times the rows
    # (a row's Adagrad state is one float whatever its width); the output stays D wide either way.
    from recmem.bench.frontier_kinds import Budget, measurer, size_multihash
    from recmem.config import load_config
    from tests.conftest import small_schema, tiny_overrides, write_learnable_root

    root = write_learnable_root(tmp_path / "data", small_schema(), rows=4000, valid=500, vocab=3000)
    cfg = load_config(None, tiny_overrides(root, tmp_path))  # D = 8: rows of 36 bytes, under concat of 2 of 20
    measure = measurer(cfg)
    full_bytes = measure(cfg.model.tables)
    sizings = {how: size_multihash(Budget(cfg, full_bytes, 4.0, measure, how)) for how in ((2, "sum"), (2, "concat"))}
    for (k, combine), sizing in sizings.items():
        assert sizing.bytes <= full_bytes / 4 * 1.05 and f"num_hashes={k}, combine={combine}" in sizing.note
        (block,) = [b for b in sizing.blocks if b.kind == "multihash"]
        assert block.options["num_hashes"] == k and block.options["combine"] == combine
        assert block.embedding_dim == (4 if combine == "concat" else 8)
    rows = {how: 1 / s.blocks[-1].options["compression"] for how, s in sizings.items()}
    assert 1.6 < rows[2, "concat"] / rows[2, "sum"] < 1.9
