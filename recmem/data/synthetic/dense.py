"""Dense features of synthetic rows: Criteo-like counts, log-transformed, some missing.

Each dense feature is a count ``floor(exp(mu + sigma * N(0, 1)))`` (heavy-tailed and integer, like
Criteo's I1..I13), written as ``log(1 + count)``; a missing value is written as 0, the same as DLRM's
preprocessing does for Criteo's empty fields.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DenseModel:
    """The dense features' distribution and their effects on the logit.

    Attributes:
        missing: [D] probability that each feature is missing.
        mu: [D] log-scale location of each count.
        sigma: [D] log-scale spread of each count.
        mean: [D] mean of each transformed feature (standardises it for the effects).
        std: [D] standard deviation of each transformed feature.
        weight: [D] linear effect of each standardised feature.
        project: [D, K] map from standardised features to the latent space of the sparse IDs.
    """

    missing: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    weight: np.ndarray
    project: np.ndarray

    def draw(self, rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``rows`` rows.

        Returns:
            The transformed features [rows, D] and their standardised values [rows, D], float32.
        """
        dense = _draw_transformed(rng, rows, self.missing, self.mu, self.sigma)
        return dense, (dense - self.mean) / self.std


def build_dense(
    missing: list[float], latent_dim: int, rng: np.random.Generator, pilot_rows: int = 20_000
) -> DenseModel:
    """Draw a dense model with unit-scale effects (the ground truth rescales them).

    Args:
        missing: per feature, the probability it is missing.
        latent_dim: K, the width of the sparse IDs' latent vectors.
        rng: draws everything.
        pilot_rows: rows drawn to measure the features' mean and spread, which standardise them.
    """
    missing_arr = np.asarray(missing, dtype=np.float64)
    num = len(missing_arr)
    mu = rng.uniform(0.0, 3.0, num)
    sigma = rng.uniform(0.5, 1.5, num)
    pilot = _draw_transformed(rng, pilot_rows, missing_arr, mu, sigma)
    return DenseModel(
        missing=missing_arr,
        mu=mu,
        sigma=sigma,
        mean=pilot.mean(axis=0, dtype=np.float64).astype(np.float32),
        std=np.maximum(pilot.std(axis=0, dtype=np.float64), 1e-6).astype(np.float32),
        weight=rng.standard_normal(num).astype(np.float32),
        project=rng.standard_normal((num, latent_dim)).astype(np.float32),
    )


def _draw_transformed(
    rng: np.random.Generator, rows: int, missing: np.ndarray, mu: np.ndarray, sigma: np.ndarray
) -> np.ndarray:
    """[rows, D] float32 ``log(1 + count)`` values, 0 where missing."""
    normal = rng.standard_normal((rows, len(mu)), dtype=np.float32)  # [rows, D]
    counts = np.floor(np.exp(mu.astype(np.float32) + sigma.astype(np.float32) * normal))
    present = rng.random((rows, len(mu)), dtype=np.float32) >= missing.astype(np.float32)
    # log(1 + count), not log1p: counts are integers, so it is as exact, and numpy vectorises log only.
    return np.log(counts + np.float32(1.0)) * present
