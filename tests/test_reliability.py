"""Faults a careless or hostile user causes, on checkpoints, numbers, pre-flight and writers (issue 9).

Each test does what the user would (a pickled payload where a checkpoint was, flipped bytes, a learning
rate of 1e30, a Parquet part with NaN or a label of 5, a full disk, a second trainer, a resume over
other data) and asserts what recmem does now. Prepare's faults are in ``test_prepare_faults.py``,
MLflow's in ``test_tracking_faults.py``, config's in ``test_config_validation.py``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from recmem.cli import main
from recmem.config import load_config
from recmem.data.layout import DataError
from recmem.lock import LockedError
from recmem.train.checkpoint import list_checkpoints, load_latest, save_checkpoint
from recmem.train.distributed.store import RayCheckpoints, write_shard
from recmem.train.local import train_local
from recmem.train.loop import TrainingDiverged
from recmem.train.resume import ResumeError
from tests.holders import held_by_another_process
from tests.conftest import small_schema, tiny_config, tiny_overrides, write_learnable_root


class _Payload:
    """Unpickling this creates ``marker``: the code a hostile checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _plant(path: Path, marker: Path) -> None:
    """Replace the checkpoint ``path`` by a hostile one, with a record that matches its bytes (so only
    the refusal to unpickle can stop it)."""
    torch.save({"model": {}, "payload": _Payload(marker)}, path)
    record = {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    record_path = path.with_suffix(".json")
    record_path.write_text(json.dumps({**json.loads(record_path.read_text()), **record}))


def _flip(path: Path) -> None:
    """Garble bytes in the middle of ``path``, keeping its size (a disk or copy gone wrong)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


@pytest.fixture
def root(tmp_path) -> Path:
    """A data root of this test's own (tests here corrupt and rewrite it)."""
    return write_learnable_root(tmp_path / "data", small_schema(), rows=3000, valid=1000)


def test_a_hostile_checkpoint_is_refused_and_runs_nothing(tmp_path, capsys):
    save_checkpoint(tmp_path, 1, {"x": torch.ones(2)})
    save_checkpoint(tmp_path, 2, {"x": torch.zeros(2)})
    marker = tmp_path / "pwned"
    _plant(list_checkpoints(tmp_path)[-1], marker)
    state, path = load_latest(tmp_path)
    assert not marker.exists(), "unpickling ran the payload"
    assert path.name == "step-000000001.pt" and torch.equal(state["x"], torch.ones(2))
    assert "refused unread" in capsys.readouterr().out


def test_a_hostile_ray_shard_is_refused_and_runs_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    folders = []
    for step in (4, 8):
        folder = run / f"checkpoint_{step:02d}"
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text(json.dumps({"step": step, "world_size": 1, "plan": {}}))
        write_shard(folder, 0, {"step": step})
        folders.append(folder)
    marker = tmp_path / "pwned"
    _plant(folders[1] / "rank-00000.pt", marker)
    import pyarrow.fs

    store = RayCheckpoints(0, 1, {})
    assert store.load_newest(pyarrow.fs.LocalFileSystem(), str(run)) == {"step": 4}
    assert not marker.exists()
    assert "refused unread" in capsys.readouterr().out
    _flip(folders[0] / "rank-00000.pt")  # now the older one is garbled too: nothing loads
    with pytest.raises(RuntimeError, match="loads on all 1 workers"):
        store.load_newest(pyarrow.fs.LocalFileSystem(), str(run))
    assert "SHA-256 differs" in capsys.readouterr().out


def test_garbled_checkpoint_falls_back_to_the_one_before_and_says_so(root, tmp_path, capsys):
    cfg = tiny_config(root, tmp_path, "train.max_steps=4", "train.checkpoint_every=2")
    train_local(cfg)
    newest = list_checkpoints(tmp_path / "runs" / "checkpoints")[-1]
    _flip(newest)
    result = train_local(tiny_config(root, tmp_path, "train.max_steps=6", "train.checkpoint_every=2"))
    out = capsys.readouterr().out
    assert f"skipping checkpoint {newest}: its SHA-256 differs from its record" in out
    assert result.resumed_from.endswith("step-000000002.pt"), "fell back past the garbled step 4"
    assert "resumed from" in out and "at step 2 (epoch 0, batch 2)" in out


def test_a_diverging_run_stops_naming_the_step_and_keeps_its_good_checkpoint(root, tmp_path):
    cfg = tiny_config(root, tmp_path, "train.learning_rate=1e30", "train.checkpoint_every=1",
                      "model.tables.0.learning_rate=1e30")
    with pytest.raises(TrainingDiverged, match=r"step \d+ .*non-finite") as e:
        train_local(cfg)
    print(e.value)
    checkpoints = tmp_path / "runs" / "checkpoints"
    for path in list_checkpoints(checkpoints):  # whatever was written before the stop is finite
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point()), path
    assert not [p for p in checkpoints.iterdir() if ".tmp-" in p.name]
    args = tiny_overrides(root, tmp_path / "cli", "train.learning_rate=1e30", "model.tables.0.learning_rate=1e30")
    assert main(["train", *args, "ray.enabled=false"]) == 2  # the CLI: one line, exit 2


