"""The training loop: read it top to bottom. Ray Train workers host this same loop (see
``distributed/worker.py``)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from recmem.config import Config
from recmem.data.batch import Batch
from recmem.data.layout import index_split
from recmem.models import CTRModel, build_model
from recmem.tables.base import Evictable
from recmem.train.checkpoint import CheckpointStore, LocalCheckpoints
from recmem.train.device import dense_device, dense_precision, precision_note
from recmem.train.guards import TrainingDiverged, any_rank, nonfinite_tensors, state_bytes, why_nonfinite, world_size
from recmem.train.lookahead import lookahead
from recmem.train.metrics import MetricAccumulator
from recmem.train.resume import resume_key
from recmem.tracking.logger import RunLogger
from recmem.tracking.plots import plt, training_curve

BatchSource = Callable[[str, int, int], Iterator[Batch]]
"""(split, epoch, start_batch) -> batches; the local source reads Parquet, Ray's reads a Data shard."""


@dataclass
class TrainResult:
    """What a finished run reports."""

    step: int
    metrics: dict[str, float]
    samples_per_second: float
    run: str
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: str | None = None
    """The checkpoint the run continued from (None: it started afresh)."""


def make_dense_optimizer(cfg: Config, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer of the dense layers (tables carry their own, fused into backward)."""
    lr = cfg.train.learning_rate
    if cfg.train.dense_optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, fused=True)
    if cfg.train.dense_optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, foreach=True)
    return torch.optim.Adagrad(params, lr=lr, fused=True)


def build_job_model(cfg: Config) -> CTRModel:
    """``cfg``'s single-process model: tables in host memory, dense layers on ``train.device``."""
    device = dense_device(cfg.train)
    bf16 = dense_precision(cfg.train, device) == "bf16"
    return build_model(cfg.model, cfg.data.schema, Path(cfg.data.root), cfg.seed, bf16, device)


def evaluate(model: CTRModel, batches: Iterator[Batch], split: str = "valid") -> dict[str, float]:
    """Metrics of ``model`` over ``batches`` (no table updates, no time stamps).

    Under ``torch.distributed`` every rank passes its share of the split and gets the metrics of all
    of it.
    """
    acc = MetricAccumulator(split)
    model.eval()
    with torch.no_grad():
        for batch in batches:
            acc.update(batch, model(batch))
    model.train()
    if world_size() > 1:
        acc.all_gather()
    return acc.compute()


def _startup_metrics(started_at: float, marks: dict[str, float]) -> dict[str, float]:
    """``startup/<mark>_s``: seconds from the command's start to each mark (Unix times)."""
    return {f"startup/{name}_s": at - started_at for name, at in marks.items()}


def train(
    cfg: Config,
    source: BatchSource,
    rank: int = 0,
    track: bool = True,
    model: CTRModel | None = None,
    *,
    store: CheckpointStore | None = None,
    run_id: str | None = None,
    params: dict[str, str] | None = None,
    extra_metrics: Callable[[], dict[str, float]] | None = None,
    started_at: float | None = None,
    marks: dict[str, float] | None = None,
) -> TrainResult:
    """Train ``cfg``'s model on ``source`` with periodic validation, checkpoints and resume.

    Under ``torch.distributed`` (Ray workers) every rank runs this same loop on its share of the
    data; steps, validations and checkpoints happen at the same points on all ranks.

    Args:
        cfg: the job.
        source: yields training and validation batches; ``start_batch`` resumes mid-epoch.
        rank: this worker's rank (only rank 0 logs to MLflow and shows progress).
        track: log to MLflow (a resumed run continues the MLflow run its checkpoint names).
        model: a prebuilt model (tests, sharded wrappers); built from ``cfg`` when None.
        store: where checkpoints go; default: files in ``cfg.workdir / train.checkpoint_dir``.
        run_id: the MLflow run to log into when no checkpoint names one (Ray's driver opens it).
        params: extra MLflow params, e.g. the sharding plan.
        extra_metrics: more metrics to log at each validation (e.g. a traffic meter's ``stats``).
        started_at: when the command started (Unix time); with it the first step logs
            ``startup/<mark>_s``, the seconds from then to each of ``marks`` (Unix times of the
            start-up's phases, e.g. ``ray_ready``) and to ``first_step``.
        marks: see ``started_at``.

    Besides the loss, the loop reports two rates: ``train/samples_per_second`` counts the steps'
    own time, ``train/pass_samples_per_second`` the whole training pass, time spent waiting for
    the next batch included (``train/data_wait_seconds``); validations and checkpoints count in
    neither.
    """
    t = cfg.train
    model = model or build_job_model(cfg)
    optimizer = make_dense_optimizer(cfg, model.dense_parameters())
    if store is None:
        key = resume_key(cfg, index_split(cfg.data.root, "train", cfg.data.schema))
        store = LocalCheckpoints(Path(cfg.workdir) / t.checkpoint_dir, t.resume, key=key,
                                 resume_changed=t.resume_changed)
    # Pre-flight: a checkpoint that cannot be written fails now, not after the training it would keep.
    with store.session(state_bytes(model, optimizer)):
        return _train(cfg, source, model, optimizer, store, rank=rank, track=track, run_id=run_id,
                      params=params, extra_metrics=extra_metrics, started_at=started_at, marks=marks)


def _train(
    cfg: Config, source: BatchSource, model: CTRModel, optimizer: torch.optim.Optimizer,
    store: CheckpointStore, *, rank: int, track: bool, run_id: str | None, params: dict[str, str] | None,
    extra_metrics: Callable[[], dict[str, float]] | None, started_at: float | None,
    marks: dict[str, float] | None,
) -> TrainResult:
    """:func:`train`'s loop, once the store is held (the arguments are :func:`train`'s)."""
    t = cfg.train
    evictable = [m for m in model.tables.tables if isinstance(m, Evictable)]
    state = store.load()
    step, epoch, position = 0, 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, position = state["step"], state["epoch"], state["position"]
        run_id = state["run_id"] or run_id
        if rank == 0:
            tqdm.write(f"recmem: resumed from {store.loaded_from} at step {step} (epoch {epoch}, batch {position})")
    log = RunLogger(cfg, enabled=track and rank == 0, run_id=run_id)
    precision = "bf16" if model.bf16 else "fp32"  # train.precision as resolved for this device
    log.log_params({"train.precision_used": precision, **(params or {})})
    if rank == 0:
        tqdm.write(precision_note(t, precision))
    reported: dict[str, float] = {} if state is None else {"resume/step": float(step)}

    def checkpoint() -> None:
        snapshot = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": step, "epoch": epoch, "position": position, "run_id": log.run_id}
        bad = any_rank(", ".join(nonfinite_tensors(snapshot)[:5]) or None)
        if bad:  # a checkpoint of NaN weights would rotate a good one out
            raise TrainingDiverged(f"step {step}: non-finite weights ({bad}); no checkpoint written, the "
                                   f"previous one is intact. Lower train.learning_rate (now {t.learning_rate:g}) "
                                   "or the tables' learning rates")
        store.save(step, snapshot, {"step": float(step), **reported})

    def validate() -> dict[str, float]:
        metrics = evaluate(model, source("valid", 0, 0))
        metrics["tables/memory_bytes"] = float(model.tables.memory_bytes())
        metrics.update({f"tables/{k}": v for k, v in model.tables.stats().items()})
        metrics.update(extra_metrics() if extra_metrics else {})
        log.log_metrics(metrics, step)
        history.append({"step": step, **metrics})
        reported.update(metrics)
        return metrics

    history: list[dict[str, float]] = []
    trained, train_seconds, data_seconds, loss_sum, aux_sum, loss_n, skipped = 0, 0.0, 0.0, 0.0, 0.0, 0, 0
    first_step = step
    bar = tqdm(desc="train", unit="batch", disable=not (t.progress and rank == 0), initial=step)
    done = bool(t.max_steps and step >= t.max_steps)  # a resumed run may have reached it already
    while epoch < t.epochs and not done:
        fetch = time.perf_counter()
        for batch in lookahead(source("train", epoch, position), model.tables, t.prefetch_batches):
            tick = time.perf_counter()
            data_seconds += tick - fetch
            now = batch.max_event_time()
            if now is not None:
                for table in evictable:
                    table.observe_time(now)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.labels)
            aux = model.tables.auxiliary_loss()  # a table's own regulariser, logged apart from the loss
            aux_value = 0.0 if aux is None else float(aux.detach())
            loss = loss if aux is None else loss + aux
            value = float(loss.detach())
            problem = None if math.isfinite(value) else why_nonfinite(batch, value)
            if t.nonfinite == "skip":  # every rank must skip the same batch; a stop needs no agreement:
                problem = any_rank(problem)  # Ray ends the other workers when one raises
            if problem is None:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # the tables' fused optimizers update here
                optimizer.step()
                loss_sum, aux_sum, loss_n = loss_sum + value, aux_sum + aux_value, loss_n + 1
            else:  # no update anywhere: the batch is left out, or the run stops here
                skipped += 1
                log.log_metrics({"train/loss": value, "train/skipped_batches": float(skipped)}, step + 1)
                if t.nonfinite == "stop" or skipped > t.max_skipped_batches:
                    limit = "" if t.nonfinite == "stop" else f" ({skipped} skipped, over train.max_skipped_batches)"
                    raise TrainingDiverged(
                        f"step {step + 1} (epoch {epoch}, batch {position}): non-finite {problem}{limit}. "
                        f"Lower train.learning_rate (now {t.learning_rate:g}) or the tables' learning "
                        "rates, or set train.nonfinite=skip to leave such batches out; checkpoints "
                        "already written are intact")
                if rank == 0:
                    tqdm.write(f"recmem: step {step + 1}: skipped a batch with non-finite {problem}")
            train_seconds += time.perf_counter() - tick
            step, position, trained = step + 1, position + 1, trained + len(batch)
            bar.update()
            if step == first_step + 1 and started_at is not None:
                startup = _startup_metrics(started_at, {**(marks or {}), "first_step": time.time()})
                reported.update(startup)
                log.log_metrics(startup, step)
            if t.evict_every and step % t.evict_every == 0 and now is not None:
                for table in evictable:
                    table.evict(now)
            if t.log_every and step % t.log_every == 0 and loss_n:
                sps = trained * world_size() / max(train_seconds, 1e-9)
                logged = {"train/loss": (loss_sum - aux_sum) / loss_n, "train/samples_per_second": sps}
                if aux is not None:
                    logged["train/aux_loss"] = aux_sum / loss_n
                reported.update(logged)
                log.log_metrics(logged, step)
                history.append({"step": step, **{k: v for k, v in logged.items() if "loss" in k}})
                bar.set_postfix(loss=f"{logged['train/loss']:.4f}", sps=f"{sps:,.0f}")
                loss_sum, aux_sum, loss_n = 0.0, 0.0, 0
            if t.eval_every and step % t.eval_every == 0:
                bar.set_postfix(valid_auc=f"{validate().get('valid/auc', float('nan')):.4f}")
            if t.checkpoint_every and step % t.checkpoint_every == 0:
                checkpoint()
            fetch = time.perf_counter()
            if t.max_steps and step >= t.max_steps:
                done = True
                break
        else:
            epoch, position = epoch + 1, 0
    bar.close()
    metrics = validate()
    sps = trained * world_size() / max(train_seconds, 1e-9)  # every worker's rows
    rates = {"train/samples_per_second": sps, "train/data_wait_seconds": data_seconds,
             "train/skipped_batches": float(skipped),
             "train/pass_samples_per_second": trained * world_size() / max(train_seconds + data_seconds, 1e-9)}
    reported.update(rates)
    checkpoint()
    log.log_metrics(rates, step)
    if log.enabled:
        figure = training_curve(history, cfg.tracking.run_name or cfg.model.arch)
        log.log_figure(figure, "training_curve.png")
        plt.close(figure)
    log.close()
    return TrainResult(step, metrics, sps, log.run_url(), history, store.loaded_from)
