"""The training-throughput benchmark (``jobs/bench_train.py``) at tiny sizes, so it cannot rot, and the
peers it measures: each differs from recmem's model only where it says."""

from __future__ import annotations

import copy
import json
import math
import time

import numpy as np
import pytest
import torch

from jobs.bench_train import main, parse_options
from recmem.bench import peers
from recmem.bench.phases import PHASES, phased_step
from recmem.bench.throughput import (QUICK, ThroughputOptions, bench_config, cycle, make_step, recmem_model,
                                     run_steps, schema_for, synthetic_rows)
from recmem.bench.throughput_report import BASELINE, LABELS
from recmem.data.collate import collate
from recmem.models import build_dense
from recmem.train.loop import make_dense_optimizer


def test_quick_run_measures_every_variant(capsys):
    threads = torch.get_num_threads()
    try:
        main(["--quick", "--threads", "1"])  # one thread: steady on a shared machine
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()
    record = json.loads(lines[-1])
    assert set(record["samples_per_second"]) == set(LABELS)
    sps = record["samples_per_second"]
    assert all(v > 0 for v in sps.values())
    for key, ratio in record["ratio_to_" + BASELINE].items():
        assert ratio == pytest.approx(sps[key] / sps[BASELINE], abs=1e-3), key
    assert lines[0].startswith(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 ")
    assert record["machine"]["onednn_bf16"] == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    for precision in ("fp32", "bf16"):
        ms = record["phases_ms"][precision]
        assert record["phase_steps"][precision] >= 1
        assert all(ms[phase] > 0 for phase in PHASES), ms
        assert ms["sum"] == pytest.approx(sum(ms[phase] for phase in PHASES), abs=0.05)
        # Cutting the step adds a second backward call, no more: the phases account for a whole step.
        assert 0.4 * ms["whole"] < ms["sum"] < 2.5 * ms["whole"], ms
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


def _tiny_batch(opts: ThroughputOptions):
    schema = schema_for(opts)
    return collate(synthetic_rows(opts, schema), schema)


def test_torchrec_interaction_gives_recmem_s_output_and_gradient():
    opts = ThroughputOptions(tables=5, rows=100, dim=4, batch=32, parquet_rows=32)
    cfg, schema = bench_config(opts), schema_for(opts)
    torch.manual_seed(0)
    ours = build_dense(cfg.model, schema)
    theirs = peers.with_torchrec_interaction(copy.deepcopy(ours))
    assert type(theirs.interaction).__name__ == "InteractionArch" != type(ours.interaction).__name__
    dense, pooled = torch.randn(32, 13), torch.randn(32, 5, 4, requires_grad=True)
    out = ours(dense, pooled)
    (grad,) = torch.autograd.grad(out.sum(), pooled)
    torch.testing.assert_close(theirs(dense, pooled), out)
    torch.testing.assert_close(torch.autograd.grad(theirs(dense, pooled).sum(), pooled)[0], grad)


def test_fused_tables_under_recmem_dense_update_only_the_touched_rows_in_backward():
    opts = ThroughputOptions(tables=3, rows=200, dim=4, batch=16, parquet_rows=16)
    cfg, schema, batch = bench_config(opts), schema_for(opts), _tiny_batch(opts)
    tables = peers.fused_tables(schema.sparse, opts.rows, opts.dim, 0.05, 1e-8)
    model = peers.TorchrecTablesModel(tables, build_dense(cfg.model, schema))
    before = [tables.embedding_bags[f"t_{f}"].weight.detach().clone() for f in schema.sparse]
    logits = model(batch)
    assert logits.shape == (opts.batch,)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels).backward()
    for i, f in enumerate(schema.sparse):
        changed = (tables.embedding_bags[f"t_{f}"].weight.detach() != before[i]).any(1).nonzero().flatten()
        assert changed.tolist() == batch.sparse_features[f].values().unique().tolist(), f


def test_fused_dlrm_leaves_the_tables_out_of_the_dense_parameters():
    opts = ThroughputOptions(tables=3, rows=50, dim=4, batch=8, parquet_rows=8)
    cfg, schema = bench_config(opts), schema_for(opts)
    tables = peers.fused_tables(schema.sparse, opts.rows, opts.dim, 0.05, 1e-8)
    model, dense = peers.fused_dlrm(tables, len(schema.dense), cfg.model.bottom_mlp, cfg.model.top_mlp)
    table_ids = {id(p) for p in tables.parameters()}
    assert dense and not table_ids & {id(p) for p in dense}
    assert len(dense) + len(table_ids) == len(list(model.parameters()))
    loss, (_, logits, _) = model(_tiny_batch(opts))
    assert logits.shape == (opts.batch,) and loss.requires_grad


def test_recmem_s_step_cut_into_phases_trains_like_a_whole_step():
    opts = ThroughputOptions(tables=3, rows=100, dim=4, batch=16, parquet_rows=16)
    cfg, schema, batch = bench_config(opts), schema_for(opts), _tiny_batch(opts)
    models = [recmem_model(opts, schema, cfg) for _ in range(2)]
    optimizers = [make_dense_optimizer(cfg, list(m.dense.parameters())) for m in models]
    seconds = phased_step(models[0], optimizers[0], batch, time.perf_counter)
    assert list(seconds) == list(PHASES) and all(s >= 0 for s in seconds.values())
    make_step(lambda b: torch.nn.functional.binary_cross_entropy_with_logits(models[1](b), b.labels),
              optimizers[1])(batch)
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
