"""A Ray run's checkpoint saves without Ray (one worker: no collectives): each save's folder, its
``meta.json`` written last, the two newest complete checkpoints kept, a cut-short save's leftovers
removed once a newer checkpoint is complete; on a local disk and through a pyarrow filesystem that
is not one (as an object store is reached). Which checkpoint loads, and a corrupt shard's fallback,
are in ``test_distributed_evaluate.py``.
"""

from __future__ import annotations

import json

import pyarrow.fs
import pytest

from recmem.train.distributed.store import META, RayCheckpoints, complete_checkpoints, record_name, shard_name

GROUP = "20260101-000000.000001"


@pytest.mark.parametrize("where", ["local", "filesystem"])
def test_saves_commit_with_meta_last_and_keep_the_newest_two(tmp_path, where):
    local = pyarrow.fs.LocalFileSystem()
    fs, run = (local, str(tmp_path / "run")) if where == "local" else (pyarrow.fs.SubTreeFileSystem(str(tmp_path), local), "run")
    cut_before = tmp_path / "run" / "checkpoint_000000001-20251231-000000.000000"  # a save cut short, long ago
    cut_later = tmp_path / "run" / "checkpoint_000000009-20251231-000000.000000"  # one past what this run reaches
    for folder in (cut_before, cut_later):
        folder.mkdir(parents=True)
        (folder / shard_name(0)).write_bytes(b"half a shard")
    store = RayCheckpoints(0, 1, {"sharding": "id"}, key={"model": 1}, run=(fs, run), group=GROUP)
    with store.session(1 << 10):
        for step in (2, 4, 6):
            store.save(step, {"step": step}, {"step": float(step), "valid/auc": 0.7})
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == [f"checkpoint_000000004-{GROUP}", f"checkpoint_000000006-{GROUP}", cut_later.name]
    newest = tmp_path / "run" / f"checkpoint_000000006-{GROUP}"
    assert sorted(p.name for p in newest.iterdir()) == sorted([META, shard_name(0), record_name(0)])
    assert json.loads((newest / META).read_text()) == {"step": 6, "world_size": 1, "plan": {"sharding": "id"},
                                                       "resume_key": {"model": 1}}
    assert store.saved == (f"{run}/checkpoint_000000006-{GROUP}", {"step": 6.0, "valid/auc": 0.7})
    assert [meta["step"] for _, meta in complete_checkpoints(fs, run)] == [6, 4]
    again = RayCheckpoints(0, 1, {"sharding": "id"}, run=(fs, run), group="20260101-000000.000002")
    assert again.load() == {"step": 6} and again.loaded_from == f"{run}/checkpoint_000000006-{GROUP}"
