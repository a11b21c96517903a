"""Streaming scores of the ground truth itself: the Bayes-optimal AUC and logloss of a split."""

from __future__ import annotations

import numpy as np


class OracleMeter:
    """Accumulates (true probability, label) pairs chunk by chunk in bounded memory.

    AUC comes from label counts per probability bin (``bins`` equal-width bins on [0, 1]); pairs that
    share a bin count as ties, which moves the AUC by less than 1e-4 at the default 2^16 bins.
    Logloss and rates are exact.
    """

    def __init__(self, bins: int = 1 << 16) -> None:
        self._bins = bins
        self._pos = np.zeros(bins, dtype=np.int64)
        self._neg = np.zeros(bins, dtype=np.int64)
        self._loss = 0.0
        self._prob_sum = 0.0

    def update(self, prob: np.ndarray, label: np.ndarray) -> None:
        """Add rows: ``prob`` [B] true click probabilities, ``label`` [B] 0/1 labels."""
        p = prob.astype(np.float64)
        y = label.astype(bool)
        bins = np.minimum((p * self._bins).astype(np.int64), self._bins - 1)
        self._pos += np.bincount(bins[y], minlength=self._bins)
        self._neg += np.bincount(bins[~y], minlength=self._bins)
        p = np.clip(p, 1e-7, 1.0 - 1e-7)
        self._loss -= float(np.where(y, np.log(p), np.log1p(-p)).sum())
        self._prob_sum += float(p.sum())

    @property
    def rows(self) -> int:
        """Rows seen so far."""
        return int(self._pos.sum() + self._neg.sum())

    def auc(self) -> float:
        """AUC of the true probabilities (NaN when one class is absent)."""
        pos, neg = self._pos.sum(), self._neg.sum()
        if pos == 0 or neg == 0:
            return float("nan")
        neg_below = np.cumsum(self._neg) - self._neg
        wins = (self._pos * neg_below).sum() + 0.5 * (self._pos * self._neg).sum()
        return float(wins / (pos * neg))

    def summary(self, split: str) -> dict[str, float]:
        """``split/rows``, ``split/positive_rate``, ``split/mean_true_prob``, ``split/oracle_auc``,
        ``split/oracle_logloss``."""
        rows = max(self.rows, 1)
        return {
            f"{split}/rows": self.rows,
            f"{split}/positive_rate": float(self._pos.sum()) / rows,
            f"{split}/mean_true_prob": self._prob_sum / rows,
            f"{split}/oracle_auc": self.auc(),
            f"{split}/oracle_logloss": self._loss / rows,
        }
