"""Single-process training and evaluation on local Parquet (the Ray path hosts the same loop)."""

from __future__ import annotations

from pathlib import Path

from recmem.config import Config
from recmem.data.dataset import iter_batches
from recmem.data.layout import check_trainable, index_split
from recmem.tracking.logger import runs_marked_failed
from recmem.train.checkpoint import load_latest
from recmem.train.loop import BatchSource, TrainResult, build_job_model, evaluate, train


def local_source(cfg: Config) -> BatchSource:
    """Batches streamed from ``cfg.data.root``; training drops the last partial batch."""
    root = Path(cfg.data.root)

    def source(split: str, epoch: int, start_batch: int):
        return iter_batches(
            root, split, cfg.data.schema, cfg.data.batch_size,
            drop_last=split == "train", start_batch=start_batch,
        )

    return source


def train_local(cfg: Config, started_at: float | None = None) -> TrainResult:
    """Train ``cfg`` in this process (a crash marks its MLflow run FAILED); ``started_at`` (Unix time
    the command started) turns on the ``startup/*`` metrics.

    Raises:
        FileNotFoundError: a split is missing.
        DataError: a split is too small to train on or validate with (before any work).
    """
    root, schema = cfg.data.root, cfg.data.schema
    check_trainable({split: index_split(root, split, schema) for split in ("train", "valid")}, cfg.data.batch_size)
    with runs_marked_failed():
        return train(cfg, local_source(cfg), started_at=started_at)


def evaluate_local(cfg: Config, split: str = "valid") -> dict[str, float]:
    """Metrics of the latest checkpoint in ``cfg.train.checkpoint_dir`` on ``split``, and its ``step``.

    Raises:
        FileNotFoundError: no checkpoint to evaluate.
    """
    ckpt_dir = Path(cfg.workdir) / cfg.train.checkpoint_dir
    found = load_latest(ckpt_dir)
    if found is None:
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint to evaluate (run `recmem train` first)")
    state, _ = found
    model = build_job_model(cfg)
    model.load_state_dict(state["model"])
    return {**evaluate(model, local_source(cfg)(split, 0, 0), split), "step": float(state["step"])}
