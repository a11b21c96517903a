"""MLflow Model Registry: serving bundles logged as pyfunc models, registered, promoted by alias, fetched.

A bundle (``recmem/serving/bundle.py``) is logged as an MLflow pyfunc model whose artifacts hold the
bundle directory under the key ``"bundle"``, so a downloaded model version reads::

    <model dir>/MLmodel                signature (raw feature columns -> click probability) and flavor
    <model dir>/input_example.json     the first validation rows, raw (dense as a client sends them)
    <model dir>/pyfunc_model.py        the model-from-code file MLflow runs to load it (nothing pickled)
    <model dir>/artifacts/bundle/      the bundle, exactly as ``recmem export`` wrote it

Loaded with ``mlflow.pyfunc.load_model("models:/NAME@ALIAS")``, the model's ``predict`` takes a pandas
DataFrame (one column per schema field) or a list of row dicts and returns the bundle's click
probabilities (float64 [B]). Values are those of :meth:`recmem.serving.Bundle.predict`: dense numbers
(NaN or None: missing), sparse int64 IDs, hex or hashed strings, or lists of them (bags). A missing
sparse value is ``""``: MLflow's signature enforcement rebuilds each column, and integer IDs with a
None among them become floats, which the model refuses by column (a float cannot hold every int64
ID). Loading needs recmem importable (the pyfunc model is recmem's class).

The model is logged into the MLflow run that trained it (reopened for the purpose and left in the
status it had), or, for a bundle whose run is not in this store, into a run of its own. Each model
version carries the tags ``recmem.bundle_version``, ``recmem.training_run``, ``recmem.version`` and
``recmem.valid_auc`` (the training run's last ``valid/auc``; ``unknown`` without one).

A server follows an alias with :func:`alias_version` (one cheap call) and :func:`fetch` (download the
version it names); a name or alias that does not exist is a :class:`RegistryError` naming both and the
aliases the model has. Everything works the same on a local store (SQLite) and a tracking server.

Commands: ``recmem register``, ``recmem promote``, ``recmem models`` (``recmem/cli.py``), and
``train.register_as`` for ``recmem train``.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import recmem
from recmem.config import MODEL_NAME

BUNDLE_KEY = "bundle"
"""The pyfunc artifact key of the bundle directory: ``<model dir>/artifacts/bundle/``."""
TAG_PREFIX = "recmem."
_ALIAS = re.compile(r"[A-Za-z0-9_\-]{1,255}")
_MODEL_CODE = Path(__file__).resolve().parent / "tracking" / "pyfunc_model.py"


class RegistryError(ValueError):
    """A registered model, version or alias that does not exist or cannot be used; the message names it."""


def registry_client(tracking_uri: str | None = None) -> Any:
    """An ``MlflowClient`` on ``tracking_uri`` (default: ``MLFLOW_TRACKING_URI``, else ./mlflow.db), with
    the registry there too unless ``MLFLOW_REGISTRY_URI`` says otherwise. A tracking server that does
    not answer fails here, in seconds.

    Raises:
        TrackingUnavailable: the tracking server does not answer.
    """
    import mlflow

    from recmem.tracking.logger import default_tracking_uri
    from recmem.tracking.outbox import bound_http_retries, check_server, is_server

    uri = tracking_uri or default_tracking_uri(".")
    if is_server(uri):
        bound_http_retries()
        check_server(uri)
    return mlflow.MlflowClient(uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)


def check_name(name: Any) -> str:
    """``name`` if it can name a registered model (letters, digits, ``_.- ``; no ``/``, which would
    break ``models:/`` URIs)."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise RegistryError(f"model name {str(name)[:80]!r}: use letters, digits, '_', '-', '.' or spaces "
                            "(at most 256, starting with a letter or digit)")
    return name


def check_alias(alias: Any) -> str:
    """``alias`` if MLflow allows it as an alias (letters, digits, ``_-``; not ``latest`` or ``v<N>``)."""
    if not isinstance(alias, str) or not _ALIAS.fullmatch(alias) or alias.lower() == "latest" \
            or re.fullmatch(r"[vV]\d+", alias):
        raise RegistryError(f"alias {str(alias)[:80]!r}: use letters, digits, '_' or '-' "
                            "(not 'latest' nor v<number>)")
    return alias


def check_version(version: Any) -> str:
    """``version`` as a string of digits (MLflow's model version numbers)."""
    text = str(version).strip()
    if not re.fullmatch(r"[1-9]\d{0,17}", text):
        raise RegistryError(f"model version {text[:40]!r}: a version number (1, 2, ...)")
    return text


