"""``recmem evaluate`` after a Ray run, the parts that need no Ray: which checkpoint it picks, and the
error when there is none. The run on Ray itself is in ``test_distributed_ray.py`` (it reuses that
module's 2-worker training run).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from recmem.cli import main
from recmem.train.distributed import evaluate_ray
from recmem.train.distributed.store import latest_checkpoint, shard_name
from tests.conftest import tiny_config


def _checkpoint(run: Path, folder: str, step: int | None, ranks: range) -> Path:
    """A fake Ray checkpoint folder: ``meta.json`` (unless ``step`` is None) and the ``ranks``' shards."""
    path = run / folder
    path.mkdir(parents=True)
    if step is not None:
        (path / "meta.json").write_text(json.dumps({"step": step, "world_size": 2, "plan": {}}))
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


def test_no_checkpoint_names_the_storage_the_run_and_the_runs_there(tmp_path):
    cfg = tiny_config(tmp_path / "data", tmp_path, "ray.run_name=mine")
    storage = tmp_path / "runs" / "checkpoints" / "ray"
    with pytest.raises(FileNotFoundError, match=f"'mine' under {storage}: run `recmem train`") as e:
        evaluate_ray(cfg)
    assert "runs with checkpoints" not in str(e.value)
    _checkpoint(storage / "mine-20250101-000000", "checkpoint_0", 16, range(2))
    with pytest.raises(FileNotFoundError, match="runs with checkpoints there: mine-20250101-000000"):
        evaluate_ray(cfg)
    assert not ray.is_initialized(), "nothing to evaluate: no Ray started"


def test_cli_evaluates_on_ray_by_default(tmp_path, capsys):
    args = [f"workdir={tmp_path}", f"data.root={tmp_path / 'data'}"]
    assert main(["evaluate", *args]) == 2
    assert "no complete checkpoint of the Ray run 'recmem'" in capsys.readouterr().err
    assert main(["evaluate", *args, "ray.enabled=false"]) == 2
    assert "run `recmem train` first" in capsys.readouterr().err
