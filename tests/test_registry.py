"""MLflow Model Registry: train -> register -> promote -> fetch by alias -> the pyfunc model, the bundle
and the trainer answer alike; bad names and aliases are one-line errors; a failed registration keeps
the checkpoint. On the default SQLite store, and on a real ``mlflow server`` (slow)."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from recmem import registry
from recmem.cli import main
from recmem.serving import InputError, load_bundle
from recmem.train.checkpoint import load_latest
from recmem.train.loop import build_job_model
from tests.conftest import tiny_config, tiny_overrides
from tests.test_tracking_faults import _Server

NAME = "ctr"


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    """(overrides, workdir, tracking URI, `recmem train` output) of a run with train.register_as=ctr."""
    workdir = tmp_path_factory.mktemp("registry")
    overrides = tiny_overrides(tiny_root, workdir, "ray.enabled=false", "train.max_steps=12")
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as env, redirect_stdout(out):
        env.delenv("MLFLOW_REGISTRY_URI", raising=False)  # the registry is the tracking store's
        assert main(["train", *overrides, f"train.register_as={NAME}"]) == 0
    return overrides, workdir, f"sqlite:///{workdir}/mlflow.db", out.getvalue()


def _trainer_probabilities(cfg, rows: int) -> tuple[list[dict], np.ndarray]:
    """The first validation rows, raw, and the trained model's own probabilities on them."""
    from recmem.export.check import probe_batch

    model = build_job_model(cfg)
    model.load_state_dict(load_latest(Path(cfg.workdir) / cfg.train.checkpoint_dir)[0]["model"])
    model.eval()
    with torch.no_grad():
        expected = torch.sigmoid(model(probe_batch(cfg, rows))).numpy()
    return registry.raw_rows(cfg, rows), expected


def _one_line_error(capsys, argv: list[str], *words: str) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"recmem {argv[0]}: error: "), captured
    for word in words:
        assert word in err, err
    return err


