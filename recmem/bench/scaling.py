"""Ray scaling on one machine: samples/s for 1 and more workers, bytes per step per worker, projection.

Trains a model (the quickstart's: DLRM over ``full`` tables on recmem's synthetic Criteo-shaped data)
on one local Ray with the same global batch: once on 1 worker, then per worker count > 1 and per
``ray.sharding`` value. The report (Markdown) gives the loop's samples/s (forward, exchanges,
backward, optimizer; not time spent reading the next batch), wall time of the whole job and the bytes
each worker sent per step, measured by ``ray.measure_traffic`` (``recmem/train/distributed/traffic.py``):
table exchanges as sent to other ranks and the DDP all-reduce as its payload. What a ring all-reduce
puts on the wire, 2 (W - 1) / W x payload, is not measured: the report computes it from the measured
payload and, as a cross-check, from the dense parameter count. Last, a projection of throughput for 8
and 64 workers on a 25 Gb/s network from the 1-worker run's compute and data time per step and the
first ID-sharded run's bytes (model in :func:`project`), naming the part that limits.

This is a Ray driver: it imports no torch and no torchrec (the dense parameter count is taken in a
Ray task), like ``recmem/train/distributed/launcher.py``.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from recmem.config import Config, load_config
from recmem.data.synthetic import generate

LINK_BYTES_PER_S = 25e9 / 8
LATENCY_S = 20e-6  # per message; gloo's all-to-all sends W - 1 messages, a ring all-reduce 2 (W - 1)
EXCHANGES_PER_STEP = 4  # per sharded block: counts, requests, rows (forward), gradients (backward)
MEASURED = ("tables_sent_bytes_per_step", "all_to_all_sent_bytes_per_step", "allreduce_payload_bytes_per_step")
"""The ``traffic/*`` metrics the report shows, in its column order."""


@dataclass(frozen=True)
class ScalingOptions:
    """What one run measures.

    Attributes:
        config: the model and data config (``jobs/configs/quickstart.yaml``).
        rows: training rows to generate (validation: a fifth of that).
        workers: worker counts; 1 runs unsharded, each larger count once per ``sharding``.
        sharding: ``ray.sharding`` values for runs of more than 1 worker.
        train_cpus: CPUs reserved for the training workers together (each runs one torch thread).
        workdir: where data and runs go ("": a new temporary folder).
    """

    config: str
    rows: int = 60_000
    workers: tuple[int, ...] = (1, 2)
    sharding: tuple[str, ...] = ("id",)
    train_cpus: float = 1.0
    workdir: str = ""


@dataclass
class ScalingResult:
    """The base config, rank 0's final metrics (plus ``wall_s``) per (workers, sharding), and the dense
    part's parameter count; ``sharding`` is "none" for the 1-worker run."""

    cfg: Config
    runs: dict[tuple[int, str], dict[str, float]]
    dense_params: int


def ring_sent(payload: float, workers: int) -> float:
    """Bytes one worker sends in a ring all-reduce of ``payload`` bytes."""
    return 2 * (workers - 1) / workers * payload


def project(step_s: float, data_s: float, local_batch: int, alltoall_all: float, payload: float, blocks: int,
            workers: int) -> dict[str, float | str]:
    """Samples/s of ``workers`` workers, each with ``local_batch`` rows, ``step_s`` of compute and
    ``data_s`` of reading its next batch per step, and which of the three parts limits.

    ``alltoall_all`` is what one worker's exchanges would weigh if none of its keys were its own; a
    share ``(W - 1) / W`` crosses the network. ``payload`` is the all-reduce's, sent by a ring.
    Compute, reading and communication do not overlap (they do not in this implementation; each
    worker reads its own rows, so ``data_s`` does not grow with W), bandwidth is the full 25 Gb/s per
    worker, latency ``LATENCY_S``.
    """
    remote = (workers - 1) / workers
    net_bytes = alltoall_all * remote + ring_sent(payload, workers)
    messages = blocks * EXCHANGES_PER_STEP * (workers - 1) + 2 * (workers - 1)
    net_s = net_bytes / LINK_BYTES_PER_S + messages * LATENCY_S
    parts = {"compute": step_s, "data": data_s, "network": net_s}
    return {"bytes": net_bytes, "net_ms": net_s * 1e3, "limit": max(parts, key=parts.__getitem__),
            "samples_per_s": workers * local_batch / (step_s + data_s + net_s)}


def _count_dense_parameters(cfg: Config) -> int:
    from recmem.models import build_dense  # in a Ray worker: models import torchrec

    return sum(p.numel() for p in build_dense(cfg.model, cfg.data.schema).parameters())


def dense_parameters(cfg: Config) -> int:
    """Parameters of ``cfg``'s dense part, counted in a Ray task so that the driver imports no torchrec."""
    return ray.get(ray.remote(num_cpus=0)(_count_dense_parameters).remote(cfg))


def timed_run(cfg: Config) -> dict[str, float]:
    """One Ray training run; rank 0's final metrics plus the job's wall time."""
    from recmem.train.distributed import train_ray

    start = time.perf_counter()
    result = train_ray(cfg)
    return {**result.metrics, "wall_s": time.perf_counter() - start}


def run_scaling(opts: ScalingOptions) -> ScalingResult:
    """Generate the data (unless the workdir has it), start a local Ray, train every run, stop Ray."""
    workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="recmem-scaling-"))
    data = [f"data.root={workdir / 'data'}", f"data.synthetic.train_rows={opts.rows}",
            f"data.synthetic.valid_rows={opts.rows // 5}"]
    base = load_config(opts.config, data)
    if not (workdir / "data" / "train").is_dir():
        generate(base.data.synthetic, base.data.schema, Path(base.data.root), progress=False)
    ray.init(address="local", num_cpus=None)
    try:
        runs = {}
        for w in opts.workers:
            for sharding in opts.sharding if w > 1 else ["none"]:
                cfg = load_config(opts.config, data + [
                    f"workdir={workdir / f'w{w}-{sharding}'}", f"ray.num_workers={w}",
                    f"ray.cpus_per_worker={opts.train_cpus / w}", "ray.torch_threads=1",
                    f"ray.sharding={'auto' if sharding == 'none' else sharding}", "ray.measure_traffic=true",
                    "train.eval_every=0", "train.checkpoint_every=0", "train.progress=false",
                    "tracking.enabled=false", "train.resume=false"])
                runs[w, sharding] = timed_run(cfg)
        params = dense_parameters(base)
    finally:
        ray.shutdown()
    return ScalingResult(base, runs, params)


def report(result: ScalingResult) -> str:
    """The Markdown tables BENCHMARKS.md quotes: one row per run, then the projection."""
    cfg, runs, params = result.cfg, result.runs, result.dense_params
    lines = [f"global batch {cfg.data.batch_size}, {len(cfg.data.schema.sparse)} sparse features, "
             f"dim {cfg.model.tables[0].embedding_dim}, {params:,} dense parameters\n",
             "bytes per step per worker. Measured: tables = sent to other ranks by the table exchanges "
             "(all-to-all, reduce-scatter, all-gather); all-reduce payload = DDP's gradient buckets. "
             "Computed, not measured: ring-sent = what a ring all-reduce sends, 2 (W - 1) / W x payload, "
             "from the measured payload and from 4 B x the dense parameter count\n",
             "| workers | sharding | loop samples/s | job wall s | valid AUC | tables sent | of which all-to-all "
             "| all-reduce payload | all-reduce ring-sent (from measured payload) "
             "| all-reduce ring-sent (from params) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (w, sharding), m in runs.items():
        sent = [m.get(f"traffic/{k}", 0.0) for k in MEASURED]
        lines.append(f"| {w} | {sharding} | {m['train/samples_per_second']:,.0f} | {m['wall_s']:.0f} "
                     f"| {m['valid/auc']:.4f} " + "".join(f"| {b:,.0f} " for b in sent)
                     + f"| {ring_sent(sent[2], w):,.0f} | {ring_sent(4 * params, w):,.0f} |")
    sharded = [key for key in runs if key[1] == "id"]
    if not sharded or (1, "none") not in runs:
        return "\n".join(lines)
    w = sharded[0][0]
    measured = runs[sharded[0]]
    a2a = measured.get("traffic/tables_sent_bytes_per_step", 0.0)
    payload = measured.get("traffic/allreduce_payload_bytes_per_step", 0.0)
    local_batch = cfg.data.batch_size // w
    one = runs[1, "none"]
    step_s = local_batch / one["train/samples_per_second"]  # one worker's compute for b rows
    data_s = one["train/data_wait_seconds"] / one["step"] * local_batch / cfg.data.batch_size
    lines += [f"\nprojection: {local_batch} rows per worker per step, {step_s * 1e3:.0f} ms compute and "
              f"{data_s * 1e3:.1f} ms reading each (measured, 1 worker), 25 Gb/s, "
              f"{LATENCY_S * 1e6:.0f} us per message\n",
              "| workers | network B/step/worker | network ms/step | samples/s | limit |", "|---|---|---|---|---|"]
    for n in (w, 8, 64):
        est = project(step_s, data_s, local_batch, a2a * w / (w - 1), payload, len(cfg.model.tables), n)
        lines.append(f"| {n} | {est['bytes']:,.0f} | {est['net_ms']:.2f} | {est['samples_per_s']:,.0f} "
                     f"| {est['limit']} |")
    return "\n".join(lines)
