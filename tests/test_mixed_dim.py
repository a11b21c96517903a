"""`mixed_dim` from its definition (recmem/tables/mixed_dim.py): widths d_i = floor(d0 * (n_min / n_i)
** alpha) floored at 1, power-of-two rounding, the threshold, the budget's d0, widths stored as
multiples of 4, each feature's pooled rows times its projection, exact bytes, config errors, and
the widths in the run's MLflow params and printed plan. (Contract suite, export parity, DLRM and
DCNv2 with resume: test_tables_contract.py, test_serving_bundle.py, test_memory_kinds.py.)"""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recmem.config import ConfigError, TableConfig
from recmem.tables import build_tables
from recmem.tables.mixed_dim import MixedDimTable, budget_base_dim, mixed_widths, row_parameters, stored_width
from recmem.train.local import train_local
from tests.conftest import small_schema, tiny_config


def test_widths_follow_the_power_law():
    # n_min / n_i = 1, 0.1, 0.01; 16 * sqrt(.) = 16, 5.06, 1.6
    assert mixed_widths([100, 1000, 10_000], 16, 0.5) == [16, 5, 1]
    assert mixed_widths([10_000, 100, 1000], 16, 0.5) == [1, 16, 5]  # order is the features' own
    assert mixed_widths([100, 1000, 10_000], 16, 1.0) == [16, 1, 1]  # 1.6 and 0.16: floored, then at least 1
    assert mixed_widths([100, 1000, 10_000], 16, 0.0) == [16, 16, 16]  # alpha 0: every feature d0
    assert mixed_widths([100, 1000, 10_000], 16, 0.25) == [16, 8, 5]  # 16 * 0.1 ** 0.25 = 8.998, 16 * 0.316 = 5.06


def test_power_of_two_rounds_down():
    assert mixed_widths([100, 1000, 10_000], 16, 0.5, power_of_two=True) == [16, 4, 1]
    assert mixed_widths([100, 1000, 10_000], 12, 0.25, power_of_two=True) == [8, 4, 2]  # 12, 6.75, 3.79


def test_features_under_the_threshold_keep_d0_and_leave_n_min():
    # threshold 50: the 10-row feature keeps d0; n_min is then 100, not 10
    assert mixed_widths([10, 100, 1000], 16, 0.5, threshold=50) == [16, 16, 5]
    assert mixed_widths([10, 100, 1000], 16, 0.5) == [16, 5, 1]
    assert mixed_widths([3, 7], 8, 1.0, threshold=10) == [8, 8]  # tiny tables: nothing ruled


def test_stored_widths_are_multiples_of_four():
    assert [stored_width(d) for d in (1, 2, 3, 4, 5, 8, 9, 16)] == [4, 4, 4, 4, 8, 8, 12, 16]
    assert row_parameters([100, 1000], [3, 9]) == 100 * 4 + 1000 * 12


def test_budget_solves_for_the_largest_d0_that_fits():
    rows = [100, 300]
    # alpha 0: cost(d0) = 400 * stored(d0): d0 = 8 costs 3,200, d0 = 9 costs 4,800
    assert budget_base_dim(rows, 3200, 0.0, False, 0, 16) == 8
    assert budget_base_dim(rows, 3199, 0.0, False, 0, 16) == 4  # 5..8 are all stored as 8
    assert budget_base_dim(rows, 10**9, 0.0, False, 0, 16) == 16  # capped at the model's width
    # alpha 1: d0 = 12 gives widths 12, 4 -> 100 * 12 + 300 * 4 = 2,400; d0 = 13 gives 13 (16), 4 -> 2,800
    assert budget_base_dim(rows, 2400, 1.0, False, 0, 16) == 12
    assert row_parameters(rows, mixed_widths(rows, 12, 1.0)) == 2400
    with pytest.raises(ValueError, match="below the least these features take \\(1,600"):
        budget_base_dim(rows, 1599, 0.0, False, 0, 16)


def _table(widths, embedding_dim=8, oov_buckets=1):
    vocabs = [np.arange(10, 10 + n, dtype=np.int64) for n in (99, 999, 49)]
    return MixedDimTable(["a", "b", "c"], vocabs, widths, embedding_dim, 0.1, oov_buckets, seed=3)


