"""The training-throughput benchmark (``jobs/bench_train.py``) at tiny sizes, so it cannot rot."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

from jobs.bench_train import LABELS, main, parse_options
from recmem.bench.throughput import QUICK, ThroughputOptions, cycle, run_steps, schema_for, synthetic_rows


def test_quick_run_measures_every_variant(capsys):
    threads = torch.get_num_threads()
    try:
        main(["--quick", "--threads", "1"])  # one thread: steady on a shared machine
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()
    record = json.loads(lines[-1])
    assert set(record["samples_per_second"]) == set(LABELS)
    assert all(v > 0 for v in record["samples_per_second"].values())
    assert record["ratio_to_torchrec_dmp"]["torchrec_dmp"] == 1.0
    for key, loss in record["last_loss"].items():
        # Every variant really trained (random labels at a 25% rate: a loss near 0.56), except the
        # data pipeline, which has no loss.
        assert math.isnan(loss) if key == "parquet_pipeline" else 0.05 < loss < 5, (key, loss)
    assert record["options"]["rows"] == QUICK.rows
    assert len(record["per_round"]["recmem_fp32"]) == QUICK.rounds
    assert any(label in line for line in lines for label in LABELS.values())


def test_options_start_from_quick_or_defaults():
    assert parse_options([]) == ThroughputOptions()
    opts = parse_options(["--quick", "--steps", "7", "--ids", "uniform", "--clock", "cpu"])
    assert (opts.steps, opts.ids, opts.clock, opts.rows) == (7, "uniform", "cpu", QUICK.rows)
    with pytest.raises(SystemExit):
        parse_options(["--ids", "pareto"])


@pytest.mark.parametrize("ids", ["zipf", "uniform"])
def test_synthetic_rows_are_whole_batches_of_ids_in_range(ids):
    opts = ThroughputOptions(tables=3, rows=5000, batch=1000, parquet_rows=20_500, ids=ids)
    schema = schema_for(opts)
    rows = synthetic_rows(opts, schema)
    assert rows.num_rows == 20_000
    assert rows.column_names == [schema.label, *schema.dense, *schema.sparse]
    assert 0.22 < rows.column(schema.label).to_numpy().mean() < 0.28
    for name in schema.sparse:
        values = rows.column(name).to_numpy()
        assert values.min() >= 0 and values.max() < opts.rows
        top_share = np.bincount(values).max() / len(values)
        # Zipf (exponent 1) over 5000 rows: the top ID takes ~1/ln(5000) = 12%; uniform: ~0.05%.
        assert top_share > 0.05 if ids == "zipf" else top_share < 0.005


def test_a_round_stops_at_its_time_budget_after_one_step_at_least():
    def slow_step(batch):
        time.sleep(0.05)
        return 0.5

    batches = [torch.zeros(4)] * 3  # anything with a length stands in for a Batch here
    samples, seconds, loss = run_steps(slow_step, cycle(batches, 0, 100), time.perf_counter, max_seconds=0.01)
    assert (samples, loss) == (4, 0.5) and seconds >= 0.05
    samples, _, _ = run_steps(None, cycle(batches, 2, 5), time.perf_counter)
    assert samples == 20