@contextlib.contextmanager
def _found(client: Any, name: str, alias: str | None = None, version: str | None = None) -> Iterator[None]:
    """Turn MLflow's not-found errors in the block into a :class:`RegistryError` naming what exists;
    other MLflow errors (a store that fails) into ``TrackingUnavailable``."""
    import mlflow

    from recmem.tracking.outbox import TrackingUnavailable, short_reason

    try:
        yield
    except mlflow.exceptions.MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise TrackingUnavailable(f"MLflow registry at {client._registry_uri}: {short_reason(e)}") from None
        raise RegistryError(_missing(client, name, alias, version)) from None


def _missing(client: Any, name: str, alias: str | None, version: str | None) -> str:
    import mlflow

    where = client._registry_uri
    try:
        model = client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        known = sorted(m.name for m in client.search_registered_models(max_results=20))
        return (f"registered model {name!r} does not exist in {where} "
                f"(models there: {', '.join(map(repr, known)) or 'none'})")
    aliases = ", ".join(f"{a} -> {v}" for a, v in sorted(model.aliases.items())) or "none"
    if alias is not None:
        return f"registered model {name!r} has no alias {alias!r} (its aliases: {aliases})"
    return f"registered model {name!r} has no version {version} (its aliases: {aliases})"


def alias_version(name: str, alias: str, tracking_uri: str | None = None) -> str:
    """The version number (a string) that ``name@alias`` points to now: one registry call, for polling.

    Raises:
        RegistryError: the model or the alias does not exist (the message names both and the
            model's aliases).
        TrackingUnavailable: the tracking server does not answer.
    """
    check_name(name), check_alias(alias)
    client = registry_client(tracking_uri)
    with _found(client, name, alias=alias):
        return str(client.get_model_version_by_alias(name, alias).version)


