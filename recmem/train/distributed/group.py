"""recmem's Ray worker group: ``ray.num_workers`` plain Ray actors joined in one ``torch.distributed``
group, each running the same function. It does for recmem what Ray Train's ``TorchTrainer`` did, without
its controller, coordinator and helper actors (seconds of start-up: BENCHMARKS.md, "Where Ray Train's
start-up goes")::

    driver: run_workers(cfg, fn, payload, retries)      worker r of W (one Ray actor each)
      a placement group of W bundles, PACK                {CPU: ray.cpus_per_worker, GPU: 1 under cuda}
      rank 0: its node's IP and a free port         ->    MASTER_ADDR, MASTER_PORT
      every rank: its node and GPU                  ->    RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
                                                          its device (CUDA_VISIBLE_DEVICES: its node's GPUs)
                                                          init_process_group (gloo; NCCL under cuda)
      <- rank 0's return value                            fn(payload), asking worker_context() who it is

PACK places the workers on as few nodes as fit, as Ray Train's default does; the placement group reserves
every worker's resources at once, so a group never starts half-placed (its first collective would wait for
workers that cannot start). The workers' output reaches the driver's console by Ray's log forwarding.

Failure: the first worker that raises or dies (killed, its node lost) ends the whole group at once, since
the others would wait in their next collective until its timeout; then a new group starts, up to
``retries`` times, and ``fn`` resumes from what it saved (training: its latest complete checkpoint, see
``store.py``). A ``ValueError`` (bad config or data, a refused resume, a diverged loss) would fail the same
way on every start: it is raised as itself at once. The actors are killed whenever :func:`run_workers`
ends: on success, on failure, and on Ctrl-C or SIGTERM (Ray's driver turns SIGTERM into ``SystemExit``).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from recmem.config import Config

T = TypeVar("T")


@dataclass(frozen=True)
class WorkerContext:
    """Who a worker is in its group (:func:`worker_context`).

    Attributes:
        rank: this worker, 0 .. world_size - 1.
        world_size: the workers in the group.
        local_rank: this worker among those on its node.
        local_world_size: the workers on its node.
        device: ``"cpu"``, or ``"cuda:<i>"``: this worker's GPU under ``train.device: cuda``.
        group_id: this start of the group, the same on every rank, unique per start and in time order
            (checkpoint folders are named by it).
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: str
    group_id: str


class WorkerFailed(RuntimeError):
    """A worker of the group failed on its last allowed start.

    Attributes:
        rank: the worker that failed first.
        cause: what it raised, or Ray's error for its death (``ray.exceptions.ActorDiedError``).
        retries: the new groups started before giving up.
    """

    def __init__(self, rank: int, cause: BaseException, retries: int) -> None:
        why = (str(cause).strip().splitlines() or [""])[0][:300]
        super().__init__(f"Ray worker {rank} failed ({type(cause).__name__}: {why}); gave up after {retries} "
                         f"restart{'s' * (retries != 1)} of the workers")
        self.rank, self.cause, self.retries = rank, cause, retries


_context: WorkerContext | None = None
"""This process's place in its group while it runs a group's function (set by ``RecmemWorker.run``)."""


def worker_context() -> WorkerContext:
    """This worker's place in its group; inside a function :func:`run_workers` runs.

    Raises:
        RuntimeError: called outside a worker group.
    """
    if _context is None:
        raise RuntimeError("worker_context() is only known inside a function run by run_workers()")
    return _context


def run_workers(cfg: Config, fn: Callable[[Any], T], payload: Any, retries: int = 0) -> T:
    """Run ``fn(payload)`` on ``ray.num_workers`` new Ray actors joined in one process group; rank 0's
    return value. Ray must be running (``ray.init``) in this process.

    ``fn`` must be importable by name on the workers (a module-level function); ``payload`` is sent once
    through Ray's object store. Each worker has ``ray.cpus_per_worker`` CPUs (and one GPU under
    ``train.device: cuda``).

    Raises:
        ValueError: what a worker raised as a ``ValueError`` (or a subclass), as itself, without retry.
        WorkerFailed: a worker raised anything else or died, on the first start and on ``retries`` more
            (-1: retried for ever).
    """
    import ray

    shared = ray.put(payload)
    for attempt in itertools.count(1):
        try:
            return _run_group(cfg, fn, shared)
        except _Failure as failure:
            if isinstance(failure.cause, ValueError):
                raise failure.cause from None
            if 0 <= retries < attempt:
                raise WorkerFailed(failure.rank, failure.cause, retries) from failure.cause
            why = (str(failure.cause).strip().splitlines() or [""])[0][:200]
            print(f"recmem: worker {failure.rank} failed ({type(failure.cause).__name__}: {why}); restarting "
                  f"the workers from the latest checkpoint (retry {attempt} of {retries if retries >= 0 else 'any'})",
                  flush=True)


class _Failure(Exception):
    """Inside :func:`run_workers`: worker ``rank`` raised ``cause`` or died of it."""

    def __init__(self, rank: int, cause: BaseException) -> None:
        super().__init__(rank, cause)
        self.rank, self.cause = rank, cause


