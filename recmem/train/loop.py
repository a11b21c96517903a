"""The training loop: read it top to bottom. Ray workers host this same loop (see
``distributed/worker.py``)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    """:func:`train`'s epochs over the split, once the store is held (the arguments are :func:`train`'s)."""
    t = cfg.train
    session = TrainingSession(cfg, model, optimizer, store, rank=rank, track=track, run_id=run_id, params=params,
                              started_at=started_at, marks=marks)
    state = session.resumed
    epoch, position = (0, 0) if state is None else (state["epoch"], state["position"])
    if state is not None and rank == 0:
        tqdm.write(f"recmem: resumed from {store.loaded_from} at step {session.step} (epoch {epoch}, batch {position})")

    def validate() -> dict[str, float]:
        return session.validate(source("valid", 0, 0), extra_metrics)

    done = bool(t.max_steps and session.step >= t.max_steps)  # a resumed run may have reached it already
    while epoch < t.epochs and not done:
        for step in session.train_window(source("train", epoch, position), lambda: f"epoch {epoch}, batch {position}"):
            position += 1
            if t.eval_every and step % t.eval_every == 0:
                session.bar.set_postfix(valid_auc=f"{validate().get('valid/auc', float('nan')):.4f}")
            if t.checkpoint_every and step % t.checkpoint_every == 0:
                session.checkpoint({"epoch": epoch, "position": position})
            if t.max_steps and step >= t.max_steps:
                done = True
                break
        else:
            epoch, position = epoch + 1, 0
    return session.finish({"epoch": epoch, "position": position}, validate)


class TrainingSession:
    """One run of the loop in three parts, which ``recmem train`` (:func:`train`) and the online loop
    (``recmem/online``) both call: set-up (the constructor: resume from the store, open the MLflow
    run), train-on-a-window (:meth:`train_window`, one step per batch of a window), and
    :meth:`finish`. Checkpoints (:meth:`checkpoint`) record the caller's progress beside the model
    and optimizer state, in the same atomic file: a data position for ``recmem train``, the files
    and rows consumed for the online loop.

    Args:
        cfg, model, optimizer, store, rank, track, run_id, params, started_at, marks: as in
            :func:`train` (the store must be held: inside its ``session``).
    """

    def __init__(self, cfg: Config, model: CTRModel, optimizer: torch.optim.Optimizer, store: CheckpointStore, *,
                 rank: int = 0, track: bool = True, run_id: str | None = None, params: dict[str, str] | None = None,
                 started_at: float | None = None, marks: dict[str, float] | None = None) -> None:
        t = cfg.train
        self.cfg, self.model, self.optimizer, self.store, self.rank = cfg, model, optimizer, store, rank
        self.evictable = [m for m in model.tables.tables if isinstance(m, Evictable)]
        self.resumed = store.load()
        """The checkpoint the session continued from (its caller reads its progress there), or None."""
        self.step = 0
        if self.resumed is not None:
            model.load_state_dict(self.resumed["model"])
            optimizer.load_state_dict(self.resumed["optimizer"])
            self.step = self.resumed["step"]
            run_id = self.resumed["run_id"] or run_id
        self.log = RunLogger(cfg, enabled=track and rank == 0, run_id=run_id)
        precision = "bf16" if model.bf16 else "fp32"  # train.precision as resolved for this device
        plan = model.tables.plan()  # layouts tables chose at build time (mixed_dim's widths)
        self.log.log_params({"train.precision_used": precision, **plan, **(params or {})})
        if rank == 0:
            tqdm.write(precision_note(t, precision))
            if plan:
                tqdm.write("recmem: table plan: " + ", ".join(f"{k}={v}" for k, v in plan.items()))
        self.reported: dict[str, float] = {} if self.resumed is None else {"resume/step": float(self.step)}
        self.history: list[dict[str, float]] = []
        self.trained, self.train_seconds, self.data_seconds, self.skipped = 0, 0.0, 0.0, 0
        self._loss_sum, self._aux_sum, self._loss_n = 0.0, 0.0, 0
        self._first_step, self._started_at, self._marks = self.step, started_at, marks
        self.bar = tqdm(desc="train", unit="batch", disable=not (t.progress and rank == 0), initial=self.step)

    def train_window(self, batches: Iterable[Batch], where: Callable[[], str]) -> Iterator[int]:
        """Train on each of ``batches`` in turn, yielding the step number after each step.

        The caller acts between steps (validates, checkpoints, stops by breaking out); time it
        spends there counts neither as training nor as waiting for data. ``where()`` names the
        current batch in an error (e.g. ``epoch 0, batch 12``). Tables that prefetch their rows see
        each batch ``train.prefetch_batches`` steps ahead (``lookahead.py``).
        """
        t = self.cfg.train
        fetch = time.perf_counter()
        for batch in lookahead(batches, self.model.tables, t.prefetch_batches):
            tick = time.perf_counter()
            self.data_seconds += tick - fetch
            now = batch.max_event_time()
            if now is not None:
                for table in self.evictable:
                    table.observe_time(now)
            aux = self._step(batch, where)
            self.train_seconds += time.perf_counter() - tick
            self.step, self.trained = self.step + 1, self.trained + len(batch)
            step = self.step
            self.bar.update()
            if step == self._first_step + 1 and self._started_at is not None:
                startup = _startup_metrics(self._started_at, {**(self._marks or {}), "first_step": time.time()})
                self.reported.update(startup)
                self.log.log_metrics(startup, step)
            if t.evict_every and step % t.evict_every == 0 and now is not None:
                for table in self.evictable:
                    table.evict(now)
            if t.log_every and step % t.log_every == 0 and self._loss_n:
                self._log_loss(aux is not None)
            yield step
            fetch = time.perf_counter()

    def _step(self, batch: Batch, where: Callable[[], str]) -> torch.Tensor | None:
        """One update on ``batch`` (or none, for a non-finite loss under ``train.nonfinite=skip``);
        returns the tables' auxiliary loss, if any."""
        t, model = self.cfg.train, self.model
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.labels)
        aux = model.tables.auxiliary_loss()  # a table's own regulariser, logged apart from the loss
        aux_value = 0.0 if aux is None else float(aux.detach())
        loss = loss if aux is None else loss + aux
        value = float(loss.detach())
        problem = None if math.isfinite(value) else why_nonfinite(batch, value)
        if t.nonfinite == "skip":  # every rank must skip the same batch; a stop needs no agreement:
            problem = any_rank(problem)  # Ray ends the other workers when one raises
        if problem is None:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # the tables' fused optimizers update here
            self.optimizer.step()
            self._loss_sum, self._aux_sum, self._loss_n = self._loss_sum + value, self._aux_sum + aux_value, self._loss_n + 1
            return aux
        # No update anywhere: the batch is left out, or the run stops here.
        self.skipped += 1
        self.log.log_metrics({"train/loss": value, "train/skipped_batches": float(self.skipped)}, self.step + 1)
        if t.nonfinite == "stop" or self.skipped > t.max_skipped_batches:
            limit = "" if t.nonfinite == "stop" else f" ({self.skipped} skipped, over train.max_skipped_batches)"
            raise TrainingDiverged(
                f"step {self.step + 1} ({where()}): non-finite {problem}{limit}. "
                f"Lower train.learning_rate (now {t.learning_rate:g}) or the tables' learning "
                "rates, or set train.nonfinite=skip to leave such batches out; checkpoints "
                "already written are intact")
        if self.rank == 0:
            tqdm.write(f"recmem: step {self.step + 1}: skipped a batch with non-finite {problem}")
        return aux

    def _log_loss(self, has_aux: bool) -> None:
        """Log the mean loss since the last call and the training rate."""
        sps = self.trained * world_size() / max(self.train_seconds, 1e-9)
        logged = {"train/loss": (self._loss_sum - self._aux_sum) / self._loss_n, "train/samples_per_second": sps}
        if has_aux:
            logged["train/aux_loss"] = self._aux_sum / self._loss_n
        postfix = {"loss": f"{logged['train/loss']:.4f}", "sps": f"{sps:,.0f}"}
        disk = self.model.tables.prefetch_stats()  # tables that read rows from disk: how well the cache keeps up
        if disk:
            logged.update({f"tables/{k}": v for k, v in disk.items()})
            hits = [v for k, v in disk.items() if k.endswith("/cache_hit_rate")]
            postfix["hit"] = f"{sum(hits) / len(hits):.3f}"
            postfix["wait"] = f"{sum(v for k, v in disk.items() if k.endswith('/prefetch_wait_seconds')):.2f}s"
        self.reported.update(logged)
        self.log.log_metrics(logged, self.step)
        self.history.append({"step": self.step, **{k: v for k, v in logged.items() if "loss" in k}})
        self.bar.set_postfix(postfix)
        self._loss_sum, self._aux_sum, self._loss_n = 0.0, 0.0, 0

    def checkpoint(self, progress: dict[str, Any]) -> None:
        """Save the model and optimizer state with ``progress`` (plain data: where the data stands)
        in one atomic checkpoint at the current step.

        Raises:
            TrainingDiverged: the weights hold a NaN or infinity (nothing is written).
        """
        snapshot = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "step": self.step, **progress, "run_id": self.log.run_id}
        bad = any_rank(", ".join(nonfinite_tensors(snapshot)[:5]) or None)
        if bad:  # a checkpoint of NaN weights would rotate a good one out
            raise TrainingDiverged(f"step {self.step}: non-finite weights ({bad}); no checkpoint written, the "
                                   f"previous one is intact. Lower train.learning_rate (now {self.cfg.train.learning_rate:g}) "
                                   "or the tables' learning rates")
        self.store.save(self.step, snapshot, {"step": float(self.step), **self.reported})

    def validate(self, batches: Iterable[Batch], extra_metrics: Callable[[], dict[str, float]] | None = None,
                 ) -> dict[str, float]:
        """Metrics of the model on ``batches`` with the tables' figures (and ``extra_metrics()``),
        logged at the current step."""
        metrics = evaluate(self.model, iter(batches))
        metrics["tables/memory_bytes"] = float(self.model.tables.memory_bytes())
        metrics.update({f"tables/{k}": v for k, v in self.model.tables.stats().items()})
        metrics.update(extra_metrics() if extra_metrics else {})
        self.log.log_metrics(metrics, self.step)
        self.history.append({"step": self.step, **metrics})
        self.reported.update(metrics)
        return metrics

    def finish(self, progress: dict[str, Any], final_metrics: Callable[[], dict[str, float]],
               figure: bool = True) -> TrainResult:
        """End the session: ``final_metrics()`` (a last validation), the rates, a last checkpoint
        with ``progress``, the training curve (``figure``), and the MLflow run closed."""
        self.bar.close()
        metrics = final_metrics()
        sps = self.trained * world_size() / max(self.train_seconds, 1e-9)  # every worker's rows
        rates = {"train/samples_per_second": sps, "train/data_wait_seconds": self.data_seconds,
                 "train/skipped_batches": float(self.skipped),
                 "train/pass_samples_per_second":
                     self.trained * world_size() / max(self.train_seconds + self.data_seconds, 1e-9)}
        self.reported.update(rates)
        self.checkpoint(progress)
        self.log.log_metrics(rates, self.step)
        if self.log.enabled and figure:
            chart = training_curve(self.history, self.cfg.tracking.run_name or self.cfg.model.arch)
            self.log.log_figure(chart, "training_curve.png")
            plt.close(chart)
        self.log.close()
        return TrainResult(self.step, metrics, sps, self.log.run_url(), self.history, self.store.loaded_from)
