"""The serving-bundle benchmark on tiny data: one training, three formats, the fp32 bundle scoring as
the trainer did and the smaller formats smaller."""

from __future__ import annotations

from recmem.bench.serving import report, run_serving_bench
from tests.conftest import tiny_config


def test_serving_bench_reports_every_format(tiny_root, tmp_path):
    cfg = tiny_config(tiny_root, tmp_path, "train.max_steps=4")
    result = run_serving_bench(cfg, tmp_path / "bench")
    fp32, fp16, int8 = result["formats"]
    assert [r["format"] for r in result["formats"]] == ["fp32", "fp16", "int8"]
    assert abs(fp32["valid/auc"] - result["trainer"]["valid/auc"]) < 1e-6
    # int8 rows carry an fp32 scale and bias each: at D = 8 they weigh what fp16 rows do
    assert int8["table_bytes"] <= fp16["table_bytes"] < fp32["table_bytes"]
    text = report("tiny", result)
    assert "| int8 |" in text and result["cpu"] in text
