"""Exports of models trained on two Ray workers, one per sharding layout: the shards are gathered by
one export worker per rank, and the bundle answers as the sharded model's own forward pass (the
export checks itself on the first validation rows: ``recmem/export/check.py``).

One model holds every kind: ``full`` and ``hash`` go to TorchRec's layouts (or the ID-sharded path
under ``id``), ``collisionless`` is always ID-sharded.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from recmem.cli import main
from recmem.export.job import export_job
from recmem.serving import load_bundle
from recmem.train.distributed import train_ray
from tests.conftest import small_schema, tiny_config, write_learnable_root

TABLES = ("model.tables=[{kind: full, embedding_dim: 8, feature_names: [C1, C2]}, "
          "{kind: hash, embedding_dim: 8, num_embeddings: 64, feature_names: [C3]}, "
          "{kind: collisionless, embedding_dim: 8, feature_names: [C4], options: {capacity: 1000, initial_rows: 16}}]")
COMMON = ("train.max_steps=6", "train.log_every=3", "ray.num_workers=2", "ray.cpus_per_worker=0.5", TABLES)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_learnable_root(tmp_path_factory.mktemp("serve_ray_data"), small_schema(), rows=2048, valid=512)


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["id", "table_wise", "row_wise", "column_wise"])
def test_two_worker_export_answers_as_the_sharded_model(root, ray_cluster, tmp_path, sharding, capsys):
    cfg = tiny_config(root, tmp_path, *COMMON, f"ray.sharding={sharding}")
    started = time.perf_counter()
    result = train_ray(cfg)
    trained = time.perf_counter()
    folder = export_job(cfg, tmp_path / "bundles", "fp32")
    print(f"{sharding}: train {trained - started:.1f} s, export {time.perf_counter() - trained:.1f} s")
    bundle = load_bundle(folder)
    m = bundle.manifest
    assert m["export_check"]["rows"] == 256
    assert m["export_check"]["max_abs_logit_diff"] <= 1e-5, m["export_check"]
    assert m["sharding"].startswith("2 workers") and m["step"] == result.step == 6
    assert [t["kind"] for t in m["tables"]] == ["full", "full", "hash", "collisionless"]
    assert [t["lookup"] for t in m["tables"]] == ["keyed", "keyed", "modulo", "keyed"]
    assert m["tables"][2]["rows"] == 64 and m["training_run"]
    if sharding == "id":  # the same run found from its MLflow run id, as an int8 bundle
        run_id = m["training_run"]
        capsys.readouterr()
        assert main(["export", "--run", run_id, "--format", "int8", "--out", str(tmp_path / "by_run"),
                     f"tracking.tracking_uri={cfg.tracking.tracking_uri}"]) == 0
        small = load_bundle(Path(capsys.readouterr().out.strip().splitlines()[-1].split()[0]))
        assert small.manifest["training_run"] == run_id and small.manifest["quantization"] == "int8"
        assert small.nbytes()["tables"] < bundle.nbytes()["tables"]
