"""The ssd kind (recmem/tables/ssd/): same weights as the same table in RAM whatever the cache, pins
that hold under an adversarial cache, a clear error below the window's rows, checkpoints that copy
no rows and survive SIGKILL."""

from __future__ import annotations

import gc
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recmem.config import ConfigError, TableConfig
from recmem.data.batch import Batch
from recmem.lock import LockedError
from recmem.tables import TableCollection, build_tables
from recmem.tables.base import Prefetchable
from recmem.tables.hash import HashTable
from recmem.tables.ssd import CacheTooSmall, SSDTable, StoreError
from recmem.train.lookahead import lookahead
from recmem.train.local import train_local
from tests.conftest import small_schema, tiny_config, tiny_overrides

NAMES, ROWS, DIM, BATCH = ["a", "b", "c"], 400, 8, 32


def _batches(n: int, seed: int = 0) -> list[Batch]:
    """Multi-hot bags (0-3 IDs) of skewed raw IDs, some repeated within a batch."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(0, 4, (len(NAMES) * BATCH,), generator=g)
        values = (torch.rand(int(lengths.sum()), generator=g) ** 3 * 1000).long() * 7919 - 50_000
        kjt = KeyedJaggedTensor(keys=NAMES, values=values, lengths=lengths)
        out.append(Batch(torch.zeros(BATCH, 1), kjt, torch.zeros(BATCH)))
    return out


def _train(table: torch.nn.Module, batches, seed: int = 1) -> None:
    weights = torch.randn(BATCH, len(NAMES), DIM, generator=torch.Generator().manual_seed(seed))
    for batch in batches:
        (table(batch.sparse_features) * weights).sum().backward()


def _rows(table) -> torch.Tensor:
    return torch.cat([form.tensors["rows"] for form in table.to_serving()])


def _window_minimum(batches: list[Batch], depth: int) -> int:
    """The most distinct rows any depth + 1 consecutive batches hold."""
    per_batch = []
    for batch in batches:
        f = torch.repeat_interleave(torch.arange(len(NAMES)), torch.tensor(batch.sparse_features.length_per_key()))
        per_batch.append(set((f * ROWS + torch.remainder(batch.sparse_features.values(), ROWS)).tolist()))
    return max(len(set().union(*per_batch[i:i + depth + 1])) for i in range(len(batches)))


@pytest.mark.parametrize("depth", [0, 2])
@pytest.mark.parametrize("cache", ["window", "half", "all"])
def test_same_weights_as_the_table_in_ram_whatever_the_cache(tmp_path, depth, cache):
    batches = _batches(25)
    rows = {"window": _window_minimum(batches, depth), "half": len(NAMES) * ROWS // 2, "all": len(NAMES) * ROWS}[cache]
    ram = HashTable(NAMES, ROWS, DIM, 0.1, seed=5)
    disk = SSDTable(NAMES, ROWS, DIM, 0.1, tmp_path / "rows", cache_rows=rows, seed=5)
    torch.testing.assert_close(_rows(disk), _rows(ram), rtol=0, atol=0)  # the same initial rows
    _train(ram, batches)
    _train(disk, lookahead(batches, TableCollection([disk], NAMES), depth))
    torch.testing.assert_close(_rows(disk), _rows(ram), rtol=0, atol=1e-6)
    records = disk.disk.store.read(np.arange(len(NAMES) * ROWS))  # Adagrad state travelled to disk too
    momentum = torch.cat([ram.rows.momentum(t) for t in range(len(NAMES))])
    torch.testing.assert_close(torch.from_numpy(records[:, -1]), momentum, rtol=1e-6, atol=1e-9)
    stats = disk.stats()
    assert stats["rows_evicted"] > 0 if cache != "all" else stats["rows_evicted"] == 0
    assert 0 < stats["cache_hit_rate"] < 1 and stats["disk_bytes"] > 0 and stats["read_bytes_per_step"] > 0
    disk.close()


def test_a_cache_below_the_window_is_an_error_naming_the_minimum(tmp_path):
    batches = _batches(6)
    need = _window_minimum(batches[:3], 2)
    disk = SSDTable(NAMES, ROWS, DIM, 0.1, tmp_path / "rows", cache_rows=need - 1)
    with pytest.raises(CacheTooSmall, match=rf"options.cache_rows must be at least {need}\b"):
        _train(disk, lookahead(batches, TableCollection([disk], NAMES), 2))
    disk.close()


def test_rows_of_the_window_stay_pinned(tmp_path):
    """Prefetch three batches into a cache just big enough: training the first evicts nothing the
    other two need, and a fourth batch's rows cannot push them out."""
    batches = _batches(4)
    disk = SSDTable(NAMES, ROWS, DIM, 0.1, tmp_path / "rows", cache_rows=_window_minimum(batches[:3], 2))
    tickets = [disk.prefetch(b.sparse_features) for b in batches[:3]]
    pinned = {int(disk.disk.cache.row_of[s]) for t in tickets for s in t}
    _train(disk, batches[:1])
    assert {int(disk.disk.cache.row_of[s]) for t in tickets for s in t} == pinned
    with pytest.raises(CacheTooSmall):  # nothing unpinned left for new rows
        disk.prefetch(_batches(1, seed=9)[0].sparse_features)
    disk.close()


