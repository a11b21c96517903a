"""Plots a person would rather look at than read: the training curve."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


def training_curve(history: list[dict[str, float]], title: str = "") -> plt.Figure:
    """Train loss and validation AUC (with the oracle AUC when known) against step."""
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(10, 3.8))
    train = [h for h in history if "train/loss" in h]
    valid = [h for h in history if "valid/auc" in h]
    ax_loss.plot([h["step"] for h in train], [h["train/loss"] for h in train], lw=1)
    ax_loss.set(xlabel="step", ylabel="train logloss", title="training loss")
    steps = [h["step"] for h in valid]
    ax_auc.plot(steps, [h["valid/auc"] for h in valid], marker="o", label="model")
    if valid and "valid/oracle_auc" in valid[-1]:
        ax_auc.plot(steps, [h["valid/oracle_auc"] for h in valid], ls="--", label="oracle (true CTR)")
    ax_auc.set(xlabel="step", ylabel="valid AUC", title="validation AUC")
    ax_auc.legend(loc="lower right")
    for ax in (ax_loss, ax_auc):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
