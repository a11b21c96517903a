"""Validation metrics: AUC, logloss, calibration, and the gap to the oracle when truth is known."""

from __future__ import annotations

import numpy as np
import torch

from recmem.data.batch import Batch


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via ranks (ties get their average rank). NaN with one class only."""
    labels = np.asarray(labels, dtype=np.float64)
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # average ranks over runs of equal scores
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    n_pos = labels.sum()
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities."""
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


class MetricAccumulator:
    """Collects predictions over a split, then reports ``<split>/auc``, logloss, calibration, oracle gap."""

    def __init__(self, split: str = "valid") -> None:
        self.split = split
        self._labels: list[np.ndarray] = []
        self._probs: list[np.ndarray] = []
        self._truth: list[np.ndarray] = []

    def update(self, batch: Batch, logits: torch.Tensor) -> None:
        """Add one batch's labels and predicted logits [B]."""
        self._labels.append(batch.labels.numpy())
        self._probs.append(torch.sigmoid(logits.detach().float()).numpy())
        if batch.true_prob is not None:
            self._truth.append(batch.true_prob.numpy())

    def all_gather(self) -> None:
        """Replace what this rank collected by what every ``torch.distributed`` rank collected."""
        mine = [np.concatenate(part) if part else np.zeros(0, np.float32)
                for part in (self._labels, self._probs, self._truth)]
        everyone: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, mine)
        self._labels, self._probs, self._truth = ([r[i] for r in everyone if len(r[i])] for i in range(3))

    def compute(self) -> dict[str, float]:
        """The metrics of everything added so far."""
        if not self._labels:
            return {}
        y, p = np.concatenate(self._labels), np.concatenate(self._probs)
        s = self.split
        out = {
            f"{s}/auc": auc(y, p),
            f"{s}/logloss": logloss(y, p),
            f"{s}/calibration": float(p.mean() / max(y.mean(), 1e-12)),
            f"{s}/rows": float(len(y)),
        }
        if self._truth and sum(len(t) for t in self._truth) == len(y):
            truth = np.concatenate(self._truth)
            out[f"{s}/oracle_auc"] = auc(y, truth)
            out[f"{s}/oracle_logloss"] = logloss(y, truth)
            out[f"{s}/auc_gap"] = out[f"{s}/oracle_auc"] - out[f"{s}/auc"]
        return out
