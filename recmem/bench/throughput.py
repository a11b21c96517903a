"""Training throughput: recmem's step against torchrec's, in one process, on the same batches.

Every variant trains on the same Criteo-shaped synthetic batches (13 dense features, F sparse fields
of one ID per row, labels with a 25% positive rate), collated by recmem's own :func:`collate` from
the Parquet rows that the end-to-end variant later reads back. One step of every variant is the
training loop's (``recmem/train/loop.py``): forward, BCE-with-logits, ``zero_grad``, backward,
dense ``optimizer.step()``, then reading the loss; tables update themselves inside backward.

Variants (keys of the results):

- ``recmem_fp32`` / ``recmem_bf16``: ``CTRModel`` on a ``full`` table (fbgemm TBE, row-wise Adagrad)
  with ``DLRMDense``; bf16 is the same model with the dense part under bf16 autocast.
- ``torchrec_dmp``: torchrec's DLRM under ``DistributedModelParallel`` (the yardstick, ratio 1.0).
- ``torchrec_fused``: torchrec's DLRM on a ``FusedEmbeddingBagCollection`` (the same fused TBE
  update), no DMP: against ``torchrec_dmp``, what DMP at world size 1 costs (DDP, input distribution).
- ``torchrec_fused_recmem_dense``: those fused tables under recmem's ``DLRMDense``: against
  ``recmem_fp32``, what recmem's ID -> row lookup costs; against ``torchrec_fused``, what torchrec's
  interaction and ``DLRMTrain`` wrapper cost.
- ``recmem_torchrec_interaction``: ``recmem_fp32`` with torchrec's ``InteractionArch`` in place of
  recmem's ``DotInteraction``: what recmem's faster interaction gains.
- ``dense_fp32`` / ``dense_bf16``: recmem's dense part alone on fixed pooled embeddings (their
  gradient still computed): a ceiling no full model can beat.
- ``recmem_parquet_fp32``: recmem's step fed by :func:`iter_batches` (read + collate + train).
- ``parquet_pipeline``: :func:`iter_batches` alone, no training.
- ``torchrec_naive``: torchrec's DLRM on an unsharded ``EmbeddingBagCollection`` (dense table
  gradients, seconds per step at 1M rows: timed for a few steps only, after every other variant is
  freed, since it needs two copies of the tables).

Each peer (``recmem/bench/peers.py``) has its own tables and dense layers, except that recmem's
variants share one ``full`` table and the two fused peers one ``FusedEmbeddingBagCollection``.
``recmem/bench/phases.py`` then cuts recmem's fp32 and bf16 steps into phases on the same batches.

The main variants run interleaved in rounds, so a neighbour's burst of CPU load on a shared machine
slows them all alike instead of one; each variant's figure is its samples over its seconds. On a
machine shared with other jobs, torch's multi-threaded ops stall at every parallel region while a
sibling thread waits for a core (10-50x slower steps seen on 2 busy cores); ``threads=1`` with
``clock="cpu"`` then still compares the variants' work fairly, if not their speed on a quiet machine.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import torch

from recmem.bench import peers
from recmem.bench.phases import PhaseTimes, measure_phases
from recmem.config import Config, SchemaConfig, TableConfig
from recmem.data.batch import Batch
from recmem.data.collate import collate
from recmem.data.dataset import iter_batches
from recmem.data.layout import PartWriter
from recmem.models import CTRModel, build_dense
from recmem.tables import TableCollection
from recmem.tables.full import FullTable
from recmem.train.loop import make_dense_optimizer

Step = Callable[[Batch], float]
"""One training step on a batch; returns the loss."""
_ROW_GROUP_ROWS = 65_536
_TABLE_EPS = 1e-8
"""Row-wise Adagrad epsilon of recmem's fused tables (``FusedRowwiseAdagrad``), given to torchrec's too."""


@dataclass
class ThroughputOptions:
    """Sizes of one benchmark run; the defaults are the issue's Criteo-shaped setting.

    Attributes:
        tables: F, sparse fields, one table each.
        rows: rows of every table; IDs lie in ``[0, rows)``.
        dim: D.
        batch: B.
        steps: timed steps per main variant, split over ``rounds``; also the phased steps of
            recmem's fp32 and bf16 step (each followed by a whole step).
        max_seconds: a main variant's time budget: a round stops early (after at least one step)
            once the variant has used its share, so a slow variant (bf16 without native bf16
            instructions) cannot stretch the run; its figure then rests on fewer steps. The phases
            of each precision get the same budget.
        warmup: untimed steps per variant before its first timed one.
        rounds: how many times the main variants take turns.
        naive_steps: timed steps of the naive unsharded path (after one untimed step).
        parquet_rows: rows written to Parquet for the end-to-end variants (rounded down to whole
            batches); the batches of every variant are these rows.
        ids: ``zipf``: ID rank r drawn with P ~ 1/(r+1) (log-uniform rank, exponent 1), ranks mapped
            to rows by a random permutation per table; ``uniform``: every row equally likely.
        seed: seeds data and models.
        threads: torch intra-op threads (0: torch's default, one per core).
        clock: ``wall``: elapsed time (what a user waits for); ``cpu``: this process's CPU time,
            which other jobs on a shared machine barely disturb (use with ``threads=1``: with more,
            it also counts threads spinning at barriers).
    """

    tables: int = 26
    rows: int = 1_000_000
    dim: int = 16
    batch: int = 4096
    steps: int = 32
    max_seconds: float = 30.0
    warmup: int = 3
    rounds: int = 8
    naive_steps: int = 3
    parquet_rows: int = 200_000
    ids: Literal["zipf", "uniform"] = "zipf"
    seed: int = 0
    threads: int = 0
    clock: Literal["wall", "cpu"] = "wall"


QUICK = ThroughputOptions(
    tables=4, rows=1000, dim=8, batch=256, steps=4, warmup=1, rounds=2, naive_steps=1, parquet_rows=1024
)
"""Tiny sizes that run every variant in seconds (the smoke test)."""


@dataclass
class Timing:
    """Samples and seconds a variant trained, in total and per round, and its last loss."""

    samples: int = 0
    seconds: float = 0.0
    per_round: list[float] = field(default_factory=list)
    last_loss: float = float("nan")

    def add(self, samples: int, seconds: float, last_loss: float) -> None:
        """Record one round."""
        self.samples += samples
        self.seconds += seconds
        self.per_round.append(samples / max(seconds, 1e-9))
        self.last_loss = last_loss

    @property
    def samples_per_second(self) -> float:
        """Total samples over total seconds."""
        return self.samples / max(self.seconds, 1e-9)

    @property
    def best_round(self) -> float:
        """Samples/s of the fastest round: the figure least disturbed by other load on the machine."""
        return max(self.per_round, default=0.0)


def schema_for(opts: ThroughputOptions) -> SchemaConfig:
    """Criteo's 13 dense fields, ``C1..C<tables>`` sparse fields, no event time or true probability."""
    return SchemaConfig(sparse=[f"C{i}" for i in range(1, opts.tables + 1)], event_time=None, true_prob=None)


def synthetic_rows(opts: ThroughputOptions, schema: SchemaConfig) -> pa.Table:
    """Whole batches of Criteo-shaped rows: label, dense [n, 13] as log(1+x), sparse IDs in ``[0, rows)``."""
    rng = np.random.default_rng(opts.seed)
    n = max(opts.parquet_rows // opts.batch, 1) * opts.batch
    columns: dict[str, np.ndarray] = {schema.label: (rng.random(n) < 0.25).astype(np.float32)}
    for name in schema.dense:
        columns[name] = np.log1p(rng.exponential(10.0, n)).astype(np.float32)
    for name in schema.sparse:
        if opts.ids == "uniform":
            columns[name] = rng.integers(0, opts.rows, n, dtype=np.int64)
        else:
            rank = np.floor(np.exp(rng.random(n) * math.log(opts.rows + 1))).astype(np.int64) - 1
            columns[name] = rng.permutation(opts.rows)[np.minimum(rank, opts.rows - 1)]
    return pa.table(columns)


def write_parquet(rows: pa.Table, root: Path) -> None:
    """Write ``rows`` as ``root/train`` in recmem's layout (one part, 64k-row groups)."""
    writer = PartWriter(root / "train", rows.schema, part_rows=rows.num_rows)
    for start in range(0, rows.num_rows, _ROW_GROUP_ROWS):
        writer.write(rows.slice(start, _ROW_GROUP_ROWS))
    writer.close()


def make_step(loss_of: Callable[[Batch], torch.Tensor], optimizer: torch.optim.Optimizer) -> Step:
    """The training loop's step around ``loss_of`` (see the module docstring)."""

    def step(batch: Batch) -> float:
        loss = loss_of(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())  # the loop reads the loss every step too

    return step


def _bce(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)


def recmem_model(opts: ThroughputOptions, schema: SchemaConfig, cfg: Config) -> CTRModel:
    """recmem's DLRM on one ``full`` table per field whose vocabulary is every ID in ``[0, rows)``."""
    torch.manual_seed(opts.seed)
    vocab = np.arange(opts.rows, dtype=np.int64)
    table = FullTable(schema.sparse, [vocab] * opts.tables, opts.dim, cfg.model.tables[0].learning_rate, opts.seed)
    return CTRModel(TableCollection([table], schema.sparse), build_dense(cfg.model, schema))


def recmem_step(model: CTRModel, cfg: Config) -> Step:
    """One training step of ``model`` with the loop's dense optimizer."""
    return make_step(lambda b: _bce(model(b), b), make_dense_optimizer(cfg, list(model.dense.parameters())))


def dense_step(opts: ThroughputOptions, schema: SchemaConfig, cfg: Config, bf16: bool) -> Step:
    """The dense part alone: fixed pooled embeddings [B, F, D] (gradient still computed), no tables."""
    torch.manual_seed(opts.seed)
    dense = build_dense(cfg.model, schema)
    pooled = torch.randn(opts.batch, opts.tables, opts.dim, requires_grad=True)  # [B, F, D]

    def loss_of(batch: Batch) -> torch.Tensor:
        pooled.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = dense(batch.dense_features, pooled)
        return _bce(logits.float(), batch)

    return make_step(loss_of, make_dense_optimizer(cfg, list(dense.parameters())))


def torchrec_step(opts: ThroughputOptions, schema: SchemaConfig, cfg: Config, sharded: bool) -> Step:
    """torchrec's DLRM, under ``DistributedModelParallel`` when ``sharded`` (needs a process group)."""
    torch.manual_seed(opts.seed)
    table = cfg.model.tables[0]
    model = peers.torchrec_dlrm(
        schema.sparse, opts.rows, opts.dim, len(schema.dense), cfg.model.bottom_mlp, cfg.model.top_mlp,
        table.learning_rate, _TABLE_EPS, device="meta" if sharded else "cpu",
    )
    module = peers.shard(model) if sharded else model
    return make_step(lambda b: module(b)[0], make_dense_optimizer(cfg, peers.dense_parameters(module)))


def torchrec_interaction_step(model: CTRModel, opts: ThroughputOptions, schema: SchemaConfig, cfg: Config) -> Step:
    """``model``'s tables under recmem's dense part with torchrec's stock interaction (own dense layers)."""
    torch.manual_seed(opts.seed)
    dense = peers.with_torchrec_interaction(build_dense(cfg.model, schema))
    return recmem_step(CTRModel(model.tables, dense), cfg)


def fused_steps(opts: ThroughputOptions, schema: SchemaConfig, cfg: Config) -> dict[str, Step]:
    """torchrec's fused tables without DMP (one set, shared) under torchrec's DLRM and under recmem's dense."""
    torch.manual_seed(opts.seed)
    table = cfg.model.tables[0]
    tables = peers.fused_tables(schema.sparse, opts.rows, opts.dim, table.learning_rate, _TABLE_EPS)
    dlrm, dlrm_dense = peers.fused_dlrm(tables, len(schema.dense), cfg.model.bottom_mlp, cfg.model.top_mlp)
    torch.manual_seed(opts.seed)
    ours = peers.TorchrecTablesModel(tables, build_dense(cfg.model, schema))
    return {
        "torchrec_fused": make_step(lambda b: dlrm(b)[0], make_dense_optimizer(cfg, dlrm_dense)),
        "torchrec_fused_recmem_dense": make_step(
            lambda b: _bce(ours(b), b), make_dense_optimizer(cfg, list(ours.dense.parameters()))
        ),
    }


def phases_of(model: CTRModel, cfg: Config, batches: Iterable[Batch], opts: ThroughputOptions) -> PhaseTimes:
    """``model``'s step cut into phases, alternating with whole steps (``recmem/bench/phases.py``)."""
    optimizer = make_dense_optimizer(cfg, list(model.dense.parameters()))
    whole = make_step(lambda b: _bce(model(b), b), optimizer)
    return measure_phases(model, optimizer, whole, batches, CLOCKS[opts.clock], opts.max_seconds)


def bench_config(opts: ThroughputOptions) -> Config:
    """recmem's default training config at the benchmark's sizes (dense Adagrad, table and dense lr)."""
    cfg = Config()
    cfg.model.bottom_mlp = [*cfg.model.bottom_mlp[:-1], opts.dim]
    cfg.model.tables = [TableConfig(embedding_dim=opts.dim)]
    return cfg


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
"""The ``clock`` option's meanings."""


def run_steps(
    step: Step | None, batches: Iterable[Batch], clock: Callable[[], float], max_seconds: float = math.inf
) -> tuple[int, float, float]:
    """Train ``step`` on each batch (only draw the batches when None), stopping early, after at least
    one batch, once ``max_seconds`` have passed on ``clock``. Drawing a batch is timed too.

    Returns:
        (samples, seconds, last loss).
    """
    samples, loss, start = 0, float("nan"), clock()
    for batch in batches:
        if step is not None:
            loss = step(batch)
        samples += len(batch)
        if clock() - start > max_seconds:
            break
    return samples, clock() - start, loss


def cycle(batches: list[Batch], start: int, count: int) -> Iterator[Batch]:
    """``count`` batches from index ``start`` on, wrapping around."""
    return (batches[i % len(batches)] for i in range(start, start + count))


def interleave(steps: dict[str, Step], batches: list[Batch], opts: ThroughputOptions) -> dict[str, Timing]:
    """Warm every variant up, then let them take ``opts.rounds`` turns of ``steps / rounds`` steps each."""
    clock = CLOCKS[opts.clock]
    for step in steps.values():
        run_steps(step, cycle(batches, 0, opts.warmup), clock)
    per_round = max(1, math.ceil(opts.steps / opts.rounds))
    timings = {name: Timing() for name in steps}
    budget = opts.max_seconds / opts.rounds
    for r in range(opts.rounds):
        for name, step in steps.items():
            timings[name].add(*run_steps(step, cycle(batches, opts.warmup + r * per_round, per_round), clock, budget))
    return timings


def once(step: Step | None, batches: Iterable[Batch], opts: ThroughputOptions) -> Timing:
    """Time one pass of ``step`` over ``batches``."""
    timing = Timing()
    timing.add(*run_steps(step, batches, CLOCKS[opts.clock]))
    return timing


@dataclass
class Measured:
    """One run's figures: a :class:`Timing` per variant key, and the phases of recmem's step per
    precision (``fp32``, ``bf16``)."""

    timings: dict[str, Timing]
    phases: dict[str, PhaseTimes]


def run_throughput(opts: ThroughputOptions, workdir: Path) -> Measured:
    """Measure every variant (see the module docstring) and recmem's step phases in this process.

    Args:
        opts: sizes.
        workdir: an empty scratch directory (Parquet data, the process group's file store).
    """
    cfg, schema = bench_config(opts), schema_for(opts)
    rows = synthetic_rows(opts, schema)
    write_parquet(rows, workdir)
    batches = [collate(rows.slice(i, opts.batch), schema) for i in range(0, rows.num_rows, opts.batch)]
    with peers.single_process_group(workdir):
        model = recmem_model(opts, schema, cfg)
        bf16 = CTRModel(model.tables, model.dense, bf16=True)
        steps = {
            "recmem_fp32": recmem_step(model, cfg),
            "recmem_bf16": recmem_step(bf16, cfg),
            "recmem_torchrec_interaction": torchrec_interaction_step(model, opts, schema, cfg),
            "torchrec_dmp": torchrec_step(opts, schema, cfg, sharded=True),
            **fused_steps(opts, schema, cfg),
            "dense_fp32": dense_step(opts, schema, cfg, bf16=False),
            "dense_bf16": dense_step(opts, schema, cfg, bf16=True),
        }
        timings = interleave(steps, batches, opts)
        del steps
        gc.collect()

    def parquet() -> Iterator[Batch]:
        return iter_batches(workdir, "train", schema, opts.batch, drop_last=True)

    timings["parquet_pipeline"] = once(None, parquet(), opts)
    timings["recmem_parquet_fp32"] = once(recmem_step(model, cfg), parquet(), opts)
    phases = {name: phases_of(m, cfg, cycle(batches, 0, opts.steps), opts) for name, m in
              (("fp32", model), ("bf16", bf16))}
    del model, bf16
    gc.collect()
    naive = torchrec_step(opts, schema, cfg, sharded=False)
    naive(batches[0])  # warm-up
    timings["torchrec_naive"] = once(naive, cycle(batches, 1, opts.naive_steps), opts)
    return Measured(timings, phases)
