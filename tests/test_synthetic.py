"""The synthetic generator: layout, determinism, time order, ID drift, realism of its ground truth."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from recmem.config import ConfigError, SchemaConfig, SyntheticConfig
from recmem.data.synthetic import build_truth, generate, scaled_cardinalities
from recmem.data.synthetic.ids import mix_ids
from recmem.data.synthetic.oracle import OracleMeter

SCHEMA = SchemaConfig()
DAY = 86_400
# Big enough for AUCs to +-0.005 and for a day of data to hold ~17k rows; generates in about a second.
SAMPLE = SyntheticConfig(train_rows=100_000, valid_rows=20_000, chunk_rows=40_000)


def _read(root: Path, split: str) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted((root / split).glob("part-*.parquet")))


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synthetic")
    return root, generate(SAMPLE, SCHEMA, root, progress=False)


def test_layout_columns_and_dtypes(sample: tuple[Path, dict]) -> None:
    root, summary = sample
    parts = sorted(p.name for p in (root / "train").iterdir())
    assert parts == [f"part-{i:05d}.parquet" for i in range(3)]
    assert (root / "stats" / "summary.json").is_file()
    assert json.loads((root / "synthetic.json").read_text())["summary"]["train/rows"] == 100_000
    table = _read(root, "train")
    expected = [SCHEMA.label, *SCHEMA.dense, *SCHEMA.sparse, SCHEMA.event_time, SCHEMA.true_prob]
    assert table.column_names == expected
    types = {name: table.schema.field(name).type for name in expected}
    assert {types[n] for n in [SCHEMA.label, *SCHEMA.dense, SCHEMA.true_prob]} == {pa.float32()}
    assert {types[n] for n in [*SCHEMA.sparse, SCHEMA.event_time]} == {pa.int64()}
    cols = {n: table.column(n).to_numpy() for n in expected}
    assert set(np.unique(cols[SCHEMA.label])) == {0.0, 1.0}
    dense = np.stack([cols[n] for n in SCHEMA.dense])
    assert np.isfinite(dense).all() and dense.min() == 0.0 and dense.max() < 30.0
    prob = cols[SCHEMA.true_prob]
    assert 0.0 < prob.min() and prob.max() < 1.0
    assert summary["train/rows"] == len(prob)
    assert summary["train/positive_rate"] == pytest.approx(cols[SCHEMA.label].mean())


def test_raw_ids_look_random_and_never_cross_fields(sample: tuple[Path, dict]) -> None:
    table = _read(sample[0], "train")
    per_field = [np.unique(table.column(n).to_numpy()) for n in SCHEMA.sparse]
    everything = np.concatenate(per_field)
    assert everything.min() >= 0
    assert len(np.unique(everything)) == len(everything)
    # Spread over 63 bits, not small consecutive integers.
    assert np.median(everything) > 2**58
    assert all(np.diff(ids).min() > 1 for ids in per_field if len(ids) > 1)


@settings(max_examples=50, deadline=None)
@given(
    st.sets(st.tuples(st.integers(0, 40), st.integers(0, 2**40 - 1)), min_size=1, max_size=200),
    st.integers(0, 2**63 - 1),
)
def test_mix_ids_is_injective(pairs: set[tuple[int, int]], key: int) -> None:
    pairs_list = sorted(pairs)
    out = np.concatenate([mix_ids(f, np.array([i], dtype=np.int64), key) for f, i in pairs_list])
    assert (out >= 0).all()
    assert len(np.unique(out)) == len(pairs_list)


def test_rows_are_time_ordered_and_valid_comes_last(sample: tuple[Path, dict]) -> None:
    root, _ = sample
    train = _read(root, "train").column(SCHEMA.event_time).to_numpy()
    valid = _read(root, "valid").column(SCHEMA.event_time).to_numpy()
    assert (np.diff(train) >= 0).all() and (np.diff(valid) >= 0).all()
    assert valid.min() >= train.max()
    assert train.min() >= SAMPLE.start_time
    assert valid.max() < SAMPLE.start_time + SAMPLE.num_days * DAY
    # The log spans every day, not a burst at one end.
    days = (np.concatenate([train, valid]) - SAMPLE.start_time) // DAY
    assert np.bincount(days).min() > 0.5 * len(days) / SAMPLE.num_days


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    cfg = dataclasses.replace(SAMPLE, train_rows=6_000, valid_rows=2_000, chunk_rows=2_500)
    a, b, c = (tmp_path / name for name in "abc")
    generate(cfg, SCHEMA, a, progress=False)
    generate(cfg, SCHEMA, b, progress=False)
    generate(dataclasses.replace(cfg, seed=1), SCHEMA, c, progress=False)
    parts = sorted(p.relative_to(a) for p in a.glob("*/part-*.parquet"))
    assert len(parts) == 4
    assert all((a / p).read_bytes() == (b / p).read_bytes() for p in parts)
    first_a, first_c = _read(a, "train"), _read(c, "train")
    assert not first_a.equals(first_c)
    assert np.intersect1d(first_a.column("C3").to_numpy(), first_c.column("C3").to_numpy()).size == 0


def test_rerun_with_fewer_rows_leaves_no_stale_parts(tmp_path: Path) -> None:
    cfg = dataclasses.replace(SAMPLE, train_rows=3_000, valid_rows=1_000, chunk_rows=1_000)
    generate(cfg, SCHEMA, tmp_path, progress=False)
    generate(dataclasses.replace(cfg, train_rows=1_500), SCHEMA, tmp_path, progress=False)
    assert len(list((tmp_path / "train").glob("part-*.parquet"))) == 2
    assert _read(tmp_path, "train").num_rows == 1_500


def test_ids_drift_tail_turns_over_head_stays(sample: tuple[Path, dict]) -> None:
    root, _ = sample
    table = pa.concat_tables([_read(root, "train"), _read(root, "valid")])
    day = (table.column(SCHEMA.event_time).to_numpy() - SAMPLE.start_time) // DAY
    sizes = scaled_cardinalities(SAMPLE)
    tail_fields = [n for n, size in zip(SCHEMA.sparse, sizes) if size > 100_000]
    assert len(tail_fields) >= 4
    for name in tail_fields:
        ids = table.column(name).to_numpy()
        daily = [np.unique(ids[day == d]) for d in range(SAMPLE.num_days)]
        first, last = daily[0], daily[-1]
        jaccard = len(np.intersect1d(first, last)) / len(np.union1d(first, last))
        assert jaccard < 0.2, (name, jaccard)
        seen = first
        for today in daily[1:]:
            assert np.setdiff1d(today, seen).size > 0.3 * today.size, name  # new IDs keep coming
            seen = np.union1d(seen, today)
        # Live IDs per day plateau while the IDs ever seen keep growing: what TTL expiry relies on.
        counts = np.array([d.size for d in daily])
        assert counts.max() < 1.5 * counts.min(), (name, counts)
        assert seen.size > 3.5 * counts.mean(), name
        # Popular IDs are long-lived: the first day's 10 most frequent are still there on the last.
        values, freq = np.unique(ids[day == 0], return_counts=True)
        assert np.isin(values[np.argsort(freq)[-10:]], last).mean() >= 0.8, name


def test_realism_positive_rate_and_oracle(sample: tuple[Path, dict]) -> None:
    _, summary = sample
    for split in ("train", "valid"):
        assert 0.22 <= summary[f"{split}/positive_rate"] <= 0.28
        assert abs(summary[f"{split}/mean_true_prob"] - summary[f"{split}/positive_rate"]) < 0.01
    assert 0.78 <= summary["valid/oracle_auc"] <= 0.82
    assert summary["valid/oracle_logloss"] < 0.50


def _logistic_regression_auc(root: Path) -> float:
    """Valid AUC of an L2 logistic regression on one-hot IDs (train vocabulary) + standardised dense."""
    train, valid = _read(root, "train"), _read(root, "valid")
    vocab = {n: np.unique(train.column(n).to_numpy()) for n in SCHEMA.sparse}
    dense = np.stack([train.column(n).to_numpy() for n in SCHEMA.dense], axis=1)
    mean, std = dense.mean(axis=0), dense.std(axis=0) + 1e-6

    def design(table: pa.Table) -> sp.csr_matrix:
        rows = np.arange(table.num_rows)
        blocks = []
        for name, ids in vocab.items():
            raw = table.column(name).to_numpy()
            pos = np.minimum(np.searchsorted(ids, raw), len(ids) - 1)
            hit = ids[pos] == raw
            one_hot = (np.ones(hit.sum()), (rows[hit], pos[hit]))
            blocks.append(sp.csr_matrix(one_hot, shape=(len(rows), len(ids))))
        x = np.stack([table.column(n).to_numpy() for n in SCHEMA.dense], axis=1)
        return sp.hstack([*blocks, sp.csr_matrix((x - mean) / std)]).tocsr()

    labels = train.column(SCHEMA.label).to_numpy()
    model = LogisticRegression(C=0.1, max_iter=300).fit(design(train), labels)
    return roc_auc_score(valid.column(SCHEMA.label).to_numpy(), model.decision_function(design(valid)))


@pytest.mark.slow
def test_interactions_matter_logistic_regression_lags_the_oracle(
    sample: tuple[Path, dict], tmp_path: Path
) -> None:
    root, summary = sample
    assert summary["valid/oracle_auc"] - _logistic_regression_auc(root) >= 0.03
    # Control: without interactions the same regression comes close to its oracle, so the gap above
    # measures the interactions, not a badly fitted regression.
    flat = dataclasses.replace(SAMPLE, interaction_std=0.0, dense_interaction_std=0.0)
    flat_summary = generate(flat, SCHEMA, tmp_path, progress=False)
    assert flat_summary["valid/oracle_auc"] - _logistic_regression_auc(tmp_path) < 0.02


@pytest.mark.parametrize("seed", [0, 3])
def test_logit_terms_have_the_configured_spread_whatever_the_seed(seed: int) -> None:
    cfg = dataclasses.replace(SAMPLE, seed=seed)
    truth = build_truth(cfg)
    rng = np.random.default_rng(123)
    rows = truth.draw(rng, rng.uniform(0.0, cfg.num_days, 20_000))
    terms = truth.components(rows.index, rows.standard)
    np.testing.assert_allclose(truth.bias + sum(terms.values()), rows.logit, atol=1e-4)
    configured = {
        "first_order": cfg.first_order_std,
        "interaction": cfg.interaction_std,
        "dense": cfg.dense_std,
        "dense_interaction": cfg.dense_interaction_std,
    }
    for name, std in configured.items():
        assert terms[name].std() == pytest.approx(std, rel=0.1), name
    # Pure interactions: the pairwise term is uncorrelated with the first-order one.
    assert abs(np.corrcoef(terms["interaction"], terms["first_order"])[0, 1]) < 0.1


def test_rare_ids_carry_weak_effects() -> None:
    truth = build_truth(SyntheticConfig(train_rows=1, valid_rows=0))
    big = max(range(len(truth.fields)), key=lambda f: truth.fields[f].ids.num_ids)
    field = truth.fields[big]
    share = field.ids.share(SyntheticConfig().num_days)
    head, tail = share > 1e-2, share < 1e-5
    assert head.any() and tail.sum() > 0.5 * field.ids.num_ids
    assert np.abs(field.weight[tail]).mean() < 0.01 * np.abs(field.weight[head]).mean()


def test_oracle_meter_matches_exact_auc_and_logloss() -> None:
    rng = np.random.default_rng(0)
    prob = rng.beta(1.0, 3.0, 50_000).astype(np.float32)
    label = (rng.random(50_000) < prob).astype(np.float32)
    meter = OracleMeter()
    for lo in range(0, 50_000, 7_000):
        meter.update(prob[lo : lo + 7_000], label[lo : lo + 7_000])
    out = meter.summary("valid")
    assert out["valid/rows"] == 50_000
    assert out["valid/oracle_auc"] == pytest.approx(roc_auc_score(label, prob), abs=1e-4)
    p = prob.astype(np.float64)
    exact = -np.mean(label * np.log(p) + (1 - label) * np.log1p(-p))
    assert out["valid/oracle_logloss"] == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize(
    "change",
    [{"cardinalities": [10, 20]}, {"dense_missing": [0.1]}, {"positive_rate": 1.5}, {"chunk_rows": 0}],
)
def test_bad_config_is_rejected_naming_the_key(change: dict, tmp_path: Path) -> None:
    cfg = dataclasses.replace(SAMPLE, **change)
    with pytest.raises(ConfigError, match="data\\.synthetic\\."):
        generate(cfg, SCHEMA, tmp_path, progress=False)
    assert not (tmp_path / "train").exists()
