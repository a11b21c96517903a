"""OptEmbed's phases in the trainer: the supernet (sampled widths, thresholds) and the retrained
compact table learn under DLRM and DCNv2 and resume exactly; ``recmem optembed`` runs the three
phases as nested MLflow runs, resumes each on a rerun, and its retrained model exports to a bundle
that answers as it does. (The math: ``test_optembed.py``.)"""

from __future__ import annotations

import json

import pytest
import torch

from recmem.cli import main
from recmem.data.stats import load_ids
from recmem.tables.optembed import Plan
from recmem.train.checkpoint import load_latest
from recmem.train.local import train_local
from tests.conftest import small_schema, tiny_config, tiny_overrides

DCN = ["model.arch=dcnv2", "model.bottom_mlp=[16]", "model.top_mlp=[16,1]", "model.cross_layers=1"]
SUPERNET = ["model.tables.0.kind=optembed", "model.tables.0.options={alpha: 1e-3, threshold_lr: 0.01}"]
SEARCH = ("model.tables.0.options={alpha: 1e-3, population: 4, top_k: 2, mutations: 2, crossovers: 2, "
          "iterations: 1, search_batches: 4, max_bytes: 7000}")  # width 8 everywhere would take ~9,300 bytes


def _plan_options(tiny_root, folder):
    schema = small_schema()
    keys = [torch.as_tensor(load_ids(tiny_root, f)[::3].copy()) for f in schema.sparse]
    Plan(schema.sparse, 8, [2, 8, 5, 1], keys, [True, False, True, True]).save(folder / "plan.pt")
    return ["model.tables.0.kind=optembed", f"model.tables.0.options={{plan: {folder / 'plan.pt'}}}"]


def _same_checkpoints(a_dir, b_dir):
    a, _ = load_latest(a_dir)
    b, _ = load_latest(b_dir)
    for name, tensor in a["model"].items():
        if isinstance(tensor, torch.Tensor):
            torch.testing.assert_close(b["model"][name], tensor, msg=name)


@pytest.mark.parametrize("phase,arch", [("supernet", "dlrm"), ("supernet", "dcnv2"), ("retrained", "dlrm")])
def test_phase_learns_and_resumes_exactly(tiny_root, tmp_path, phase, arch):
    table = SUPERNET if phase == "supernet" else _plan_options(tiny_root, tmp_path)
    extra = [*table, *(DCN if arch == "dcnv2" else []), "ray.enabled=false", "tracking.enabled=false"]
    straight = train_local(tiny_config(tiny_root, tmp_path / "straight", *extra, "train.max_steps=12"))
    assert straight.metrics["valid/auc"] > 0.6, straight.metrics
    halves = tmp_path / "halves"
    train_local(tiny_config(tiny_root, halves, *extra, "train.max_steps=6"))
    resumed = train_local(tiny_config(tiny_root, halves, *extra, "train.max_steps=12"))
    assert resumed.resumed_from is not None and resumed.step == 12
    _same_checkpoints(tmp_path / "straight" / "runs/checkpoints", halves / "runs/checkpoints")


