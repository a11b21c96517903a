"""The Ray path against the single-process loop, as a user meets it: the same ``recmem train`` command,
(a) with ``ray.enabled=false``, (b) on an embedded Ray with 1 worker, (c) with 2 workers.

For each, from the command's own MLflow run (``recmem/train/loop.py`` logs these):

- wall: the command from its start to its exit (Ray start and shutdown, validation and checkpoint
  included), measured here around the process;
- pass samples/s: rows trained over the training pass's time, waits for the next batch included
  (validation and checkpoints not); steps samples/s: the steps' own time only;
- start-up: seconds from the command's start to each phase (``startup/*_s``: Ray ready, MLflow run
  open, workers started, their model built, first step done).

Beside them, Ray's own floors (:func:`ray_floor`): the start-up of an empty Ray Train job, the least
any Ray Train job pays on this machine (recmem's workers ran under Ray Train's ``TorchTrainer`` until
it started them itself: the baseline); and the floor of plain Ray actors (``plain=True``): one actor
that imports torch and joins a gloo group, the least recmem's own worker group (``group.py``) pays. And the data stream alone: the rate at which a worker's reader (``recmem/train/distributed/data.py``:
its row ranges read with pyarrow and collated into Batches) delivers one pass over the training split
on one core, for each worker of 1 and of 2, against the rate its trainer consumes (run (b)'s steps).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from recmem.config import Config, load_config

VARIANTS = {"single": ["ray.enabled=false"], "ray_1": ["ray.num_workers=1"], "ray_2": ["ray.num_workers=2"]}
"""The runs, by name, and what each adds to the config."""
STARTUP = ("ray_ready", "mlflow_ready", "worker_start", "model_built", "first_step")
"""The start-up marks, in the order they happen (the single process has ``first_step`` only)."""


@dataclass(frozen=True)
class RayPathOptions:
    """What one run measures.

    Attributes:
        config: the job (``jobs/configs/quickstart.yaml``).
        workdir: where data and runs go; the data is generated once and kept.
        overrides: more ``key=value`` settings for every run (e.g. fewer rows).
        variants: which of :data:`VARIANTS` to run, in order.
        floor: also measure Ray's floors (:func:`ray_floor`, Ray Train's and a plain actor's).
        repeat: rounds of the variants, taken in turn (so that a burst of load on a shared machine
            hits them alike); each variant's figures are those of its median round by pass
            samples/s, with the spread of that rate beside them.
    """

    config: str
    workdir: str
    overrides: tuple[str, ...] = ()
    variants: tuple[str, ...] = tuple(VARIANTS)
    floor: bool = True
    repeat: int = 1


@dataclass
class RayPathResult:
    """Per variant: its median round's metrics plus ``wall_s`` (and ``pass_min`` / ``pass_max`` over
    the rounds); per (workers, rank): the stream's rows/s alone."""

    runs: dict[str, dict[str, float]] = field(default_factory=dict)
    stream: dict[tuple[int, int], float] = field(default_factory=dict)
    cpu: str = ""


def run_ray_path(opts: RayPathOptions, say=print) -> RayPathResult:
    """Generate the data if missing, run every variant as its own ``recmem train`` process, then time
    the data stream alone."""
    import torch

    base = load_config(opts.config, _overrides(opts, "data"))
    if not (Path(base.data.root) / "train").is_dir():
        from recmem.data.synthetic import generate

        say(f"generating {base.data.synthetic.train_rows:,} + {base.data.synthetic.valid_rows:,} rows")
        generate(base.data.synthetic, base.data.schema, Path(base.data.root), progress=False)
    result = RayPathResult(cpu=torch.backends.cpu.get_cpu_capability())
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in opts.variants}
    for turn in range(opts.repeat):
        for name in opts.variants:
            say(f"training: {name} (round {turn + 1} of {opts.repeat})")
            rounds[name].append(timed_command(opts, name))
    for name, runs in rounds.items():
        rates = sorted(r["train/pass_samples_per_second"] for r in runs)
        median = next(r for r in runs if r["train/pass_samples_per_second"] == rates[len(rates) // 2])
        result.runs[name] = {**median, "pass_min": rates[0], "pass_max": rates[-1]}
    if opts.floor:
        for name, plain in (("ray_floor", False), ("actor_floor", True)):
            say(f"Ray's floor: {'a plain actor' if plain else 'an empty Ray Train loop'}")
            floor = subprocess.run([sys.executable, "-c", f"from recmem.bench.ray_path import ray_floor; ray_floor({plain})"],
                                   capture_output=True, text=True, check=True)
            result.runs[name] = json.loads(floor.stdout.strip().splitlines()[-1])
    for workers in (1, 2):
        for rank in range(workers):
            result.stream[workers, rank] = stream_rate(base, workers, rank)
    return result


def timed_command(opts: RayPathOptions, name: str) -> dict[str, float]:
    """Run ``recmem train`` for variant ``name`` in a fresh process; its MLflow metrics and wall time."""
    import mlflow

    args = [*_overrides(opts, name), "train.resume=false", *VARIANTS[name]]
    cfg = load_config(opts.config, args)
    Path(cfg.workdir).mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "recmem.cli", "train", "--config", opts.config, *args]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    run = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    return {**run.data.metrics, "wall_s": wall}


def ray_floor(plain: bool = False) -> None:
    """Print, as JSON, the start-up of an empty Ray Train job (embedded Ray without dashboard, as
    recmem starts it; one worker of one CPU, gloo): seconds from this process's start to Ray ready and
    to the worker's first line, and the wall time to the end of ``fit()``. With ``plain``, the worker
    is a plain Ray actor that imports torch and joins a one-rank gloo group, as recmem's are."""
    import psutil
    import ray

    started = psutil.Process().create_time()
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}})
    ready = time.time()
    if plain:
        entered = ray.get(ray.remote(num_cpus=1)(_PlainWorker).remote().enter.remote())
    else:
        import ray.train
        from ray.train.torch import TorchConfig, TorchTrainer

        with tempfile.TemporaryDirectory(prefix="recmem-floor-") as storage:
            trainer = TorchTrainer(
                _report_entry, torch_config=TorchConfig(backend="gloo"),
                scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                run_config=ray.train.RunConfig(storage_path=storage, name="floor",
                                               logging_config=ray.train.LoggingConfig(log_level="WARNING")))
            entered = trainer.fit().metrics["entered"]
    ray.shutdown()
    print(json.dumps({"startup/ray_ready_s": ready - started, "startup/worker_start_s": entered - started,
                      "wall_s": time.time() - started}))


