"""The memory-efficient kinds (issue 11) in the trainer: they learn under DLRM and DCNv2, a run
stopped and resumed ends where a straight run ends, and they train on one Ray worker. (Their math:
``test_qr.py``, ``test_full_buckets.py``, ``test_multihash.py``, ``test_mixed_dim.py``; the table contract and export parity: ``test_tables_contract.py``,
``test_serving_bundle.py``.)"""

from __future__ import annotations

import pytest
import torch

from recmem.train.checkpoint import load_latest
from recmem.train.local import train_local
from tests.conftest import tiny_config

KINDS = {
    "full_buckets": ["model.tables.0.options={min_count: 10, oov_buckets: 8}"],
    "multihash": ["model.tables.0.kind=multihash", "model.tables.0.num_embeddings=24",
                  "model.tables.0.options={num_hashes: 2}"],
    "multihash_concat": ["model.embedding_dim=8", "model.tables.0.kind=multihash", "model.tables.0.embedding_dim=4",
                         "model.tables.0.options={num_hashes: 2, combine: concat, compression: 2}"],
    # d0 = 8: widths 4, 4, 6 (stored 8), 8; the width-4 features projected to 8
    "mixed_dim": ["model.tables.0.kind=mixed_dim", "model.tables.0.options={alpha: 10.0, min_count: 10, oov_buckets: 5}"],
    # d0 = 4 under a model width of 8: every feature projected
    "mixed_dim_narrow": ["model.embedding_dim=8", "model.tables.0.kind=mixed_dim", "model.tables.0.embedding_dim=4",
                         "model.tables.0.options={alpha: 1.0}"],
    "qr": ["model.tables.0.kind=qr", "model.tables.0.options={collisions: 4, threshold: 30}"],
    "qr_concat": ["model.embedding_dim=8", "model.tables.0.kind=qr", "model.tables.0.embedding_dim=4",
                  "model.tables.0.options={collisions: 4, threshold: 0, operation: concat}"],
}
DCN = ["model.arch=dcnv2", "model.bottom_mlp=[16]", "model.top_mlp=[16,1]", "model.cross_layers=1"]


def _config(root, workdir, kind, *more):
    return tiny_config(root, workdir, "ray.enabled=false", "tracking.enabled=false", "train.log_every=4",
                       *KINDS[kind], *more)


@pytest.mark.parametrize("arch", ["dlrm", "dcnv2"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_learns_and_resumes_exactly(tiny_root, tmp_path, kind, arch):
    extra = DCN if arch == "dcnv2" else []
    straight = train_local(_config(tiny_root, tmp_path / "straight", kind, *extra, "train.max_steps=12"))
    assert straight.metrics["valid/auc"] > 0.6, straight.metrics
    halves = tmp_path / "halves"
    train_local(_config(tiny_root, halves, kind, *extra, "train.max_steps=6"))
    resumed = train_local(_config(tiny_root, halves, kind, *extra, "train.max_steps=12"))
    assert resumed.resumed_from is not None and resumed.step == 12
    a, _ = load_latest(tmp_path / "straight" / "runs/checkpoints")
    b, _ = load_latest(halves / "runs/checkpoints")
    for name, tensor in a["model"].items():
        if isinstance(tensor, torch.Tensor):
            torch.testing.assert_close(b["model"][name], tensor, msg=name)


@pytest.mark.slow
def test_one_ray_worker_trains_each_kind(tiny_root, ray_cluster, tmp_path):
    from recmem.train.distributed import train_ray

    blocks = ("model.tables=[{kind: qr, embedding_dim: 8, feature_names: [C1, C2], "
              "options: {collisions: 4, threshold: 30}}, {kind: multihash, embedding_dim: 8, feature_names: [C3], "
              "num_embeddings: 16, options: {num_hashes: 2}}, {kind: full, embedding_dim: 8, "
              "options: {min_count: 10, oov_buckets: 8}}]")
    cfg = tiny_config(tiny_root, tmp_path, blocks, "ray.num_workers=1", "ray.cpus_per_worker=0.5",
                      "train.max_steps=8", "tracking.enabled=false")
    result = train_ray(cfg)
    assert result.step == 8 and result.metrics["valid/auc"] > 0.55
