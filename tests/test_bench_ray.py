"""The Ray path benchmark (``jobs/bench_ray.py``) at a tiny size, so that it cannot rot."""

from __future__ import annotations

import json

from jobs import bench_ray


def test_the_single_process_run_and_the_stream_are_measured(tmp_path, capsys):
    """The single-process variant only (Ray's runs cost a worker start each); the report and the JSON."""
    bench_ray.main(["--workdir", str(tmp_path), "--variant", "single", "--no-floor", "--repeat", "1",
                    "data.synthetic.train_rows=8192", "data.synthetic.valid_rows=2048", "data.batch_size=1024",
                    "model.bottom_mlp=[32,16]", "model.top_mlp=[32,1]", "train.precision=fp32"])
    lines = capsys.readouterr().out.strip().splitlines()
    record = json.loads(lines[-1])
    single = record["runs"]["single"]
    assert single["train/pass_samples_per_second"] <= single["train/samples_per_second"]
    assert 0 < single["startup/first_step_s"] < single["wall_s"]
    assert single["valid/rows"] == 2048 and 0.5 < single["valid/auc"] <= 1
    assert set(record["stream_rows_per_second"]) == {"1/0", "2/0", "2/1"}
    assert all(rate > 0 for rate in record["stream_rows_per_second"].values())
    assert any(line.startswith("| single |") and "| 1.00x |" in line for line in lines)


def test_variants_and_overrides_parse():
    opts = bench_ray.parse_options(["--workdir", "w", "--variant", "ray_2", "a.b=1", "--no-floor"])
    assert (opts.variants, opts.overrides, opts.floor, opts.repeat) == (("ray_2",), ("a.b=1",), False, 3)
    assert bench_ray.parse_options(["--workdir", "w"]).variants == ("single", "ray_1", "ray_2")
