"""``recmem export``: a trained model (a checkpoint, an MLflow run, or the configured job's latest
checkpoint) -> a versioned serving bundle.

A single-process checkpoint is loaded into the model here. A Ray run's checkpoint holds one shard per
worker: it is gathered on Ray by as many export workers as wrote it (``distributed.py``), as
``recmem evaluate`` does, and rank 0 writes the bundle.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from recmem.config import Config, ConfigError, TableConfig, load_config

EXPORTS = "exports"
"""Default folder of bundles, under the workdir."""


def feature_kinds(tables: list[TableConfig], sparse: list[str]) -> list[str]:
    """The table kind of each sparse feature, in schema order (blocks assign features as
    ``recmem.tables.build_tables`` does)."""
    claimed = {f for c in tables for f in c.feature_names}
    kind: dict[str, str] = {}
    for block in tables:
        for f in block.feature_names or [f for f in sparse if f not in claimed and f not in kind]:
            kind.setdefault(f, block.kind)
    return [kind[f] for f in sparse]


def bundle_info(cfg: Config, state: dict[str, Any], checkpoint: str, sharding: str | None = None) -> dict[str, Any]:
    """The manifest's provenance for a checkpoint ``state`` of ``cfg``'s model."""
    return {"step": int(state.get("step", 0)), "training_run": state.get("run_id"), "checkpoint": checkpoint,
            "last_data_time": last_data_time(state.get("model", {}), cfg),
            "sparse_strings": "hex" if cfg.data.raw.hex_ids else "hash", "arch": cfg.model.arch,
            "sharding": sharding}


def last_data_time(model_state: dict[str, Any], cfg: Config) -> int | None:
    """The latest data time the model saw: its tables' clock (collisionless tables keep one) when
    they have one, else the latest event time of the training split (None if it has none)."""
    clocks = [v["now"] for k, v in model_state.items() if k.endswith("_extra_state") and isinstance(v, dict)
              and isinstance(v.get("now"), int)]
    if clocks:
        return max(clocks)
    return split_max_time(cfg)


def split_max_time(cfg: Config) -> int | None:
    """Max of the training split's event-time column from Parquet statistics (no data read)."""
    import pyarrow.parquet as pq

    from recmem.data.layout import split_files

    column = cfg.data.schema.event_time
    if not column:
        return None
    try:
        fs, files = split_files(cfg.data.root, "train")
    except (FileNotFoundError, OSError):
        return None
    best = None
    for path in files:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        names = [meta.schema.column(i).name for i in range(meta.num_columns)]
        if column not in names:
            return None
        j = names.index(column)
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(j).statistics
            if stats is not None and stats.has_min_max:
                best = int(stats.max) if best is None else max(best, int(stats.max))
    return best


def schema_dict(cfg: Config) -> dict[str, Any]:
    """The schema fields a bundle records."""
    s = cfg.data.schema
    return {"label": s.label, "dense": list(s.dense), "sparse": list(s.sparse)}


def export_model(model: Any, cfg: Config, out: str | Path, fmt: str, info: dict[str, Any]) -> Path:
    """Write the bundle of a loaded single-process ``model`` (a ``CTRModel``) and check it against
    the model on the first validation rows (``check.py``)."""
    import torch

    from recmem.export.check import check_bundle, probe_batch
    from recmem.export.writer import write_bundle

    model.eval()
    forms = model.tables.to_serving()
    kinds = feature_kinds(cfg.model.tables, list(cfg.data.schema.sparse))
    folder = write_bundle(out, forms, kinds, model.dense, schema_dict(cfg), fmt, info)
    probe = probe_batch(cfg)
    if probe is not None:
        with torch.no_grad():
            check_bundle(folder, probe, model(probe), list(cfg.data.schema.sparse))
    return folder


