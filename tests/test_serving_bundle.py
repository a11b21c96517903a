"""Serving bundles: export -> load -> predict equals the trainer, for every kind and row format;
loading needs torch alone; hostile bundles, bad rows and bad deltas are refused by name.
(Ray-trained exports: ``test_serving_ray.py``.)"""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from recmem.cli import main
from recmem.data.dataset import iter_batches
from recmem.export.job import export_job
from recmem.serving import Bundle, BundleError, DeltaConflict, InputError, load_bundle
from recmem.train.checkpoint import load_latest
from recmem.train.local import train_local
from recmem.train.loop import build_job_model
from tests.conftest import tiny_config, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
KINDS = {
    "full": [],
    "full_buckets": ["model.tables.0.options={min_count: 10, oov_buckets: 5}"],
    "hash": ["model.tables.0.num_embeddings=64"],
    "collisionless": ["model.tables.0.options={capacity: 1000, initial_rows: 16}"],
    "qr": ["model.tables.0.options={collisions: 4, threshold: 30, oov_buckets: 3}"],
    "multihash": ["model.tables.0.num_embeddings=32", "model.tables.0.options={num_hashes: 2}"],
    # widths 4, 4, 6 (stored 8), 8 of d0 = 8 (test_tables_contract.py): the bundle carries a projection
    "mixed_dim": ["model.tables.0.options={alpha: 10.0, min_count: 10, oov_buckets: 5}"],
}


VARIANT_KINDS = {"full_buckets": "full"}
"""The table kind of each KINDS entry that is a variant of a kind rather than a kind."""


def _config(root: Path, workdir: Path, kind: str, *more: str):
    return tiny_config(root, workdir, "ray.enabled=false", "train.max_steps=12", "tracking.enabled=false",
                       f"model.tables.0.kind={VARIANT_KINDS.get(kind, kind)}", *KINDS[kind], *more)


@pytest.fixture(scope="module", params=sorted(KINDS))
def trained(request, tiny_root, tmp_path_factory):
    """(config, trained model in eval mode, fp32 bundle folder) of one kind."""
    workdir = tmp_path_factory.mktemp(f"serve-{request.param}")
    cfg = _config(tiny_root, workdir, request.param)
    train_local(cfg)
    model = build_job_model(cfg)
    state, _ = load_latest(workdir / cfg.train.checkpoint_dir)
    model.load_state_dict(state["model"])
    model.eval()
    return cfg, model, export_job(cfg, None, "fp32")


def _valid_batch(cfg, rows: int = 300):
    return next(iter_batches(Path(cfg.data.root), "valid", cfg.data.schema, rows, drop_last=False))


def _tensors(batch, sparse: list[str]):
    kjt = batch.sparse_features
    return [kjt[f].values() for f in sparse], [kjt[f].lengths().long() for f in sparse]


def _raw_rows(batch, cfg) -> list[dict]:
    """The batch as a client would send it: raw dense values (the Parquet holds log(1 + x))."""
    s, kjt = cfg.data.schema, batch.sparse_features
    dense = torch.expm1(batch.dense_features.double()).tolist()
    ids = {f: kjt[f].values().tolist() for f in s.sparse}
    return [{**dict(zip(s.dense, dense[i])), **{f: ids[f][i] for f in s.sparse}} for i in range(len(batch))]


def test_bundle_answers_as_the_trainer(trained):
    cfg, model, folder = trained
    bundle = load_bundle(folder)
    batch = _valid_batch(cfg)
    with torch.no_grad():
        expected = model(batch)
    values, lengths = _tensors(batch, cfg.data.schema.sparse)
    torch.testing.assert_close(bundle.logits(batch.dense_features, values, lengths), expected, rtol=0, atol=1e-5)
    probabilities = bundle.predict(_raw_rows(batch, cfg))
    assert np.allclose(probabilities, torch.sigmoid(expected).numpy(), rtol=0, atol=1e-5)
    m = bundle.manifest
    assert m["version"] == folder.name == bundle.version
    assert m["quantization"] == "fp32" and m["dense"]["format"] == "torch.export"
    assert [t["kind"] for t in m["tables"]] == [cfg.model.tables[0].kind] * 4
    assert m["schema"]["sparse"] == cfg.data.schema.sparse and m["step"] == 12
    assert isinstance(m["last_data_time"], int) and m["recmem_version"]
    assert m["export_check"]["rows"] == 256 and m["export_check"]["max_abs_logit_diff"] <= 1e-5


