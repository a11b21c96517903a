"""Ray checkpoints, the parts that need no Ray running: which checkpoint ``recmem evaluate`` picks, the
error when there is none, and a worker's fallback past a corrupt shard (one worker: no collectives).
The runs on Ray itself are in ``test_distributed_ray.py`` (evaluation reuses that module's 2-worker
training run).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs
import pytest
import ray
import torch

from recmem.cli import main
from recmem.train.distributed import evaluate_ray
from recmem.train.distributed.store import (
    RayCheckpoints, complete_checkpoints, latest_checkpoint, shard_name, write_shard,
)
from tests.conftest import tiny_config


def _checkpoint(run: Path, folder: str, step: int | None, ranks: range, world_size: int = 2) -> Path:
    """A fake Ray checkpoint folder: ``meta.json`` (unless ``step`` is None) and the ``ranks``' shards."""
    path = run / folder
    path.mkdir(parents=True)
    if step is not None:
        (path / "meta.json").write_text(json.dumps({"step": step, "world_size": world_size, "plan": {}}))
    for r in ranks:
        (path / shard_name(r)).write_bytes(b"")
    return path


def test_latest_checkpoint_is_the_highest_complete_step(tmp_path):
    run = tmp_path / "storage" / "recmem"
    older = _checkpoint(run, "checkpoint_b", 4, range(2))
    _checkpoint(run, "checkpoint_a", 2, range(2))
    newer = _checkpoint(run, "checkpoint_c", 8, range(1))  # rank 1's shard never arrived
    _checkpoint(run, "checkpoint_d", None, range(2))  # rank 0 never wrote meta.json
    _checkpoint(run, "not_a_checkpoint", 12, range(2))
    fs, folder, meta = latest_checkpoint(str(tmp_path / "storage"), "recmem")
    assert (folder, meta["step"]) == (str(older), 4)
    assert fs.get_file_info(f"{folder}/meta.json").size > 0
    (newer / shard_name(1)).write_bytes(b"")
    assert latest_checkpoint(str(tmp_path / "storage"), "recmem")[1] == str(newer)
    assert latest_checkpoint(str(tmp_path / "storage"), "other") is None
    assert latest_checkpoint(str(tmp_path / "nowhere"), "recmem") is None
    # ray.storage_path may be a filesystem URI (s3://, gs://, file://): the same lookup through pyarrow.
    assert latest_checkpoint((tmp_path / "storage").as_uri(), "recmem")[1] == str(newer)


def test_complete_checkpoints_are_listed_newest_first(tmp_path):
    """By step, then by folder name (Ray names them by time: a step saved again after a fallback)."""
    run = tmp_path / "recmem"
    a, b, c = (_checkpoint(run, f"checkpoint_2025-01-0{d}", step, range(2)) for d, step in ((1, 8), (2, 4), (3, 8)))
    _checkpoint(run, "checkpoint_2025-01-04", 12, range(1))  # incomplete
    (_checkpoint(run, "checkpoint_2025-01-05", 16, range(2)) / "meta.json").write_text("{garbled")
    fs, _, _ = latest_checkpoint(str(tmp_path), "recmem")
    listed = complete_checkpoints(fs, str(run))
    assert [(folder, meta["step"]) for folder, meta in listed] == [(str(c), 8), (str(a), 8), (str(b), 4)]
    assert latest_checkpoint(str(tmp_path), "recmem")[1] == str(c)
    assert complete_checkpoints(fs, str(tmp_path / "nowhere")) == []


def test_one_worker_resumes_from_the_checkpoint_before_a_corrupt_one(tmp_path, capsys):
    run = tmp_path / "recmem"
    folders = [_checkpoint(run, f"checkpoint_{step:02d}", step, range(1), world_size=1) for step in (4, 8)]
    for folder, step in zip(folders, (4, 8)):
        write_shard(folder, 0, {"step": step})
    (folders[1] / shard_name(0)).write_bytes(b"garbage")
    folder = (pyarrow.fs.LocalFileSystem(), str(run))
    store = RayCheckpoints(0, 1, {}, run=folder)
    assert store.load() == {"step": 4} and store.loaded_from == str(folders[0])
    assert f"skipping checkpoint {folders[1]}, a shard does not load (rank 0: " in capsys.readouterr().out
    (folders[0] / shard_name(0)).write_bytes(b"")
    with pytest.raises(RuntimeError, match=f"no checkpoint of the Ray run {run} loads on all 1 workers"):
        RayCheckpoints(0, 1, {}, run=folder).load()
    with pytest.raises(ValueError, match="written by 1 workers with plan {}"):  # a mismatch: no fallback
        RayCheckpoints(0, 1, {"sharding": "id"}, run=folder).load()
    assert RayCheckpoints(0, 1, {}, run=(folder[0], str(tmp_path / "fresh"))).load() is None


def test_no_checkpoint_names_the_storage_the_run_and_the_runs_there(tmp_path):
    cfg = tiny_config(tmp_path / "data", tmp_path, "ray.run_name=mine")
    storage = tmp_path / "runs" / "checkpoints" / "ray"
    with pytest.raises(FileNotFoundError, match=f"'mine' under {storage}: run `recmem train`") as e:
        evaluate_ray(cfg)
    assert "runs with checkpoints" not in str(e.value)
    _checkpoint(storage / "mine-20250101-000000", "checkpoint_0", 16, range(2))
    running = ray.is_initialized()  # another test's Ray may be up: this call must start none
    with pytest.raises(FileNotFoundError, match="runs with checkpoints there: mine-20250101-000000"):
        evaluate_ray(cfg)
    assert ray.is_initialized() == running, "nothing to evaluate: no Ray started"


def test_cli_evaluates_on_ray_by_default(tmp_path, capsys):
    args = [f"workdir={tmp_path}", f"data.root={tmp_path / 'data'}"]
    assert main(["evaluate", *args]) == 2
    assert "no complete checkpoint of the Ray run 'recmem'" in capsys.readouterr().err
    assert main(["evaluate", *args, "ray.enabled=false"]) == 2
    assert "run `recmem train` first" in capsys.readouterr().err