def test_checkpoints_copy_no_rows_and_refuse_overwritten_ones(tmp_path):
    batches = _batches(12)
    disk = SSDTable(NAMES, ROWS, DIM, 0.1, tmp_path / "rows", cache_rows=300, seed=2)
    _train(disk, batches[:4])
    first = disk.state_dict()
    _train(disk, batches[4:8])
    second = disk.state_dict()
    assert sum(v.numel() for v in second["_extra_state"].values() if isinstance(v, torch.Tensor)) == len(NAMES) * ROWS
    expected = _rows(disk)
    _train(disk, batches[8:])  # writes after the second checkpoint end the first one
    disk.close()
    again = SSDTable(NAMES, ROWS, DIM, 0.1, tmp_path / "rows", cache_rows=300, seed=2)
    with pytest.raises(StoreError, match="overwritten"):
        again.load_state_dict(first)
    again.load_state_dict(second)
    torch.testing.assert_close(_rows(again), expected, rtol=0, atol=0)
    with pytest.raises(LockedError, match="ssd table"):  # one table per folder
        SSDTable(NAMES, ROWS, DIM, 0.1, tmp_path / "rows", cache_rows=300, seed=2)
    again.close()
    reseeded = SSDTable(NAMES, ROWS, DIM, 0.1, tmp_path / "rows", cache_rows=300, seed=3)  # a new file
    with pytest.raises(StoreError, match="another file"):
        reseeded.load_state_dict(second)
    reseeded.close()


def test_config_errors_name_the_key(tmp_path, tiny_root):
    sparse = small_schema().sparse
    with pytest.raises(ConfigError, match=r"model.tables.0.options.path: .* is empty"):
        build_tables([TableConfig(kind="ssd", num_embeddings=10)], sparse, tiny_root)
    with pytest.raises(ConfigError, match="model.tables.0.options.cache_rows"):
        build_tables([TableConfig(kind="ssd", num_embeddings=10, options={"path": str(tmp_path), "cache_rows": 0})],
                     sparse, tiny_root)
    with pytest.raises(ConfigError, match="model.tables.0.num_embeddings"):
        build_tables([TableConfig(kind="ssd", options={"path": str(tmp_path)})], sparse, tiny_root)


def _ssd(path, cache_rows=180) -> list[str]:
    return ["model.tables.0.kind=ssd", "model.tables.0.num_embeddings=64",
            f"model.tables.0.options={{path: {path}, cache_rows: {cache_rows}}}"]