def test_train_registers_promote_fetch_and_the_pyfunc_answers_as_the_trainer(trained, tiny_root, tmp_path, capsys):
    import mlflow

    overrides, workdir, uri, printed = trained
    assert f"registered {NAME} version 1 (" in printed
    assert main(["promote", NAME, "1", *overrides]) == 0
    assert capsys.readouterr().out.strip() == f"{NAME}@champion: none -> 1"
    assert registry.alias_version(NAME, "champion", uri) == "1"

    version, folder = registry.fetch(NAME, "champion", tmp_path / "models", uri)
    assert version == "1" and folder == tmp_path / "models" / f"{NAME}-v1" / "artifacts" / "bundle"
    assert registry.fetch(NAME, "champion", tmp_path / "models", uri) == (version, folder)  # kept, not again

    cfg = tiny_config(tiny_root, workdir, "ray.enabled=false")
    rows, expected = _trainer_probabilities(cfg, 64)
    bundle = load_bundle(folder)
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    np.testing.assert_allclose(bundle.predict(rows), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(model.predict(pd.DataFrame(rows)), bundle.predict(rows), rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.predict(rows), bundle.predict(rows), rtol=0, atol=1e-6)
    missing = [{**rows[0], "I1": None, "C1": ""}, {**rows[1], "C2": "68fd1e64", "C3": [rows[2]["C3"], 7]}]
    assert model.predict(pd.DataFrame(missing)).tolist() == pytest.approx(bundle.predict(missing), abs=1e-6)
    with pytest.raises(InputError, match="column 'C1': floats are not IDs .* send a missing ID as \"\""):
        model.predict(pd.DataFrame([{**rows[0], "C1": None}, rows[1]]))

    schema = model.metadata.get_input_schema()
    assert schema.input_names() == cfg.data.schema.dense + cfg.data.schema.sparse
    assert model.metadata.get_output_schema() is not None
    example = json.loads((folder.parents[1] / "input_example.json").read_text())
    assert example["columns"] == cfg.data.schema.dense + cfg.data.schema.sparse and len(example["data"]) == 5

    tags = mlflow.MlflowClient(uri).get_model_version(NAME, "1").tags
    manifest = bundle.manifest
    assert tags["recmem.bundle_version"] == manifest["version"]
    assert tags["recmem.training_run"] == manifest["training_run"] == load_latest(
        workdir / cfg.train.checkpoint_dir)[0]["run_id"]
    assert float(tags["recmem.valid_auc"]) > 0.6 and tags["recmem.version"]


def test_register_a_run_and_move_the_alias(trained, tiny_root, tmp_path, capsys):
    overrides, workdir, uri, _ = trained
    run_id = load_latest(workdir / "runs" / "checkpoints")[0]["run_id"]
    capsys.readouterr()
    assert main(["register", "--run", run_id, "--name", NAME, *overrides]) == 0
    assert capsys.readouterr().out.startswith(f"registered {NAME} version 2 (")
    main(["promote", NAME, "1", *overrides])
    capsys.readouterr()
    assert main(["promote", NAME, "2", "--alias", "champion", *overrides]) == 0
    assert capsys.readouterr().out.strip() == f"{NAME}@champion: 1 -> 2"
    assert registry.alias_version(NAME, "champion", uri) == "2"
    assert main(["models", NAME, *overrides]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["version", "2", "champion"] and lines[1].split()[:3] == ["version", "1", "-"]
    folder = Path(workdir / "exports").iterdir().__next__()
    assert main(["register", "--bundle", str(folder), "--name", "other", *overrides]) == 0
    assert capsys.readouterr().out.startswith("registered other version 1 (")


def test_bad_names_aliases_and_versions_are_one_line_errors(trained, tmp_path, capsys):
    overrides, _, uri, _ = trained
    _one_line_error(capsys, ["promote", "nope", "1", *overrides], "'nope' does not exist", "'ctr'")
    _one_line_error(capsys, ["promote", NAME, "99", *overrides], "no version 99", "its aliases")
    _one_line_error(capsys, ["promote", NAME, "x", *overrides], "'x'")
    _one_line_error(capsys, ["promote", NAME, "1", "--alias", "a/b", *overrides], "alias 'a/b'")
    _one_line_error(capsys, ["promote", NAME, "1", "--alias", "latest", *overrides], "alias 'latest'")
    _one_line_error(capsys, ["models", "nope", *overrides], "'nope' does not exist")
    _one_line_error(capsys, ["register", "--bundle", str(tmp_path), "--name", "a/b", *overrides], "'a/b'")
    _one_line_error(capsys, ["register", "--bundle", str(tmp_path), "--name", "fine", *overrides], "manifest.json")
    _one_line_error(capsys, ["register", "--run", "0" * 32, "--name", "fine", *overrides], "0" * 32)
    _one_line_error(capsys, ["train", *overrides, "train.register_as=a/b"], "train.register_as")
    with pytest.raises(registry.RegistryError, match=r"'ctr' has no alias 'gold' \(its aliases: champion -> "):
        registry.fetch(NAME, "gold", tmp_path, uri)
    with pytest.raises(registry.RegistryError, match=r"model 'nope' does not exist .*models there: .*'ctr'"):
        registry.alias_version("nope", "champion", uri)


def test_a_failed_registration_keeps_the_checkpoint(tiny_root, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("the registry is read-only\nsecond line")

    monkeypatch.setattr(registry, "register_bundle", refuse)
    overrides = tiny_overrides(tiny_root, tmp_path, "ray.enabled=false", "train.max_steps=3", "train.register_as=m")
    assert main(["train", *overrides]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("recmem train: registering as 'm' failed (the registry is read-only second line); "
                              "the checkpoint is kept"), err
    assert load_latest(tmp_path / "runs" / "checkpoints")[0]["step"] == 3


@pytest.mark.slow
def test_register_promote_and_fetch_on_a_tracking_server(trained, tiny_root, tmp_path, capsys):
    import mlflow

    overrides, workdir, _, _ = trained
    server = _Server(tmp_path / "server")
    server.folder.mkdir()
    server.start()
    try:
        at = [*overrides, f"tracking.tracking_uri={server.uri}"]
        folder = next((workdir / "exports").iterdir())
        assert main(["register", "--bundle", str(folder), "--name", NAME, *at]) == 0
        assert main(["promote", NAME, "1", *at]) == 0
        assert capsys.readouterr().out.strip().endswith(f"{NAME}@champion: none -> 1")
        version, fetched = registry.fetch(NAME, "champion", tmp_path / "models", server.uri)
        assert version == registry.alias_version(NAME, "champion", server.uri) == "1"
        cfg = tiny_config(tiny_root, workdir, "ray.enabled=false")
        rows, expected = _trainer_probabilities(cfg, 32)
        mlflow.set_tracking_uri(server.uri)
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
        np.testing.assert_allclose(model.predict(pd.DataFrame(rows)), expected, rtol=0, atol=1e-5)
        np.testing.assert_allclose(load_bundle(fetched).predict(rows), expected, rtol=0, atol=1e-5)
        _one_line_error(capsys, ["promote", NAME, "1", "--alias", "v3", *at], "alias 'v3'")
        with pytest.raises(registry.RegistryError, match="has no alias 'gold'"):
            registry.alias_version(NAME, "gold", server.uri)
    finally:
        server.kill()


@pytest.mark.slow
def test_a_ray_run_registers_its_final_checkpoint(ray_cluster, tiny_root, tmp_path, capsys):
    import ray

    overrides = tiny_overrides(tiny_root, tmp_path, "train.max_steps=6", "ray.num_workers=1",
                               "ray.cpus_per_worker=0.5", f"ray.address={ray.get_runtime_context().gcs_address}",
                               "train.register_as=ray-ctr")
    assert main(["train", *overrides]) == 0
    assert "registered ray-ctr version 1 (" in capsys.readouterr().out
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    registry.set_alias("ray-ctr", "champion", "1", uri)
    _, folder = registry.fetch("ray-ctr", "champion", tmp_path / "models", uri)
    manifest = load_bundle(folder).manifest
    assert manifest["step"] == 6 and manifest["export_check"]["max_abs_logit_diff"] <= 1e-5


def test_registering_ignores_another_store_in_the_environment(trained, tmp_path, monkeypatch):
    """A process whose MLFLOW_TRACKING_URI names another store (as a Ray driver's does after
    train_ray) still registers into the store it is given."""
    _, workdir, uri, _ = trained
    import mlflow.tracking._tracking_service.utils as tracking_utils

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/elsewhere.db")
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)  # no URI set in code: the environment's counts
    folder = next(Path(workdir / "exports").iterdir())
    version = registry.register_bundle(folder, "elsewhere-proof", tracking_uri=uri)
    assert version == "1"
    assert registry.registry_client(uri).get_model_version("elsewhere-proof", version).source.startswith("models:/")