class _PlainWorker:
    """A Ray actor doing what a Ray Train worker does before the user's function: torch, a gloo group."""

    def enter(self) -> float:
        import torch.distributed as dist

        from recmem.bench import free_port

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        entered = time.time()
        dist.destroy_process_group()
        return entered


def _report_entry(config: dict) -> None:
    """An empty training loop: reports when it began (with a checkpoint: Ray Train hands the driver
    only metrics reported with one)."""
    import ray.train

    entered = time.time()
    with tempfile.TemporaryDirectory() as folder:
        ray.train.report({"entered": entered}, checkpoint=ray.train.Checkpoint.from_directory(folder))


def stream_rate(cfg: Config, workers: int, rank: int) -> float:
    """Rows/s at which worker ``rank`` of ``workers`` reads its share of one training pass, on one core
    (this process pinned to one CPU, one torch and one Arrow thread, for the measurement only)."""
    import pyarrow as pa
    import torch

    from recmem.train.distributed.data import plan_splits, shard_source

    cpus, threads, arrow = os.sched_getaffinity(0), torch.get_num_threads(), pa.cpu_count()
    os.sched_setaffinity(0, {min(cpus)})
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    try:
        source = shard_source(cfg, workers, rank, plan_splits(cfg, workers, ("train",)))
        start, rows = time.perf_counter(), 0
        for batch in source("train", 0, 0):
            rows += len(batch)
        return rows / (time.perf_counter() - start)
    finally:
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(threads)
        pa.set_cpu_count(arrow)


def report(result: RayPathResult) -> str:
    """Markdown: one row per variant, the start-up's parts, the stream's rates."""
    runs = result.runs
    single = runs.get("single", {}).get("train/pass_samples_per_second")
    lines = [f"cpu capability {result.cpu}\n",
             "| run | wall s | pass samples/s | vs single | rounds' pass samples/s | steps samples/s | data wait s "
             "| first step s | valid AUC |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    trained = {name: m for name, m in runs.items() if "train/pass_samples_per_second" in m}
    for name, m in trained.items():
        ratio = f"{m['train/pass_samples_per_second'] / single:.2f}x" if single else "-"
        lines.append(f"| {name} | {m['wall_s']:.1f} | {m['train/pass_samples_per_second']:,.0f} | {ratio} "
                     f"| {m['pass_min']:,.0f}-{m['pass_max']:,.0f} | {m['train/samples_per_second']:,.0f} | {m['train/data_wait_seconds']:.1f} "
                     f"| {m.get('startup/first_step_s', float('nan')):.1f} | {m['valid/auc']:.4f} |")
    lines += ["\nstart-up: seconds from the command's start to each phase (ray_floor: an empty Ray Train job; actor_floor: a plain Ray actor joining a gloo group)\n",
              "| run | " + " | ".join(STARTUP) + " |", "|---|" + "---:|" * len(STARTUP)]
    for name, m in runs.items():
        lines.append(f"| {name} | " + " | ".join(_seconds(m.get(f"startup/{k}_s")) for k in STARTUP) + " |")
    trainer = runs.get("ray_1", {}).get("train/samples_per_second")
    lines += ["\ndata stream alone (one core, one pass over the training split)\n",
              "| workers | rank | rows/s | vs run ray_1's trainer |", "|---:|---:|---:|---:|"]
    for (workers, rank), rate in result.stream.items():
        vs = f"{rate / trainer:.1f}x" if trainer else "-"
        lines.append(f"| {workers} | {rank} | {rate:,.0f} | {vs} |")
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _overrides(opts: RayPathOptions, name: str) -> list[str]:
    """The settings of variant ``name``: data under the workdir, a folder and MLflow store per run."""
    workdir = Path(opts.workdir).resolve()
    return [f"data.root={workdir / 'data'}", f"workdir={workdir / name}",
            f"tracking.tracking_uri=sqlite:///{workdir / name / 'mlflow.db'}", *opts.overrides]