def test_a_model_trains_to_the_same_metrics_as_in_ram(tiny_root, tmp_path, capsys):
    common = ["train.epochs=2", "tracking.enabled=false", "ray.enabled=false"]
    ram = train_local(tiny_config(tiny_root, tmp_path / "ram", "model.tables.0.kind=hash",
                                  "model.tables.0.num_embeddings=64", *common))
    capsys.readouterr()
    disk = train_local(tiny_config(tiny_root, tmp_path / "ssd", *_ssd(tmp_path / "rows"), *common,
                                   "train.progress=true", "train.log_every=2"))
    assert disk.step == ram.step
    for key in ("valid/auc", "valid/logloss"):
        assert disk.metrics[key] == pytest.approx(ram.metrics[key], abs=1e-6)
    assert disk.metrics["tables/0/cache_hit_rate"] < 1
    bar = capsys.readouterr().err  # the progress bar shows how well the cache keeps up
    assert re.search(r"hit=[01]\.\d{3}", bar) and re.search(r"wait=\d+\.\d\ds", bar), bar[-500:]


@pytest.mark.slow
def test_sigkill_mid_training_resumes_to_the_same_auc(tiny_root, tmp_path):
    """Kill -9 a run between checkpoints (rows being written back), restart it: it resumes from its
    last checkpoint and ends where an uninterrupted run ends."""
    common = ["train.epochs=5", "train.checkpoint_every=10", "tracking.enabled=false", "ray.enabled=false"]
    straight = train_local(tiny_config(tiny_root, tmp_path / "straight", *_ssd(tmp_path / "rows_a"), *common))
    gc.collect()  # let go of the folder's lock before another process could want it
    overrides = tiny_overrides(tiny_root, tmp_path / "killed", *_ssd(tmp_path / "rows_b"), *common)
    script = ("import sys\nfrom recmem.config import load_config\nfrom recmem.train.local import train_local\n"
              "r = train_local(load_config(None, sys.argv[1:]))\nprint('AUC', repr(r.metrics['valid/auc']))\n")
    checkpoints = tmp_path / "killed" / "runs" / "checkpoints"
    victim = subprocess.Popen([sys.executable, "-c", script, *overrides])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(checkpoints.glob("step-*.pt"))) < 2 and victim.poll() is None:
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    resumed = subprocess.run([sys.executable, "-c", script, *overrides], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    auc = float(resumed.stdout.split("AUC")[-1])
    assert auc == pytest.approx(straight.metrics["valid/auc"], abs=1e-6)


def _sharded_rank(rank: int, folder: str) -> list[torch.Tensor]:
    """Rank ``rank`` of 2 trains its half of every batch through an ID-sharded ssd table with lookahead."""
    import torch.distributed as dist

    from recmem.tables.sharded import kind_shard, sharded_table

    block = TableConfig(kind="ssd", embedding_dim=DIM, num_embeddings=ROWS, learning_rate=0.1,
                        options={"path": folder, "cache_rows": 500})
    table = sharded_table(NAMES, DIM, kind_shard(SSDTable, block, NAMES, 5, folder, "t", rank, 2), dist.group.WORLD)
    weights = torch.randn(BATCH, len(NAMES), DIM, generator=torch.Generator().manual_seed(1))
    half = BATCH // 2
    local = [Batch(b.dense_features[rank * half:(rank + 1) * half], _rows_of(b.sparse_features, rank, half),
                   b.labels[rank * half:(rank + 1) * half]) for b in _batches(12)]
    for batch in lookahead(local, TableCollection([table], NAMES), 2):
        (table(batch.sparse_features) * weights[rank * half:(rank + 1) * half]).sum().div(half).backward()
    return [form.tensors["rows"] for form in table.shard.to_serving()]


def _rows_of(kjt: KeyedJaggedTensor, rank: int, half: int) -> KeyedJaggedTensor:
    """The bags of batch rows ``[rank * half, (rank + 1) * half)`` of every feature."""
    per_feature = kjt.to_dict()
    lengths, values = [], []
    for name in NAMES:
        jt = per_feature[name]
        offsets = jt.offsets()
        lengths.append(jt.lengths()[rank * half:(rank + 1) * half])
        values.append(jt.values()[offsets[rank * half]:offsets[(rank + 1) * half]])
    return KeyedJaggedTensor(keys=NAMES, values=torch.cat(values), lengths=torch.cat(lengths))


def test_id_sharded_workers_prefetch_their_rows_and_train_as_one_table(tmp_path):
    from tests.ranks import run_ranks

    shards = run_ranks(_sharded_rank, tmp_path, str(tmp_path / "rows"))
    ram = HashTable(NAMES, ROWS, DIM, 0.1, seed=5)
    weights = torch.randn(BATCH, len(NAMES), DIM, generator=torch.Generator().manual_seed(1))
    for batch in _batches(12):
        (ram(batch.sparse_features) * weights).sum().div(BATCH).backward()
    for f in range(len(NAMES)):
        for rank in range(2):
            torch.testing.assert_close(shards[rank][f], ram.rows.weights(f)[rank::2], rtol=0, atol=1e-6)
    assert (tmp_path / "rows" / "rank-1-of-2" / "rows.bin").exists()


@pytest.mark.slow
def test_two_ray_workers_train_like_one_process_in_ram(tiny_root, ray_cluster, tmp_path):
    """Two Ray workers, each prefetching and caching the rows it owns, against hash in one process."""
    from recmem.train.distributed import train_ray

    common = ["train.max_steps=16", "tracking.enabled=false", "ray.cpus_per_worker=0.5"]
    ram = train_local(tiny_config(tiny_root, tmp_path / "ram", "model.tables.0.kind=hash",
                                  "model.tables.0.num_embeddings=64", "ray.enabled=false", *common))
    disk = train_ray(tiny_config(tiny_root, tmp_path / "ray", *_ssd(tmp_path / "rows"), "ray.num_workers=2", *common))
    assert disk.step == ram.step == 16
    assert disk.metrics["valid/auc"] == pytest.approx(ram.metrics["valid/auc"], abs=0.002)
    assert disk.metrics["valid/logloss"] == pytest.approx(ram.metrics["valid/logloss"], abs=1e-3)
    assert all((tmp_path / "rows" / f"rank-{r}-of-2" / "rows.bin").exists() for r in range(2))
    from recmem.export.job import export_job
    from recmem.serving import load_bundle

    bundle = load_bundle(export_job(tiny_config(tiny_root, tmp_path / "ray", *_ssd(tmp_path / "rows"),
                                                "ray.num_workers=2", *common), tmp_path / "bundle", "fp32"))
    assert bundle.manifest["export_check"]["max_abs_logit_diff"] <= 1e-5, bundle.manifest["export_check"]
    assert [t["lookup"] for t in bundle.manifest["tables"]] == ["modulo"] * 4


def _collisionless(tmp_path, storage: str):
    from recmem.tables.collisionless import CollisionlessTable

    options = {"capacity": 150, "initial_rows": 16, "min_count": 2, "ttl": 40, "eviction": "lru"}
    if storage == "ssd":
        options.update(storage="ssd", ssd={"path": str(tmp_path / "rows"), "cache_rows": 400})
    block = TableConfig(kind="collisionless", embedding_dim=DIM, learning_rate=0.1, options=options)
    return CollisionlessTable.from_config(block, NAMES, 3, tmp_path, "model.tables.0")


def test_collisionless_on_disk_admits_expires_and_trains_as_in_ram(tmp_path):
    """Admission after 2 sightings, LRU at capacity and TTL expiry in data time: the same rows as the
    table in RAM; expired rows are gone from the disk too; prefetching counts no sighting."""
    ram, disk = _collisionless(tmp_path, "ram"), _collisionless(tmp_path, "ssd")
    assert isinstance(disk, Prefetchable) and not isinstance(ram, Prefetchable)
    batches = _batches(30)
    counts = disk.slots.stats()
    for batch in batches[:5]:
        disk.release(disk.prefetch(batch.sparse_features))
    assert disk.slots.stats() == counts  # no sighting, no admission
    window = lookahead(batches, TableCollection([disk], NAMES), 2)
    weights = torch.randn(BATCH, len(NAMES), DIM, generator=torch.Generator().manual_seed(1))
    for step, (plain, fetched) in enumerate(zip(batches, window)):
        for table, batch in ((ram, plain), (disk, fetched)):
            table.observe_time(step * 10)
            (table(batch.sparse_features) * weights).sum().backward()
            if step % 3 == 2:
                table.evict(step * 10)
    stats, map_keys = disk.stats(), ("admitted", "rejected", "rejected_full", "expired", "evicted", "rows_live")
    assert stats["expired"] > 0 and stats["rejected"] > 0 and stats["evicted"] > 0 and stats["cache_hit_rate"] > 0
    assert {k: stats[k] for k in map_keys} == {k: v for k, v in ram.stats().items() if k in map_keys}
    for a, b in zip(ram.to_serving(), disk.to_serving()):
        torch.testing.assert_close(b.tensors["keys"], a.tensors["keys"])
        torch.testing.assert_close(b.tensors["rows"], a.tensors["rows"], rtol=0, atol=1e-6)
    store = disk.disk.disk.store
    live = np.concatenate([f * disk.disk.capacity + disk.slots.live(f)[1] for f in range(len(NAMES))])
    dead = np.setdiff1d(np.arange(store.num_rows), live)
    assert (store.loc[live] > 0).all() and (store.loc[dead] == 0).all()  # expired rows deleted
    assert not store.read(dead)[:, :DIM].any()
    state = disk.state_dict()
    assert "rows.tbe.weights_host" not in state and state["_extra_state"]["disk"]["loc"].numel() == store.num_rows
    disk.disk.disk.close()


def _disk_collisionless_rank(rank: int, folder: str) -> None:
    """Rank ``rank`` of 2: an ID-sharded collisionless table with its rows on disk, fed through the
    lookahead, equals the unsharded in-RAM table at every step (tests/test_collisionless_sharded.py's)."""
    import dataclasses

    import torch.distributed as dist

    from recmem.tables.collisionless import CollisionlessTable
    from recmem.tables.sharded import sharded_table
    from tests.test_collisionless_sharded import BLOCK, LOCAL, NAMES as PAIR, WORLD, _bags, _kjt, _loss

    disk_block = dataclasses.replace(BLOCK, options={**BLOCK.options, "storage": "ssd",
                                                     "ssd": {"path": folder, "cache_rows": 40}})
    reference = CollisionlessTable.from_config(BLOCK, PAIR, 3, Path("."), "model.tables.0")
    parts = CollisionlessTable.shard_from_config(disk_block, PAIR, 3, Path("."), "model.tables.0", rank, WORLD)
    sharded = sharded_table(PAIR, 4, parts, dist.group.WORLD)
    mine = slice(rank * LOCAL, (rank + 1) * LOCAL)
    local = [Batch(torch.zeros(LOCAL, 1), _kjt([f[mine] for f in _bags(step)]), torch.zeros(LOCAL)) for step in range(5)]
    for step, batch in enumerate(lookahead(local, TableCollection([sharded], PAIR), 2)):
        for table in (reference, sharded):
            table.observe_time(step)
        expected = reference(_kjt(_bags(step)))
        _loss(expected, WORLD * LOCAL).backward()
        got = sharded(batch.sparse_features)
        _loss(got, LOCAL).backward()
        torch.testing.assert_close(got, expected[mine].detach(), atol=1e-6, rtol=1e-5)
    freed = torch.tensor([sharded.evict(150)])
    dist.all_reduce(freed)
    assert int(freed) == reference.evict(150) > 0


def test_id_sharded_collisionless_on_disk_trains_as_in_ram(tmp_path):
    from tests.ranks import run_ranks

    run_ranks(_disk_collisionless_rank, tmp_path, str(tmp_path / "rows"))
    assert (tmp_path / "rows" / "rank-0-of-2" / "rows.bin").exists()