@pytest.mark.slow
def test_command_runs_three_nested_phases_resumes_and_exports(tiny_root, tmp_path, capsys):
    import mlflow

    from recmem.data.dataset import iter_batches
    from recmem.export.job import export_job
    from recmem.serving import load_bundle
    from recmem.train.loop import build_job_model

    args = ["optembed", *tiny_overrides(tiny_root, tmp_path, "ray.enabled=false", "model.tables.0.kind=optembed",
                                        SEARCH, "train.max_steps=10")]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "plan-0-" in first and "valid AUC" in first
    (plan_file,) = (tmp_path / "runs/checkpoints/search").glob("plan-0-*.pt")
    search = tmp_path / "runs/checkpoints/search"
    state = json.loads((search / "state.json").read_text())
    assert state["generation"] == 1 and len(state["scores"]) >= 4

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = {r.info.run_name.split("-")[0]: r for r in mlflow.search_runs(search_all_experiments=True,
                                                                           output_format="list")}
    assert len(runs) == 4 and set(runs) == {"optembed", "optembed/supernet", "optembed/search", "optembed/retrain"}
    parent = runs["optembed"].info.run_id
    phases = ("supernet", "search", "retrain")
    assert all(runs[f"optembed/{p}"].data.tags["mlflow.parentRunId"] == parent for p in phases)
    assert "train/aux_loss" in runs["optembed/supernet"].data.metrics
    assert runs["optembed/search"].data.params["tables.0.widths"].startswith("[")

    assert main(args) == 0  # a rerun resumes every phase: no new candidates, no new runs
    assert json.loads((search / "state.json").read_text()) == state
    again = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert sorted(r.info.run_id for r in again) == sorted(r.info.run_id for r in runs.values())
    assert main([*args, "model.tables.0.options.iterations=2"]) == 0  # more generations continue the search
    longer = json.loads((search / "state.json").read_text())
    assert longer["generation"] == 2 and longer["scores"][:len(state["scores"])] == state["scores"]
    assert main([*args, "model.tables.0.options.population=5"]) == 0  # another search; the supernet resumes
    rerun = capsys.readouterr().out
    assert "searching afresh" in rerun and "supernet/step-000000010.pt at step 10" in rerun
    assert len(json.loads((search / "state.json").read_text())["scores"]) >= 5
    folder = f"runs/checkpoints/retrain-{plan_file.stem.rsplit('-', 1)[1]}"
    assert f"train.checkpoint_dir={folder}" in first
    retrain = tiny_config(tiny_root, tmp_path, "ray.enabled=false", "model.tables.0.kind=optembed",
                          f"model.tables.0.options={{plan: {plan_file}}}", f"train.checkpoint_dir={folder}",
                          "tracking.enabled=false")
    model = build_job_model(retrain)
    model.load_state_dict(load_latest(tmp_path / folder)[0]["model"])
    model.eval()
    bundle = load_bundle(export_job(retrain, None, "fp32"))
    batch = next(iter_batches(tiny_root, "valid", retrain.data.schema, 300, drop_last=False))
    kjt = batch.sparse_features
    values = [kjt[f].values() for f in retrain.data.schema.sparse]
    lengths = [kjt[f].lengths().long() for f in retrain.data.schema.sparse]
    with torch.no_grad():
        expected = model(batch)
    torch.testing.assert_close(bundle.logits(batch.dense_features, values, lengths), expected, rtol=0, atol=1e-5)
    plan = Plan.load(plan_file, retrain.data.schema.sparse, 8, "plan")
    assert model.tables.memory_bytes() <= 7000  # the search's max_bytes held
    rows = sum(f.tensors["rows"].shape[0] for f in model.tables.to_serving())
    assert rows == sum(len(k) for k in plan.keys)  # only the kept rows are exported


@pytest.mark.slow
def test_one_ray_worker_trains_a_supernet_and_a_retrained_block(tiny_root, ray_cluster, tmp_path):
    from recmem.train.distributed import train_ray

    keys = [torch.as_tensor(load_ids(tiny_root, f)[::2].copy()) for f in ("C3", "C4")]
    Plan(["C3", "C4"], 8, [3, 8], keys, [True, False]).save(tmp_path / "plan.pt")
    blocks = ("model.tables=[{kind: optembed, embedding_dim: 8, feature_names: [C1, C2]}, "
              f"{{kind: optembed, embedding_dim: 8, feature_names: [C3, C4], options: {{plan: {tmp_path / 'plan.pt'}}}}}]")
    cfg = tiny_config(tiny_root, tmp_path, blocks, "ray.num_workers=1", "ray.cpus_per_worker=0.5",
                      "train.max_steps=8", "tracking.enabled=false")
    result = train_ray(cfg)
    assert result.step == 8 and result.metrics["valid/auc"] > 0.55