def test_each_feature_is_its_pooled_rows_times_its_projection():
    table = _table([8, 2, 5])  # stored 8, 4, 8: two kernels, only b projected (8 is the output width)
    assert [g for g in table.groups] == [[1], [0, 2]]
    assert [tuple(p.shape) for p in table.dense_parameters()] == [(1, 8, 4)]
    ids = [[10, 11], [15], [12, 999_999]]  # one bag per feature, the last ID unseen (OOV row)
    kjt = KeyedJaggedTensor.from_lengths_sync(["a", "b", "c"], torch.tensor([i for bag in ids for i in bag]),
                                              torch.tensor([2, 1, 2], dtype=torch.int32))
    out = table(kjt)  # [1, 3, 8]
    a, c = table.kernels[1].weights(0), table.kernels[1].weights(1)
    b, projection = table.kernels[0].weights(0), table.projections["0"][0]
    torch.testing.assert_close(out[0, 0], a[0] + a[1])
    torch.testing.assert_close(out[0, 1], b[5] @ projection.T)
    torch.testing.assert_close(out[0, 2], c[2] + c[49])  # row 49: the OOV row after 49 IDs
    out.sum().backward()
    assert table.projections["0"].grad is not None


def test_memory_is_exact_from_the_live_tensors():
    table = _table([8, 2, 5])
    rows_and_state = (100 * 9 + 50 * 9 + 1000 * 5) * 4  # rows x (stored width + one Adagrad value) floats
    assert table.memory_bytes() == rows_and_state + 8 * 4 * 4 + (99 + 999 + 49) * 8  # + projection, vocabularies
    bucketed = _table([4, 4, 4], oov_buckets=6)
    rows = 105 + 1005 + 55
    assert bucketed.memory_bytes() == rows * 5 * 4 + 3 * 8 * 4 * 4 + (99 + 999 + 49) * 8 + 3 * 2 * 8


def test_from_config_reads_sizes_and_refuses_bad_blocks(tiny_root):
    sparse = small_schema().sparse
    tables = build_tables([TableConfig(kind="mixed_dim", embedding_dim=4, options={"alpha": 10.0, "min_count": 10,
                                                                                   "oov_buckets": 5})],
                          sparse, tiny_root, output_dim=8)
    table = tables.tables[0]
    assert table.row_numbers == [53, 53, 51, 50] and table.widths == mixed_widths([53, 53, 51, 50], 4, 10.0)
    assert tables.plan()["tables.0.width.C1"] == f"{table.widths[0]} (stored 4)"
    budget = TableConfig(kind="mixed_dim", embedding_dim=8, options={"budget": 204 * 4})  # every width stored as 4
    assert build_tables([budget], sparse, tiny_root).tables[0].widths == [4, 4, 4, 4]
    with pytest.raises(ConfigError, match="model.tables.0.embedding_dim: d0=16 is wider"):
        build_tables([TableConfig(kind="mixed_dim", embedding_dim=16)], sparse, tiny_root, output_dim=8)
    with pytest.raises(ConfigError, match="model.tables.0.num_embeddings"):
        build_tables([TableConfig(kind="mixed_dim", num_embeddings=10)], sparse, tiny_root)
    with pytest.raises(ConfigError, match="model.tables.0.options.budget: a budget of 10 row parameters"):
        build_tables([TableConfig(kind="mixed_dim", options={"budget": 10})], sparse, tiny_root)
    with pytest.raises(ConfigError, match="model.tables.0.options.alpha"):
        build_tables([TableConfig(kind="mixed_dim", options={"alpha": -1.0})], sparse, tiny_root)


def test_widths_are_run_params_and_printed(tiny_root, tmp_path, capsys):
    cfg = tiny_config(tiny_root, tmp_path, "ray.enabled=false", "train.max_steps=2", "model.tables.0.kind=mixed_dim",
                      "model.tables.0.options={alpha: 10.0, min_count: 10, oov_buckets: 5}")
    train_local(cfg)
    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert run.data.params["tables.0.width.C1"] == "4" and run.data.params["tables.0.width.C3"] == "6 (stored 8)"
    assert "table plan: tables.0.width.C1=4" in capsys.readouterr().out