def test_unseen_ids_get_the_kinds_default(trained):
    cfg, model, folder = trained
    bundle = load_bundle(folder)
    s = cfg.data.schema
    unseen = {**{f: 1.0 for f in s.dense}, **{f: 123456789 for f in s.sparse}}
    empty = {**unseen, **{f: [] for f in s.sparse}}
    got = bundle.predict([unseen, empty])
    kind = cfg.model.tables[0].kind
    if kind == "collisionless":  # no row: pools to nothing, as an empty bag
        assert got[0] == pytest.approx(got[1], abs=1e-6)
    else:  # full: the OOV row; hash: the row id mod n
        assert got[0] != pytest.approx(got[1], abs=1e-6)


def test_loading_needs_torch_alone(trained, tmp_path):
    """A process where torchrec, fbgemm, numba, ray, mlflow and recmem's training code cannot be
    imported loads the bundle and predicts."""
    cfg, model, folder = trained
    batch = _valid_batch(cfg, 20)
    rows = _raw_rows(batch, cfg)
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    script = f"""
import importlib.abc, json, sys
BLOCKED = ("torchrec", "fbgemm_gpu", "numba", "ray", "mlflow", "recmem.tables",
           "recmem.train", "recmem.models", "recmem.data", "recmem.export", "recmem.config", "recmem.tracking")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError("blocked: " + name)  # as if it were not installed
sys.meta_path.insert(0, Block())
from recmem.serving import load_bundle
bundle = load_bundle({str(folder)!r})
print(json.dumps(bundle.predict(json.load(open({str(tmp_path / 'rows.json')!r})))))
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torchrec", "fbgemm_gpu", "numba", "ray", "mlflow"))))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    with torch.no_grad():
        expected = torch.sigmoid(model(batch)).numpy()
    assert np.allclose(json.loads(lines[-2]), expected, rtol=0, atol=1e-5)
    assert json.loads(lines[-1]) == []


@pytest.mark.parametrize("fmt", ["fp16", "int8"])
def test_quantized_bundles_are_smaller_and_close(trained, fmt):
    cfg, model, folder = trained
    quantized = export_job(cfg, folder.parent, fmt)
    full, small = load_bundle(folder), load_bundle(quantized)
    assert small.manifest["quantization"] == fmt and fmt in small.version
    assert small.nbytes()["tables"] < full.nbytes()["tables"]
    batch = _valid_batch(cfg)
    values, lengths = _tensors(batch, cfg.data.schema.sparse)
    a = full.predict_tensors(batch.dense_features, values, lengths)
    b = small.predict_tensors(batch.dense_features, values, lengths)
    assert (a - b).abs().max() < (2e-3 if fmt == "fp16" else 3e-2)


@pytest.mark.parametrize("arch", ["dlrm", "dcnv2"])
def test_torchscript_fallback_when_torch_export_fails(tiny_root, tmp_path, monkeypatch, arch):
    cfg = _config(tiny_root, tmp_path, "full", "train.max_steps=2", f"model.arch={arch}")
    train_local(cfg)

    def refuse(*args, **kwargs):
        raise RuntimeError("torch.export cannot trace this")

    monkeypatch.setattr(torch.export, "export", refuse)
    bundle = load_bundle(export_job(cfg, None, "fp32"))  # the export's own check compares with the model
    assert bundle.manifest["dense"]["format"] == "torchscript"
    assert "cannot trace this" in bundle.manifest["dense"]["fallback_reason"]
    assert bundle.manifest["export_check"]["max_abs_logit_diff"] <= 1e-5
    assert len(bundle.predict([{f: None for f in (*cfg.data.schema.dense, *cfg.data.schema.sparse)}] * 3)) == 3


# ---- hostile bundles ------------------------------------------------------------------------------

@pytest.fixture
def bundle_copy(trained, tmp_path):
    import shutil

    cfg, _, folder = trained
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    return copy


def _rewrite_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _reseal(folder: Path, name: str) -> None:
    """Make the manifest vouch for ``name``'s current bytes (what an attacker holding the folder can do)."""
    import hashlib

    data = (folder / name).read_bytes()
    _rewrite_manifest(folder, lambda m: m["files"].__setitem__(name, {"sha256": hashlib.sha256(data).hexdigest(),
                                                                      "bytes": len(data)}))


