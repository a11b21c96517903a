"""The collisionless benchmarks and the scaling report at tiny sizes, so that moving code cannot rot them."""

from __future__ import annotations

import json

import torch

from jobs import bench_collisionless, bench_collisionless_train, bench_scaling
from recmem.bench.scaling import ScalingResult, report, ring_sent
from recmem.config import Config

TINY_MAP = ["--rows", "4000", "--features", "2", "--batch", "64", "--batches", "2", "--peer-batches", "1"]


def keep_threads(run):
    threads = torch.get_num_threads()
    try:
        run()
    finally:
        torch.set_num_threads(threads)


def test_map_bench_times_recmem_and_every_peer(capsys):
    keep_threads(lambda: bench_collisionless.main(TINY_MAP))
    out = capsys.readouterr().out
    table = [line.split() for line in out.splitlines() if len(line.split()) == 3]  # name, find, find_or_insert
    rows = {name: rates for name, *rates in table if name != "IDs/s"}
    assert set(rows) == {"recmem", "dict", "torchrec_mch", "torchrec_mch_every10"}
    assert all(float(v.replace(",", "")) > 0 for r in rows.values() for v in r)
    assert "recmem / torchrec_mch " in out and "one thread" in out


def test_collisionless_train_quick_run_measures_every_variant(capsys):
    keep_threads(lambda: bench_collisionless_train.main(["--quick", "--threads", "1"]))
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    names = ["full", "collisionless", "collisionless_sized", "collisionless_admit2_ttl"]
    assert all(record[n]["samples_per_second"] > 0 and 0.05 < record[n]["last_loss"] < 5 for n in names)
    assert record["full"]["ratio_to_full"] == 1.0
    # Admission after 2 sightings keeps fewer rows than admitting every ID.
    assert record["collisionless_admit2_ttl"]["rows_live"] < record["collisionless_sized"]["rows_live"]


def test_scaling_report_labels_what_it_computes_and_projects():
    opts = bench_scaling.parse_options(["--rows", "100", "--sharding", "id", "auto"])
    assert (opts.rows, opts.workers, opts.sharding) == (100, (1, 2), ("id", "auto"))
    metrics = {"train/samples_per_second": 1000.0, "wall_s": 1.0, "valid/auc": 0.7, "step": 10.0,
               "train/data_wait_seconds": 100.0}
    two = {**metrics, "traffic/tables_sent_bytes_per_step": 300.0, "traffic/all_to_all_sent_bytes_per_step": 300.0,
           "traffic/allreduce_payload_bytes_per_step": 400.0}
    text = report(ScalingResult(Config(), {(1, "none"): metrics, (2, "id"): two}, dense_params=100))
    assert "ring-sent (from measured payload)" in text and "Computed, not measured" in text
    assert "| 2 | id | 1,000 | 1 | 0.7000 | 300 | 300 | 400 | 400 | 400 |" in text
    assert ring_sent(400.0, 2) == 400.0 and "| 64 |" in text
    # 10 s of reading per step (of which a worker of 2 reads half) against ~1 s of compute: data limits.
    assert text.splitlines()[-1].startswith("| 64 |") and text.splitlines()[-1].endswith("| data |")