def test_skip_mode_leaves_bad_batches_out_up_to_its_limit(root, tmp_path):
    # NaN in a dense column of one row group: the reader refuses it before any step (naming it) ...
    part = root / "train" / "part-00000.parquet"
    table = pq.read_table(part)
    dense = table.column("I1").to_numpy().copy()
    dense[1500] = np.nan
    pq.write_table(table.set_column(table.schema.get_field_index("I1"), "I1", [dense]), part, row_group_size=1000)
    with pytest.raises(DataError, match=rf"{part}: row 1500 \(row group 1\), column 'I1' holds nan"):
        train_local(tiny_config(root, tmp_path / "a", "train.max_steps=10"))
    # ... while a diverging model under train.nonfinite=skip skips, counts, and stops past the limit.
    cfg = tiny_config(write_learnable_root(tmp_path / "clean", small_schema(), rows=3000, valid=1000),
                      tmp_path / "b", "train.learning_rate=1e30", "model.tables.0.learning_rate=1e30",
                      "train.nonfinite=skip", "train.max_skipped_batches=3")
    with pytest.raises(TrainingDiverged, match=r"\(4 skipped, over train.max_skipped_batches\)"):
        train_local(cfg)


def test_a_label_outside_0_1_names_the_file_row_and_column(root, tmp_path):
    part = root / "valid" / "part-00000.parquet"
    table = pq.read_table(part)
    labels = table.column("label").to_numpy().copy()
    labels[7] = 5.0
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", [labels]), part)
    with pytest.raises(DataError, match=rf"{part}: row 7 \(row group 0\), column 'label' holds 5.0"):
        train_local(tiny_config(root, tmp_path, "train.max_steps=2"))


def test_what_would_fail_after_training_fails_before_it(root, tmp_path, monkeypatch):
    # An unwritable checkpoint folder (a file where its parent should be).
    (tmp_path / "blocked").write_text("a file, not a folder")
    cfg = tiny_config(root, tmp_path, "train.checkpoint_dir=blocked/checkpoints")
    started = time.monotonic()
    with pytest.raises(OSError):
        train_local(cfg)
    assert time.monotonic() - started < 20
    # An empty validation split.
    empty = tmp_path / "empty"
    shutil.copytree(root, empty)
    table = pq.read_table(empty / "valid" / "part-00000.parquet")
    pq.write_table(table.slice(0, 0), empty / "valid" / "part-00000.parquet")
    with pytest.raises(DataError, match="valid holds no rows"):
        train_local(tiny_config(empty, tmp_path / "e"))
    # A disk too full for one checkpoint.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 4096, 4096))
    with pytest.raises(OSError, match="MiB free; a checkpoint of this model needs about"):
        train_local(tiny_config(root, tmp_path / "full"))