def test_altered_files_are_refused_by_name(bundle_copy):
    rows = bundle_copy / "tables" / "0.rows.npy"
    data = bytearray(rows.read_bytes())
    data[-1] ^= 0xFF
    rows.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"tables/0.rows.npy: its SHA-256 differs"):
        load_bundle(bundle_copy)
    rows.write_bytes(bytes(data[:-4]))
    with pytest.raises(BundleError, match=r"tables/0.rows.npy: .* bytes where the manifest says"):
        load_bundle(bundle_copy)
    rows.unlink()
    with pytest.raises(BundleError, match=r"tables/0.rows.npy: missing"):
        load_bundle(bundle_copy)


def test_malformed_manifests_are_refused(bundle_copy, tmp_path):
    with pytest.raises(BundleError, match="manifest.json: missing"):
        load_bundle(tmp_path)
    good = (bundle_copy / "manifest.json").read_text()
    for change, message in [
        (lambda m: m.__setitem__("bundle_format", 99), "bundle_format 99"),
        (lambda m: m["files"].__setitem__("../outside", {"sha256": "0", "bytes": 1}), "../outside: not a file inside"),
        (lambda m: m["tables"].pop(), "one table per sparse feature"),
        (lambda m: m["tables"][0].__setitem__("width", 3), "width"),
        (lambda m: m.__setitem__("quantization", "int4"), "quantization"),
        (lambda m: m["tables"][1]["files"].__setitem__("rows", "dense.pt2"), "rows|not a NumPy"),
    ]:
        (bundle_copy / "manifest.json").write_text(good)
        _rewrite_manifest(bundle_copy, change)
        with pytest.raises(BundleError, match=message):
            load_bundle(bundle_copy)
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="manifest.json: does not read as JSON"):
        load_bundle(bundle_copy)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_nothing_is_unpickled(bundle_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = (bundle_copy / "manifest.json").read_text()
    table = bundle_copy / "tables" / "0.rows.npy"
    original = table.read_bytes()
    # An object array in a table file (np.load would need allow_pickle).
    np.save(table, np.array([_Boom()], dtype=object), allow_pickle=True)
    _reseal(bundle_copy, "tables/0.rows.npy")
    with pytest.raises(BundleError, match="tables/0.rows.npy"):
        load_bundle(bundle_copy)
    # A pickled payload inside the torch.export archive, where torch.export.load would unpickle it.
    table.write_bytes(original)
    (bundle_copy / "manifest.json").write_text(good)
    if json.loads(good)["dense"]["format"] == "torch.export":
        for member_suffix in ("data/sample_inputs/model.pt", "data/weights/model_weights_config.json"):
            _replace_member(bundle_copy / "dense.pt2", member_suffix)
            _reseal(bundle_copy, "dense.pt2")
            with pytest.raises(BundleError, match="dense.pt2: .*refused unread"):
                load_bundle(bundle_copy)
    assert not (tmp_path / "PWNED").exists()


def _replace_member(archive_path: Path, suffix: str) -> None:
    with zipfile.ZipFile(archive_path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    for name in members:
        if name.endswith(suffix):
            if suffix.endswith(".json"):
                config = json.loads(members[name])
                for entry in config["config"].values():
                    entry["use_pickle"] = True
                members[name] = json.dumps(config).encode()
            else:
                members[name] = pickle.dumps(_Boom())
    with zipfile.ZipFile(archive_path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


# ---- rows -----------------------------------------------------------------------------------------

def test_bad_rows_name_the_row_and_the_field(trained):
    cfg, _, folder = trained
    bundle = load_bundle(folder)
    s = cfg.data.schema
    good = {**{f: 1 for f in s.dense}, **{f: "a1" for f in s.sparse}}
    assert len(bundle.predict([good, {**good, s.label: 1.0}, {**good, "I1": None, "C1": None}])) == 3
    cases = [
        ({**good, "extra": 1}, "row 1: unknown field 'extra'"),
        ({k: v for k, v in good.items() if k != "C2"}, "row 1: missing field 'C2'"),
        ({**good, "I2": float("nan")}, "row 1: field 'I2': nan is not a finite"),
        ({**good, "I2": float("inf")}, "row 1: field 'I2': inf is not a finite"),
        ({**good, "I2": "3"}, "row 1: field 'I2': expected a number"),
        ({**good, "I2": 10**400}, "row 1: field 'I2': number out of range"),
        ({**good, "C1": True}, "row 1: field 'C1': expected an ID"),
        ({**good, "C1": 2**63}, "row 1: field 'C1': integer ID out of the int64 range"),
        ({**good, "C1": "xyz"}, "row 1: field 'C1': 'xyz' is not 1 to 15 hex digits"),
        ({**good, "C1": "1" * 16}, "is not 1 to 15 hex digits"),
        ({**good, "C1": [[1]]}, "row 1: field 'C1': expected an ID"),
        ("not a row", "row 1: expected an object"),
    ]
    for bad, message in cases:
        with pytest.raises(InputError, match=message.replace("(", r"\(")):
            bundle.predict([good, bad])
    with pytest.raises(InputError, match="3 rows is more than the limit of 2"):
        bundle.predict([good] * 3, max_rows=2)
    with pytest.raises(InputError, match="rows must be a list"):
        bundle.predict({"rows": [good]})
    assert bundle.predict([]) == []
    partial = {f: 1 for f in s.dense}
    assert bundle.predict([partial], fill_missing=True) == bundle.predict([{**partial, **{f: None for f in s.sparse}}])


def test_ids_as_hex_strings_and_as_integers_agree(trained):
    cfg, _, folder = trained
    bundle = load_bundle(folder)
    s = cfg.data.schema
    dense = {f: 2.5 for f in s.dense}
    as_hex = {**dense, **{f: "68fd1e64" for f in s.sparse}}
    as_int = {**dense, **{f: 0x68FD1E64 for f in s.sparse}}
    as_bag = {**dense, **{f: ["68fd1e64"] for f in s.sparse}}
    assert bundle.predict([as_hex]) == bundle.predict([as_int]) == bundle.predict([as_bag])


def test_plain_tensor_inputs_are_checked(trained):
    cfg, _, folder = trained
    bundle = load_bundle(folder)
    n = len(cfg.data.schema.sparse)
    ok = [torch.tensor([1, 2]) for _ in range(n)], [torch.tensor([1, 1]) for _ in range(n)]
    assert bundle.predict_tensors(torch.zeros(2, 3), *ok).shape == (2,)
    with pytest.raises(InputError, match=r"dense must be a \[B, 3\]"):
        bundle.predict_tensors(torch.zeros(2, 4), *ok)
    with pytest.raises(InputError, match="lengths"):
        bundle.predict_tensors(torch.zeros(2, 3), ok[0], [torch.tensor([1, 2])] * n)
    with pytest.raises(InputError, match="1-D int64"):
        bundle.predict_tensors(torch.zeros(2, 3), [torch.tensor([1.0, 2.0])] * n, ok[1])


# ---- deltas ---------------------------------------------------------------------------------------

def test_a_delta_makes_a_new_bundle_and_leaves_the_old_one(trained):
    cfg, _, folder = trained
    bundle = load_bundle(folder)
    s, width = cfg.data.schema, bundle._lookups[0].rows.width  # the stored width (a projection's input)
    lookup = bundle.manifest["tables"][0]["lookup"]
    row = {**{f: 1.0 for f in s.dense}, **{f: 77 for f in s.sparse}}
    before = bundle.predict([row])
    key = 77 % bundle.manifest["tables"][0]["rows"] if lookup == "modulo" else 77
    if lookup == "composed":  # ids are stored row numbers: the row (the quotient row under qr) ID 77 reads
        composed = getattr(bundle._lookups[0], "inner", bundle._lookups[0])  # under any projection
        r = int(composed.row_numbers(torch.tensor([77]))[0])
        key = r if composed.op == "single" else r // composed._c
    if lookup == "multihash":  # ids are shared row numbers: the first of ID 77's rows
        key = int(bundle._lookups[0].slots(torch.tensor([77]))[0, 0])
    delta = {"base_version": bundle.version, "version": "v2",
             "tables": {"C1": {"ids": [key], "rows": [[0.5] * width]}}}
    updated = bundle.apply_delta(delta)
    assert isinstance(updated, Bundle) and updated.version == "v2" and bundle.version == folder.name
    assert updated.predict([row]) != before and bundle.predict([row]) == before
    with pytest.raises(DeltaConflict, match="base version 'v2'"):
        bundle.apply_delta({**delta, "base_version": "v2", "version": "v3"})
    if lookup == "keyed":  # deleting the new ID brings the default back
        back = updated.apply_delta({"base_version": "v2", "version": "v3", "tables": {"C1": {"deleted": [77]}}})
        assert back.predict([row]) == pytest.approx(before, abs=1e-6)
    name, value = next(iter(bundle._dense.state_dict().items()))
    dense = bundle.apply_delta({"base_version": bundle.version, "version": "v2b",
                                "dense": {name: torch.zeros_like(value).tolist()}})
    assert dense.predict([row]) != before and bundle.predict([row]) == before


def test_malformed_deltas_are_refused_and_change_nothing(trained):
    cfg, _, folder = trained
    bundle = load_bundle(folder)
    width = bundle._lookups[0].rows.width  # the stored width (a projection's input)
    base = {"base_version": bundle.version, "version": "v2"}
    name, value = next(iter(bundle._dense.state_dict().items()))
    cases = [
        ({**base, "tables": {"C9": {"ids": [1], "rows": [[0.0] * width]}}}, "unknown feature 'C9'"),
        ({**base, "tables": {"C1": {"ids": [1], "rows": [[0.0] * (width + 1)]}}}, "tables.C1.rows must be"),
        ({**base, "tables": {"C1": {"ids": [1], "rows": [[math.nan] * width]}}}, "not finite"),
        ({**base, "tables": {"C1": {"ids": [1, 1], "rows": [[0.0] * width] * 2}}}, "given twice"),
        ({**base, "tables": {"C1": {"ids": ["a"], "rows": [[0.0] * width]}}}, "list of integers"),
        ({**base, "tables": {"C1": {"ids": [1], "rows": [[0.0] * width], "deleted": [1]}}}, "both updated and deleted"),
        ({**base, "tables": {"C1": {"ids": [1], "rows": [[0.0] * width], "extra": 1}}}, "must be an object"),
        ({**base, "dense": {"nope": [1.0]}}, "unknown parameter 'nope'"),
        ({**base, "dense": {name: [1.0]}}, "shape"),
        ({**base, "junk": 1}, "unknown key 'junk'"),
        ({"version": "v2"}, "base_version and version must be"),
        ([1], "a delta is an object"),
    ]
    if bundle.manifest["tables"][0]["lookup"] == "modulo":
        cases.append(({**base, "tables": {"C1": {"ids": [10**6], "rows": [[0.0] * width]}}}, r"row numbers in \[0,"))
        cases.append(({**base, "tables": {"C1": {"deleted": [1]}}}, "no IDs to delete"))
    row = {**{f: 1.0 for f in cfg.data.schema.dense}, **{f: 1 for f in cfg.data.schema.sparse}}
    before = bundle.predict([row])
    for delta, message in cases:
        with pytest.raises(InputError, match=message):
            bundle.apply_delta(delta)
    assert bundle.predict([row]) == before and bundle.version == folder.name


# ---- the command ----------------------------------------------------------------------------------

def test_export_command_from_checkpoint_run_and_config(tiny_root, tmp_path, capsys):
    overrides = tiny_overrides(tiny_root, tmp_path, "ray.enabled=false", "train.max_steps=6")
    assert main(["train", *overrides]) == 0
    run_id = load_latest(tmp_path / "runs" / "checkpoints")[0]["run_id"]
    capsys.readouterr()
    assert main(["export", "--out", str(tmp_path / "b"), "--format", "int8", *overrides]) == 0
    printed = capsys.readouterr().out.split()
    folder = Path(printed[0])
    assert folder.parent == tmp_path / "b" and int(printed[1].replace(",", "")) > 0
    assert load_bundle(folder).manifest["training_run"] == run_id
    checkpoint = sorted((tmp_path / "runs" / "checkpoints").glob("step-*.pt"))[-1]
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "b"), "--format", "int8",
                 *overrides]) == 0
    assert Path(capsys.readouterr().out.split()[0]) == folder  # same content, same version
    assert main(["export", "--run", run_id, "--out", str(tmp_path / "r"),
                 f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]) == 0
    assert load_bundle(Path(capsys.readouterr().out.split()[0])).manifest["training_run"] == run_id
    assert main(["export", "--run", "nope", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]) == 2
    assert "MLflow run nope" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "none"), *overrides]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