def fetch(name: str, alias: str, dest: str | Path, tracking_uri: str | None = None) -> tuple[str, Path]:
    """Download the model version ``name@alias`` points to into ``dest/<name>-v<version>/``.

    A version is downloaded once: a folder already there is kept (registry versions never change;
    ``load_bundle`` verifies every file's SHA-256 anyway). The download goes to a temporary folder
    renamed into place, so a reader never sees half a model.

    Returns:
        (the version number as a string, the local bundle directory
        ``dest/<name>-v<version>/artifacts/bundle``).

    Raises:
        RegistryError: the model or alias does not exist, or the version holds no recmem bundle.
        TrackingUnavailable: the tracking server does not answer.
    """
    import mlflow

    check_name(name), check_alias(alias)
    client = registry_client(tracking_uri)
    with _found(client, name, alias=alias):
        version = str(client.get_model_version_by_alias(name, alias).version)
        source = client.get_model_version_download_uri(name, version)
    dest = Path(dest)
    final = dest / f"{_safe(name)}-v{version}"
    if not (final / "artifacts" / BUNDLE_KEY / "manifest.json").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dest))
        try:
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per download
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp),
                                                             tracking_uri=client._tracking_client.tracking_uri))
            if not (local / "artifacts" / BUNDLE_KEY / "manifest.json").is_file():
                raise RegistryError(f"model {name!r} version {version} holds no recmem bundle "
                                    f"(no artifacts/{BUNDLE_KEY}/manifest.json in {source})")
            if final.exists():  # a partial folder from an older recmem, or a foreign one
                shutil.rmtree(final)
            os.replace(local, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return version, final / "artifacts" / BUNDLE_KEY


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


def raw_rows(cfg: Any, rows: int = 5) -> list[dict[str, Any]] | None:
    """The first ``rows`` validation rows of ``cfg``'s data as a client sends them (dense values before
    ``log(1 + x)``, sparse values as the stored int64 IDs), or None without a validation split."""
    import torch

    from recmem.export.check import probe_batch

    batch = probe_batch(cfg, rows)
    if batch is None or len(batch) == 0:
        return None
    s, kjt = cfg.data.schema, batch.sparse_features
    dense = torch.expm1(batch.dense_features.double()).tolist()
    out = []
    for i in range(len(batch)):
        row: dict[str, Any] = dict(zip(s.dense, dense[i]))
        for f in s.sparse:
            ids = kjt[f].values()[kjt[f].offsets()[i]:kjt[f].offsets()[i + 1]].tolist()
            row[f] = ids[0] if len(ids) == 1 else None if not ids else ids
        out.append(row)
    return out


def _fallback_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """An input example when no data is at hand: every dense value 1, every sparse ID 0."""
    schema = manifest["schema"]
    return [{**{f: 1.0 for f in schema["dense"]}, **{f: 0 for f in schema["sparse"]}}]


@contextlib.contextmanager
def _in_run(client: Any, run_id: str | None, experiment: str, artifact_root: str | None) -> Iterator[str]:
    """MLflow's fluent API pointed at ``client``'s store with the run ``run_id`` active (reopened and
    left in the status it had), or a new run in ``experiment`` when ``run_id`` is None; yields its id.
    The process's tracking URI and active run are as before afterwards."""
    import mlflow

    before = mlflow.get_tracking_uri() if mlflow.tracking._tracking_service.utils.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(client._tracking_client.tracking_uri)
    nested = mlflow.active_run() is not None
    try:
        if run_id is not None:
            status = client.get_run(run_id).info.status
            experiment_id = None
        else:
            status = "FINISHED"
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(
                experiment, artifact_location=artifact_root)
        run = mlflow.start_run(run_id=run_id, experiment_id=experiment_id, nested=nested,
                               run_name=None if run_id else "recmem register")
        try:
            yield run.info.run_id
        finally:
            mlflow.end_run(status if status in ("FINISHED", "FAILED", "KILLED") else "FINISHED")
    finally:
        if before is None:
            mlflow.tracking._tracking_service.utils._tracking_uri = None
        else:
            mlflow.set_tracking_uri(before)


def register_bundle(folder: str | Path, name: str, tracking_uri: str | None = None,
                    example: list[dict[str, Any]] | None = None, experiment: str = "recmem",
                    artifact_root: str | None = None) -> str:
    """Log the bundle in ``folder`` as a pyfunc model and register it as a new version of ``name``.

    Args:
        folder: a bundle directory (``recmem export``'s ``<out>/<version>/``); it is verified first.
        name: the registered model (created on first use).
        tracking_uri: the store (default: ``MLFLOW_TRACKING_URI``, else ./mlflow.db).
        example: raw rows for the input example and the signature (default: one made-up row).
        experiment: where a new run holds the model when the bundle's training run is not in this store.
        artifact_root: that experiment's artifact location if it is created (a SQLite store's default
            would be ./mlruns of the working directory).

    Returns:
        The new version number, as a string.

    Raises:
        recmem.serving.BundleError: the bundle does not verify.
        RegistryError: a bad model name.
        TrackingUnavailable: the tracking server does not answer.
    """
    import mlflow
    import numpy as np
    import pandas as pd
    import torch

    from recmem.serving.bundle import load_bundle

    check_name(name)
    bundle = load_bundle(folder)
    manifest = bundle.manifest
    client = registry_client(tracking_uri)
    run_id, auc = _training_run(client, manifest.get("training_run"))
    rows = example or _fallback_rows(manifest)
    signature = _signature(manifest, np.asarray(bundle.predict(rows), dtype=np.float64))
    tags = {f"{TAG_PREFIX}bundle_version": bundle.version, f"{TAG_PREFIX}training_run": manifest.get("training_run") or "",
            f"{TAG_PREFIX}version": recmem.__version__,
            f"{TAG_PREFIX}valid_auc": "unknown" if auc is None else f"{auc:.6f}"}
    with tempfile.TemporaryDirectory(prefix="recmem-register-") as tmp:
        staged = Path(tmp) / BUNDLE_KEY  # the artifact keeps its folder's name: artifacts/bundle/
        shutil.copytree(folder, staged)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per copied bundle
        with _in_run(client, run_id, experiment, artifact_root), _quiet_mlflow():
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(_MODEL_CODE), artifacts={BUNDLE_KEY: str(staged)},
                signature=signature, input_example=pd.DataFrame(rows), tags=tags,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}",
                                  f"pandas=={pd.__version__}", f"mlflow=={mlflow.__version__}",
                                  f"recmem=={recmem.__version__}"])
            # Still under _in_run's tracking URI: MLflow resolves the models:/ source through the
            # process's URI, which may name another store (e.g. MLFLOW_TRACKING_URI of a Ray driver).
            with _found(client, name):
                try:
                    client.create_registered_model(name, description="recmem serving bundles (recmem/registry.py)")
                except mlflow.exceptions.MlflowException as e:
                    if e.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                version = client.create_model_version(name, source=f"models:/{info.model_id}", run_id=run_id,
                                                      tags=tags, model_id=info.model_id)
    return str(version.version)


def _signature(manifest: dict[str, Any], predictions: Any) -> Any:
    """Dense fields as optional doubles; sparse fields as optional values of any type (an int64 ID, a
    hex or hashed string, null, or a list of those for a bag), checked by the bundle itself."""
    import mlflow
    from mlflow.types.schema import AnyType, ColSpec, Schema

    schema = manifest["schema"]
    inputs = Schema([ColSpec("double", f, required=False) for f in schema["dense"]]
                    + [ColSpec(AnyType(), f, required=False) for f in schema["sparse"]])
    return mlflow.models.ModelSignature(inputs, mlflow.models.infer_signature(None, predictions).outputs)


