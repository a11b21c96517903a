"""The generator's per-ID effects counted in training rows (``effect_half_rows``,
``interaction_half_rows``): tail IDs keep their own effects, so hashing a field's IDs into fewer rows
costs AUC (what the issue 11 frontier needs to tell `hash`, `qr` and `multihash` apart)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from recmem.config import SyntheticConfig
from recmem.data.synthetic import build_truth
from recmem.data.synthetic.truth import FieldEffects, GroundTruth, half_points

DEFAULT = SyntheticConfig(train_rows=2_000_000, valid_rows=0)
PER_ID = dataclasses.replace(DEFAULT, effect_half_rows=50.0, interaction_half_rows=50.0)


@pytest.fixture(scope="module")
def truths() -> dict[str, GroundTruth]:
    return {"default": build_truth(DEFAULT), "per_id": build_truth(PER_ID)}


def test_half_points_are_rows_over_training_rows_or_the_shares():
    assert half_points(DEFAULT) == (0.03, 0.03)
    assert half_points(dataclasses.replace(DEFAULT, effect_half_rows=50.0)) == (2.5e-5, 0.03)
    assert half_points(dataclasses.replace(DEFAULT, interaction_half_rows=20.0, train_rows=1000)) == (0.03, 0.02)


def test_a_seed_reproduces_the_effects(truths):
    again = build_truth(PER_ID)
    for mine, other in zip(truths["per_id"].fields, again.fields):
        np.testing.assert_array_equal(mine.packed, other.packed)
    assert truths["per_id"].bias == again.bias


def test_tail_ids_keep_their_own_effects(truths):
    big = max(range(len(DEFAULT.cardinalities)), key=lambda f: truths["per_id"].fields[f].ids.num_ids)
    for name, tail_over_head in (("per_id", (0.3, 1.0)), ("default", (0.0, 0.01))):
        field = truths[name].fields[big]
        rows = field.ids.share(DEFAULT.num_days) * DEFAULT.train_rows  # expected training rows per ID
        head, tail = rows > 20_000, (rows > 50) & (rows < 200)
        assert head.sum() > 3 and tail.sum() > 500
        low, high = tail_over_head
        ratio = np.abs(field.weight[tail]).mean() / np.abs(field.weight[head]).mean()
        assert low < ratio < high, (name, ratio)
        if name == "per_id":  # every tail ID its own, non-zero effect and latent vector
            assert np.all(field.weight[tail] != 0) and np.all(np.abs(field.latent[tail]).sum(axis=1) > 0)


def _hashed(truth: GroundTruth, ratio: int, num_days: float) -> GroundTruth:
    """The truth as the best table of ceil(M / ratio) rows per field (M > 200 IDs) holds it: each row
    the usage-weighted mean effect of the IDs hashed into it."""
    fields = []
    for f in truth.fields:
        if f.ids.num_ids <= 200:
            fields.append(f)
            continue
        rows = -(-f.ids.num_ids // ratio)
        row, share = f.ids.raw_ids % rows, f.ids.share(num_days)
        usage = np.maximum(np.bincount(row, share, rows), 1e-30)

        def mean(x: np.ndarray) -> np.ndarray:
            return (np.bincount(row, share * x, rows) / usage)[row].astype(np.float32)

        latent = np.stack([mean(f.latent[:, k]) for k in range(f.latent.shape[1])], axis=1)
        fields.append(FieldEffects.pack(f.ids, mean(f.weight), latent))
    return dataclasses.replace(truth, fields=fields)


def test_collisions_cost_auc_only_with_per_id_effects(truths):
    rng = np.random.default_rng(1)
    losses = {}
    for name, truth in truths.items():
        rows = truth.draw(rng, rng.uniform(0.0, DEFAULT.num_days, 100_000))
        prob = 1.0 / (1.0 + np.exp(-(truth.bias + truth.logit_terms(rows.index, rows.standard))))
        label = rng.random(len(prob)) < prob
        hashed = _hashed(truth, 16, DEFAULT.num_days)
        oracle = roc_auc_score(label, prob)
        assert oracle > 0.78, (name, oracle)
        losses[name] = oracle - roc_auc_score(label, hashed.logit_terms(rows.index, rows.standard))
    assert losses["per_id"] > 0.008 and losses["default"] < 0.006, losses
