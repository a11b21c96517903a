"""The Ray worker group (``recmem/train/distributed/group.py``) on the test run's local Ray: rank 0's
value comes back, every rank knows its place, a ValueError is raised at once, a worker that dies or
raises brings the whole group down and a new one up, and no actor outlives ``run_workers`` (success,
failure, Ctrl-C). Training resumed from a checkpoint by a new group is in ``test_distributed_ray.py``.
"""

from __future__ import annotations

import _thread
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from recmem.train.distributed.group import WorkerFailed, run_workers, worker_context
from tests.conftest import recmem_workers, tiny_config


def _no_group_left(timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while recmem_workers() and time.monotonic() < deadline:
        time.sleep(0.2)
    return not recmem_workers()


def _config(tmp_path: Path):
    return tiny_config(tmp_path / "data", tmp_path, "ray.num_workers=2", "ray.cpus_per_worker=0.5")


def _joined(payload: dict) -> dict:
    """Every rank: its context and the sum of all ranks' ``rank + 1`` (a collective)."""
    import torch
    import torch.distributed as dist

    context = worker_context()
    total = torch.tensor([context.rank + 1.0])
    dist.all_reduce(total)
    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    return {"context": context, "sum": total.item(), "env": env, "payload": payload}


def _failing(payload: dict) -> None:
    """Rank 1 dies (SIGKILL) on its first start and raises ``payload["error"]`` on later ones while
    rank 0 waits for it in a collective; every start of every rank leaves a file."""
    import torch
    import torch.distributed as dist

    rank = worker_context().rank
    folder = Path(payload["folder"])
    starts = len(list(folder.glob(f"start-{rank}-*")))
    (folder / f"start-{rank}-{starts}").touch()
    if rank == 1:
        if starts == 0 and payload["kill_first"]:
            os.kill(os.getpid(), signal.SIGKILL)
        raise payload["error"]
    dist.all_reduce(torch.zeros(1))  # never completes: rank 1 is gone


def _waiting(payload: dict) -> None:
    """Every rank marks that it started, then waits far longer than the test."""
    (Path(payload["folder"]) / f"running-{worker_context().rank}").touch()
    time.sleep(600)


def test_rank_0s_value_comes_back_and_every_rank_knows_its_place(ray_cluster, tmp_path):
    result = run_workers(_config(tmp_path), _joined, {"x": 1})
    context = result["context"]
    assert (context.rank, context.world_size, context.local_rank, context.local_world_size) == (0, 2, 0, 2)
    assert context.device == "cpu" and context.group_id
    assert result["sum"] == 3.0 and result["payload"] == {"x": 1}
    assert result["env"] == {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    assert _no_group_left(), "the actors end with the group"
    with pytest.raises(RuntimeError, match="only known inside a function run by run_workers"):
        worker_context()


def test_a_value_error_is_raised_as_itself_without_a_retry(ray_cluster, tmp_path):
    payload = {"folder": str(tmp_path), "kill_first": False, "error": ValueError("bad row 7 in part-0")}
    with pytest.raises(ValueError, match="bad row 7 in part-0"):
        run_workers(_config(tmp_path), _failing, payload, retries=2)
    assert len(list(tmp_path.glob("start-1-*"))) == 1, "no second start"
    assert _no_group_left(), "rank 0, left waiting in its collective, is killed"


def test_a_dead_or_failing_worker_restarts_the_whole_group_until_the_retries_run_out(ray_cluster, tmp_path, capsys):
    payload = {"folder": str(tmp_path), "kill_first": True, "error": RuntimeError("disk on fire")}
    started = time.monotonic()
    with pytest.raises(WorkerFailed, match=r"Ray worker 1 failed \(RuntimeError: disk on fire\); gave up after "
                                           r"2 restarts of the workers$") as failed:
        run_workers(_config(tmp_path), _failing, payload, retries=2)
    print(f"three starts of two workers, each ended at its first failure: {time.monotonic() - started:.1f} s")
    assert failed.value.rank == 1 and isinstance(failed.value.cause, RuntimeError)
    assert len(list(tmp_path.glob("start-0-*"))) == len(list(tmp_path.glob("start-1-*"))) == 3
    out = capsys.readouterr().out
    assert "recmem: worker 1 failed (ActorDiedError: " in out and "(retry 1 of 2)" in out
    assert "recmem: worker 1 failed (RuntimeError: disk on fire); restarting" in out and "(retry 2 of 2)" in out
    assert _no_group_left()


def test_ctrl_c_on_the_driver_ends_the_workers(ray_cluster, tmp_path):
    """(SIGTERM takes the same way out: ray.init's handler raises SystemExit in a driver's main thread.
    Not sent here: Ray's native signal handler then aborts this process at its exit.)"""
    running: list[int] = []

    def interrupt_once_running() -> None:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("running-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        running.extend(recmem_workers())
        _thread.interrupt_main()

    threading.Thread(target=interrupt_once_running, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_workers(_config(tmp_path), _waiting, {"folder": str(tmp_path)})
    assert len(running) == 2, "both workers were running when Ctrl-C came"
    assert _no_group_left(), "the driver lives on; its workers do not"


def test_a_group_the_local_ray_cannot_place_is_refused_before_it_waits(ray_cluster, tmp_path):
    import ray

    from recmem.config import ConfigError
    from recmem.train.distributed.launcher import _check_fits

    cpus = int(ray.cluster_resources()["CPU"])
    cfg = tiny_config(tmp_path / "data", tmp_path, f"ray.num_workers={cpus + 1}", "ray.cpus_per_worker=1")
    with pytest.raises(ConfigError, match=r"ray.num_workers=\d+ x ray.cpus_per_worker=1 needs \d+ CPUs"):
        _check_fits(cfg, embedded=True)
    _check_fits(cfg, embedded=False)  # a cluster may add nodes: the group waits there, with a line saying so
    fits = tiny_config(tmp_path / "data", tmp_path, f"ray.num_workers={cpus * 2}", "ray.cpus_per_worker=0.5")
    _check_fits(fits, embedded=True)
    cuda = tiny_config(tmp_path / "data", tmp_path, "train.device=cuda")
    if ray.cluster_resources().get("GPU", 0) < 1:
        with pytest.raises(ConfigError, match="train.device=cuda needs a GPU per worker"):
            _check_fits(cuda, embedded=False)


def test_the_cli_reports_workers_that_gave_up_in_one_line(monkeypatch, tmp_path, capsys):
    from recmem import cli

    def fail(cfg):
        raise WorkerFailed(1, ConnectionError("peer closed\n  traceback lines"), 3)

    monkeypatch.setattr(cli, "_train", fail)
    assert cli.main(["train", f"workdir={tmp_path}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("recmem train: error: Ray worker 1 failed (ConnectionError: peer closed); "
                   "gave up after 3 restarts of the workers")