def _training_run(client: Any, run_id: Any) -> tuple[str | None, float | None]:
    """(``run_id`` if that run is in ``client``'s store, else None; its last ``valid/auc`` or None)."""
    import mlflow

    if not isinstance(run_id, str) or not re.fullmatch(r"[0-9a-f]{32}", run_id):
        return None, None
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None, None
    auc = run.data.metrics.get("valid/auc")
    return run_id, auc if auc is not None and math.isfinite(auc) else None


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """MLflow's notes while logging a model (its environment guesses, 'Successfully registered')."""
    import logging
    import warnings

    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # "Add type hints to predict": recmem's signature is explicit (``_signature``).
            warnings.filterwarnings("ignore", module=r"mlflow(\.|$)")
            yield
    finally:
        logger.setLevel(level)


def set_alias(name: str, alias: str, version: Any, tracking_uri: str | None = None) -> str | None:
    """Point ``name@alias`` at ``version``; returns the version it pointed to before (None: new alias).

    Raises:
        RegistryError: the model or version does not exist, or a bad alias.
    """
    check_name(name), check_alias(alias)
    version = check_version(version)
    client = registry_client(tracking_uri)
    with _found(client, name, version=version):
        model = client.get_registered_model(name)
        client.get_model_version(name, version)
        client.set_registered_model_alias(name, alias, version)
    old = model.aliases.get(alias)
    return None if old is None else str(old)


def describe(name: str, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """The versions of ``name``, newest first: ``{"version", "aliases", "tags", "run_id", "created"}``.

    Raises:
        RegistryError: no such model.
    """
    check_name(name)
    client = registry_client(tracking_uri)
    with _found(client, name):
        model = client.get_registered_model(name)
        versions = client.search_model_versions(f"name = '{name}'")
    aliases: dict[str, list[str]] = {}
    for alias, version in model.aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    return [{"version": str(v.version), "aliases": sorted(aliases.get(str(v.version), [])),
             "tags": {k: t for k, t in v.tags.items() if k.startswith(TAG_PREFIX)}, "run_id": v.run_id,
             "created": v.creation_timestamp}
            for v in sorted(versions, key=lambda v: -int(v.version))]


def register_run(name: str, tracking_uri: str, run_id: str | None = None, bundle: str | Path | None = None,
                 out: str | Path | None = None, fmt: str = "fp32", overrides: list[str] = (),
                 cfg: Any = None) -> tuple[str, Path]:
    """``recmem register``: register ``bundle``, or a bundle exported from the MLflow run ``run_id``'s
    newest checkpoint (``recmem.export.job.export_run``), as a new version of ``name``.

    The input example is the first validation rows of the run's data (``run_id``) or of ``cfg``'s.

    Returns:
        (the new version number, the bundle folder registered).

    Raises:
        ValueError: neither a run nor a bundle, a run or bundle that cannot be used, a bad name.
        FileNotFoundError: no checkpoint of the run is left.
    """
    from recmem.export.job import export_run, run_config

    check_name(name)
    if run_id is None and bundle is None:
        raise RegistryError("give --run RUN_ID (its newest checkpoint is exported) or --bundle PATH")
    if run_id is not None:
        cfg = run_config(run_id, tracking_uri, list(overrides))
    if bundle is None:
        bundle = export_run(run_id, tracking_uri, out, fmt, list(overrides))
    return _register(Path(bundle), name, tracking_uri, cfg), Path(bundle)


def register_trained(cfg: Any, name: str, checkpoint: str | None = None) -> tuple[str, Path]:
    """``train.register_as``: export the newest checkpoint of ``cfg``'s job (or ``checkpoint``, the
    Ray run's final checkpoint, when it is a local folder; a remote one is found by ``ray.run_name``)
    as an fp32 bundle under ``<workdir>/exports`` and register it.

    Returns:
        (the new version number, the bundle folder).
    """
    from recmem.export.job import export_job
    from recmem.tracking.logger import default_tracking_uri

    local = checkpoint if checkpoint and "://" not in checkpoint and Path(checkpoint).is_dir() else None
    folder = export_job(cfg, None, "fp32", local)
    uri = cfg.tracking.tracking_uri or default_tracking_uri(cfg.workdir)
    return _register(folder, name, uri, cfg), folder


def _register(folder: Path, name: str, tracking_uri: str, cfg: Any) -> str:
    """:func:`register_bundle` with the input example and the experiment of ``cfg`` (when given)."""
    if cfg is None:
        return register_bundle(folder, name, tracking_uri)
    root = Path(cfg.workdir).resolve() / "mlruns"  # where RunLogger puts a SQLite store's artifacts
    return register_bundle(folder, name, tracking_uri, raw_rows(cfg), experiment=cfg.tracking.experiment,
                           artifact_root=root.as_uri() if tracking_uri.startswith("sqlite:") else None)