def export_checkpoint_file(cfg: Config, path: str | Path, out: str | Path, fmt: str) -> Path:
    """Bundle of a verified single-process checkpoint: a ``step-*.pt`` file, or the newest one
    that verifies in a checkpoint folder.

    Raises:
        FileNotFoundError: no checkpoint there.
        ValueError: the checkpoint does not verify (size, SHA-256, plain tensors) or fit the model.
    """
    from recmem.train.checkpoint import file_sha256, load_latest, read_record, safe_load, verify
    from recmem.train.loop import build_job_model

    path = Path(path)
    if path.is_dir():
        found = load_latest(path)
        if found is None:
            raise FileNotFoundError(f"{path}: no verified checkpoint (step-*.pt with its record) to export")
        state, path = found
    elif path.is_file():
        try:
            verify(read_record(path), path.stat().st_size, file_sha256(path))
            state = safe_load(path)
        except ValueError as e:
            raise ValueError(f"checkpoint {path}: {e}") from None
    else:
        raise FileNotFoundError(f"{path}: no such checkpoint file or folder")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device="cpu", precision="fp32"))
    model = build_job_model(cfg)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise ValueError(f"checkpoint {path} does not fit the configured model "
                         f"({str(e).strip().splitlines()[0][:300]}); export it with the config that trained it") from None
    return export_model(model, cfg, out, fmt, bundle_info(cfg, state, str(path)))


def export_job(cfg: Config, out: str | Path | None, fmt: str, checkpoint: str | None = None) -> Path:
    """Bundle of ``cfg``'s job: ``checkpoint`` (a file or folder, single-process or Ray) when given,
    else the latest checkpoint of the Ray run ``ray.run_name`` (``ray.enabled``) or of
    ``train.checkpoint_dir``."""
    from recmem.export.distributed import export_ray, is_ray_checkpoint

    out = Path(out) if out else Path(cfg.workdir) / EXPORTS
    if checkpoint is not None:
        if is_ray_checkpoint(checkpoint):
            return export_ray(cfg, out, fmt, folder=checkpoint)
        return export_checkpoint_file(cfg, checkpoint, out, fmt)
    if cfg.ray.enabled:
        return export_ray(cfg, out, fmt)
    return export_checkpoint_file(cfg, Path(cfg.workdir) / cfg.train.checkpoint_dir, out, fmt)


def run_config(run_id: str, tracking_uri: str, overrides: list[str] = ()) -> Config:
    """The config an MLflow run trained with (its ``config.yaml`` artifact), with ``overrides``.

    Raises:
        ValueError: the run does not exist or has no config artifact.
    """
    import tempfile

    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    try:
        client.get_run(run_id)
        with tempfile.TemporaryDirectory(prefix="recmem-export-") as tmp:
            local = client.download_artifacts(run_id, "config.yaml", tmp)
            return load_config(local, list(overrides))
    except mlflow.exceptions.MlflowException as e:
        raise ValueError(f"MLflow run {run_id} at {tracking_uri}: {str(e).splitlines()[0][:300]}") from None
    except (OSError, ConfigError) as e:
        raise ValueError(f"MLflow run {run_id}: its config.yaml does not load ({e})") from None


def export_run(run_id: str, tracking_uri: str, out: str | Path | None, fmt: str, overrides: list[str] = ()) -> Path:
    """Bundle of the MLflow run ``run_id``: its config from the run, its newest checkpoint found as
    the run left it: the Ray run folder whose ``recmem_run.json`` names it, or the single-process
    checkpoint folder whose newest checkpoint records it.

    Raises:
        FileNotFoundError: no checkpoint of this run is left.
    """
    from recmem.export.distributed import export_ray, ray_run_of
    from recmem.train.checkpoint import load_latest

    cfg = run_config(run_id, tracking_uri, overrides)
    out = Path(out) if out else Path(cfg.workdir) / EXPORTS
    if cfg.ray.enabled:
        name = ray_run_of(cfg, run_id)
        if name is None:
            raise FileNotFoundError(f"MLflow run {run_id}: no Ray run under the run's storage path names it "
                                    "(recmem_run.json); were its checkpoints moved or deleted?")
        return export_ray(dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, run_name=name)), out, fmt)
    folder = Path(cfg.workdir) / cfg.train.checkpoint_dir
    found = load_latest(folder)
    if found is None or found[0].get("run_id") != run_id:
        other = "" if found is None else f" (its newest checkpoint belongs to run {found[0].get('run_id')})"
        raise FileNotFoundError(f"MLflow run {run_id}: no checkpoint of it in {folder}{other}")
    return export_checkpoint_file(cfg, found[1], out, fmt)
