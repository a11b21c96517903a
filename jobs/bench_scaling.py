"""Ray scaling on this machine: samples/s for 1 and 2 workers, bytes per step per worker, projection.

    python jobs/bench_scaling.py --rows 60000 --sharding id auto   # ~5 min on 2 busy cores
    python jobs/bench_scaling.py --rows 400000 --workers 1 2 4      # a bigger machine

Trains the quickstart model (DLRM over ``full`` tables on recmem's synthetic Criteo-shaped data) on
one local Ray with the same global batch: once on 1 worker, then per worker count > 1 and per
``ray.sharding`` value. Prints a Markdown report: the loop's samples/s (forward, exchanges, backward,
optimizer; not time spent waiting for Ray Data), wall time of the whole job, the bytes each worker
sent per step (``ray.measure_traffic``, see ``recmem/train/distributed/traffic.py``): table
exchanges as sent to other ranks, the DDP all-reduce as its measured payload and as what a ring
sends (2 (W - 1) / W x payload, beside the same computed from the dense parameter count), and a
projection of throughput for 8 and 64 workers on a 25 Gb/s network from the first ID-sharded run
(model in ``project``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ray

from recmem.config import Config, load_config
from recmem.data.synthetic import generate
from recmem.models import build_dense
from recmem.train.distributed import train_ray

QUICKSTART = Path(__file__).resolve().parent / "configs" / "quickstart.yaml"
LINK_BYTES_PER_S = 25e9 / 8
LATENCY_S = 20e-6  # per message; gloo's all-to-all sends W - 1 messages, a ring all-reduce 2 (W - 1)
EXCHANGES_PER_STEP = 4  # per sharded block: counts, requests, rows (forward), gradients (backward)


def run(cfg: Config) -> dict[str, float]:
    """One Ray training run; rank 0's final metrics plus the job's wall time."""
    start = time.perf_counter()
    result = train_ray(cfg)
    return {**result.metrics, "wall_s": time.perf_counter() - start}


def ring_sent(payload: float, workers: int) -> float:
    """Bytes one worker sends in a ring all-reduce of ``payload`` bytes."""
    return 2 * (workers - 1) / workers * payload


def allreduce_bytes(cfg: Config, workers: int) -> float:
    """Ring-sent bytes of the dense gradients (fp32), computed from the parameter count."""
    params = sum(p.numel() for p in build_dense(cfg.model, cfg.data.schema).parameters())
    return ring_sent(4 * params, workers)


def project(step_s: float, local_batch: int, alltoall_all: float, payload: float, blocks: int,
            workers: int) -> dict[str, float]:
    """Samples/s of ``workers`` workers, each with ``local_batch`` rows and ``step_s`` of compute.

    ``alltoall_all`` is what one worker's exchanges would weigh if none of its keys were its own; a
    share ``(W - 1) / W`` crosses the network. ``payload`` is the all-reduce's, sent by a ring.
    Compute and communication do not overlap (they do not in this implementation), bandwidth is the
    full 25 Gb/s per worker, latency ``LATENCY_S``.
    """
    remote = (workers - 1) / workers
    net_bytes = alltoall_all * remote + ring_sent(payload, workers)
    messages = blocks * EXCHANGES_PER_STEP * (workers - 1) + 2 * (workers - 1)
    net_s = net_bytes / LINK_BYTES_PER_S + messages * LATENCY_S
    return {"bytes": net_bytes, "net_ms": net_s * 1e3,
            "samples_per_s": workers * local_batch / (step_s + net_s)}


def main() -> None:
    """Parse arguments, generate data, run each worker count, print the report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(QUICKSTART))
    p.add_argument("--rows", type=int, default=60_000, help="training rows to generate")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--sharding", nargs="+", default=["id"], help="ray.sharding values for runs of > 1 worker")
    p.add_argument("--train-cpus", type=float, default=1.0, help="CPUs shared by the workers (rest: Ray Data)")
    p.add_argument("--workdir", default="", help="where data and runs go (default: a temporary folder)")
    args = p.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="recmem-scaling-"))
    data = [f"data.root={workdir / 'data'}", f"data.synthetic.train_rows={args.rows}",
            f"data.synthetic.valid_rows={args.rows // 5}"]
    base = load_config(args.config, data)
    if not (workdir / "data" / "train").is_dir():
        generate(base.data.synthetic, base.data.schema, Path(base.data.root), progress=False)
    ray.init(address="local", num_cpus=None)
    results = {}
    for w in args.workers:
        for sharding in args.sharding if w > 1 else ["none"]:
            cfg = load_config(args.config, data + [
                f"workdir={workdir / f'w{w}-{sharding}'}", f"ray.num_workers={w}",
                f"ray.cpus_per_worker={args.train_cpus / w}", "ray.torch_threads=1",
                f"ray.sharding={'auto' if sharding == 'none' else sharding}", "ray.measure_traffic=true",
                "train.eval_every=0",
                "train.checkpoint_every=0", "train.progress=false", "tracking.enabled=false", "train.resume=false"])
            results[w, sharding] = run(cfg)
    ray.shutdown()
    print_report(base, results)


def print_report(cfg: Config, results: dict[tuple[int, str], dict[str, float]]) -> None:
    """The Markdown tables BENCHMARKS.md quotes."""
    print(f"global batch {cfg.data.batch_size}, {len(cfg.data.schema.sparse)} sparse features, "
          f"dim {cfg.model.tables[0].embedding_dim}\n")
    print("bytes per step per worker, measured: tables = sent to other ranks by the table exchanges "
          "(all-to-all, reduce-scatter, all-gather); all-reduce payload = DDP's gradient buckets; "
          "ring-sent = 2 (W - 1) / W x payload, from the measured payload and computed from the "
          "dense parameter count\n")
    print("| workers | sharding | loop samples/s | job wall s | valid AUC | tables sent | of which all-to-all "
          "| all-reduce payload | all-reduce ring-sent (measured) | all-reduce ring-sent (computed) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (w, sharding), m in results.items():
        sent = [m.get(f"traffic/{k}", 0.0) for k in ("tables_sent_bytes_per_step", "all_to_all_sent_bytes_per_step",
                                                       "allreduce_payload_bytes_per_step")]
        print(f"| {w} | {sharding} | {m['train/samples_per_second']:,.0f} | {m['wall_s']:.0f} | {m['valid/auc']:.4f} "
              + "".join(f"| {b:,.0f} " for b in sent)
              + f"| {ring_sent(sent[2], w):,.0f} | {allreduce_bytes(cfg, w):,.0f} |")
    sharded = [key for key in results if key[1] == "id"]
    if not sharded or (1, "none") not in results:
        return
    w = sharded[0][0]
    measured = results[sharded[0]]
    a2a = measured.get("traffic/tables_sent_bytes_per_step", 0.0)
    payload = measured.get("traffic/allreduce_payload_bytes_per_step", 0.0)
    local_batch = cfg.data.batch_size // w
    step_s = local_batch / results[1, "none"]["train/samples_per_second"]  # one worker's compute for b rows
    print(f"\nprojection: {local_batch} rows per worker per step, {step_s * 1e3:.0f} ms compute each "
          f"(measured, 1 worker), 25 Gb/s, {LATENCY_S * 1e6:.0f} us per message\n")
    print("| workers | network B/step/worker | network ms/step | samples/s |")
    print("|---|---|---|---|")
    for n in (w, 8, 64):
        est = project(step_s, local_batch, a2a * w / (w - 1), payload, len(cfg.model.tables), n)
        print(f"| {n} | {est['bytes']:,.0f} | {est['net_ms']:.2f} | {est['samples_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