def test_a_failed_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"x": torch.ones(2)})

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, 2, {"x": torch.zeros(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000001.json", "step-000000001.pt"]


def test_resume_with_another_model_config_names_the_keys_before_any_step(root, tmp_path, capsys):
    train_local(tiny_config(root, tmp_path, "train.max_steps=2"))
    changed = tiny_overrides(root, tmp_path, "train.max_steps=4", "model.tables.0.embedding_dim=16",
                             "model.bottom_mlp=[32,16]")
    with pytest.raises(ResumeError, match=r"model.tables.0.embedding_dim: 8 in the checkpoint, 16 now") as e:
        train_local(load_config(None, changed))
    assert "model.bottom_mlp" in str(e.value)
    assert main(["train", *changed, "ray.enabled=false"]) == 2
    assert "refusing to resume" in capsys.readouterr().err


def test_resume_over_changed_data_is_refused_unless_asked(root, tmp_path, capsys):
    train_local(tiny_config(root, tmp_path, "train.max_steps=2"))
    write_learnable_root(root, small_schema(), rows=4000, valid=1000, seed=1)  # the data was re-made
    with pytest.raises(ResumeError, match="training data: 1 files / 3,000 rows .* 1 files / 4,000 rows"):
        train_local(tiny_config(root, tmp_path, "train.max_steps=4"))
    result = train_local(tiny_config(root, tmp_path, "train.max_steps=4", "train.resume_changed=true"))
    assert result.step == 4 and result.resumed_from.endswith("step-000000002.pt")
    assert "although it differs (train.resume_changed): training data" in capsys.readouterr().out


def test_a_second_trainer_on_the_same_checkpoints_is_refused(root, tmp_path):
    folder = tmp_path / "runs" / "checkpoints"
    with held_by_another_process(folder, "training") as pid:
        with pytest.raises(LockedError, match=rf"in use by training \(pid {pid} on host "):
            train_local(tiny_config(root, tmp_path, "train.max_steps=2"))
        assert list_checkpoints(folder) == []
    assert train_local(tiny_config(root, tmp_path, "train.max_steps=2")).step == 2  # a dead holder's lock is free


def test_nothing_left_to_train_is_said_only_after_a_resume(root, tmp_path, capsys):
    args = tiny_overrides(root, tmp_path, "train.max_steps=2")
    assert main(["train", *args, "ray.enabled=false"]) == 0
    assert "nothing left to train" not in capsys.readouterr().out
    assert main(["train", *args, "ray.enabled=false"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "nothing left to train" in out


@pytest.mark.slow
def test_ray_path_refuses_without_retrying(root, tmp_path, ray_cluster):
    """On Ray: a diverging run fails once (not max_failures times) naming the step; two workers skip
    the same batches; a held run and a resume over another model are refused by the driver before
    any worker starts."""
    from recmem.train.distributed import train_ray

    base = (f"ray.address={ray_cluster}", "ray.max_failures=2")
    started = time.monotonic()
    with pytest.raises(TrainingDiverged, match=r"step \d+ .*non-finite"):
        train_ray(tiny_config(root, tmp_path, *base, "train.learning_rate=1e30", "model.tables.0.learning_rate=1e30"))
    print(f"diverged on Ray: failed in {time.monotonic() - started:.1f} s")
    # Two workers skipping: they agree on every skipped batch (no hang), up to the limit.
    with pytest.raises(TrainingDiverged, match=r"\(3 skipped, over train.max_skipped_batches\)"):
        train_ray(tiny_config(root, tmp_path / "skip", *base, "ray.num_workers=2", "train.learning_rate=1e30",
                              "model.tables.0.learning_rate=1e30", "train.nonfinite=skip",
                              "train.max_skipped_batches=2"))
    train_ray(tiny_config(root, tmp_path / "ok", *base, "train.max_steps=2"))
    started = time.monotonic()
    with pytest.raises(ResumeError, match="model.tables.0.embedding_dim: 8 in the checkpoint, 16 now"):
        train_ray(tiny_config(root, tmp_path / "ok", *base, "model.tables.0.embedding_dim=16", "model.bottom_mlp=[32,16]"))
    assert time.monotonic() - started < 5, "refused by the driver, before Ray's workers"
    run = tmp_path / "ok" / "runs" / "checkpoints" / "ray" / "recmem"
    with held_by_another_process(run, "training") as pid:
        with pytest.raises(LockedError, match=f"pid {pid}"):
            train_ray(tiny_config(root, tmp_path / "ok", *base, "train.max_steps=4"))