def _run_group(cfg: Config, fn: Callable[[Any], T], payload: Any) -> T:
    """One start of the group: place, start and join the workers, run ``fn``, end them all."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    size, gpu = cfg.ray.num_workers, cfg.train.device == "cuda"
    bundle = {"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if gpu else {})}
    group = placement_group([bundle] * size, strategy="PACK")
    actors = []
    try:
        if not ray.wait([group.ready()], timeout=60)[0]:
            free = {k: v for k, v in ray.available_resources().items() if k in bundle}
            print(f"recmem: waiting for Ray to place {size} workers of {bundle} (free in the cluster now: "
                  f"{free}; an autoscaling cluster may add nodes)", flush=True)
            ray.get(group.ready())
        worker = ray.remote(RecmemWorker)
        actors = [worker.options(num_cpus=cfg.ray.cpus_per_worker, num_gpus=1 if gpu else 0,
                                 scheduling_strategy=PlacementGroupSchedulingStrategy(group, i)).remote(i)
                  for i in range(size)]
        places = _gather([a.place.remote() for a in actors])
        master = places[0][2]  # rank 0's
        contexts = _contexts([(node, gpus) for node, gpus, _ in places], gpu)
        return _gather([a.run.remote(fn, payload, c, master, gpu) for a, c in zip(actors, contexts)])[0]
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(group)


def _gather(refs: list[Any]) -> list[Any]:
    """Every rank's result, in rank order, as they finish; the first failure raises at once.

    Raises:
        _Failure: the first rank (in time) whose call raised or whose actor died.
    """
    import ray

    pending, results = {ref: rank for rank, ref in enumerate(refs)}, {}
    while pending:
        [ready], _ = ray.wait(list(pending), num_returns=1)
        rank = pending.pop(ready)
        try:
            results[rank] = ray.get(ready)
        except ray.exceptions.RayTaskError as e:  # the worker's function raised: its own exception
            raise _Failure(rank, e.cause if isinstance(e.cause, BaseException) else e) from None
        except ray.exceptions.RayError as e:  # the actor died (killed, out of memory, node lost)
            raise _Failure(rank, e) from None
    return [results[rank] for rank in range(len(refs))]


def _contexts(places: list[tuple[str, list[str]]], gpu: bool) -> list[tuple[WorkerContext, list[str]]]:
    """Each rank's context and its node's GPUs, from every rank's (node ID, GPU IDs) in rank order.

    Ranks count on a node in rank order (local ranks); under cuda a worker sees all of its node's
    group GPUs (NCCL reaches peers on the same node directly then) and uses its own among them.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + f".{time.time_ns() // 1000 % 1_000_000:06d}"
    nodes: dict[str, list[int]] = {}
    for rank, (node, _) in enumerate(places):
        nodes.setdefault(node, []).append(rank)
    out = []
    for rank, (node, gpus) in enumerate(places):
        here = nodes[node]
        node_gpus = sorted({g for r in here for g in places[r][1]}, key=lambda g: (len(g), g))
        device = f"cuda:{node_gpus.index(gpus[0])}" if gpu else "cpu"
        out.append((WorkerContext(rank, len(places), here.index(rank), len(here), device, stamp), node_gpus))
    return out


class RecmemWorker:
    """One worker of the group: a Ray actor (its process is titled ``ray::RecmemWorker``)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __repr__(self) -> str:  # Ray prefixes the worker's console lines with it
        return f"recmem worker {self.rank}"

    def place(self) -> tuple[str, list[str], tuple[str, int]]:
        """(this node's ID, the GPU IDs Ray gave this worker, (this node's IP, a port free on it)):
        the group's store listens at rank 0's address."""
        import socket

        import ray

        address = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((address, 0))
            port = s.getsockname()[1]
        return ray.get_runtime_context().get_node_id(), [str(g) for g in ray.get_gpu_ids()], (address, port)

    def run(self, fn: Callable[[Any], T], payload: Any, place: tuple[WorkerContext, list[str]],
            master: tuple[str, int], gpu: bool) -> T:
        """Join the group as ``place`` says, run ``fn(payload)`` and return its value."""
        global _context
        context, node_gpus = place
        os.environ.update(RANK=str(context.rank), WORLD_SIZE=str(context.world_size),
                          LOCAL_RANK=str(context.local_rank), LOCAL_WORLD_SIZE=str(context.local_world_size),
                          MASTER_ADDR=master[0], MASTER_PORT=str(master[1]))
        if gpu:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(node_gpus)  # before torch first touches CUDA
        import torch
        import torch.distributed as dist

        if gpu:
            torch.cuda.set_device(torch.device(context.device))  # NCCL's collectives run on the current GPU
        dist.init_process_group("nccl" if gpu else "gloo", init_method="env://",
                                rank=context.rank, world_size=context.world_size)
        _context = context
        result = fn(payload)
        # Only on success: after a failure the driver kills every worker, and a group whose peers are
        # gone may block here.
        dist.destroy_process_group()
        _context = None
        return result
