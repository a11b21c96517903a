"""Export a Ray run: one export worker per rank that wrote the checkpoint, gathered into one bundle.

Each worker builds its part of the model under the run's sharding plan and loads its shard, exactly as
``recmem evaluate`` does; then every rank hands rank 0 its pieces of the tables::

    ID-sharded collisionless shard   -> its live IDs and rows (the shard's own ``to_serving``)
    ID-sharded row-keyed shard       -> its global rows r, r + W, ... of each feature
    (``hash``-like, or ``ssd``: read from its disk)
    TorchRec DMP part (table-, row-  -> its (first row, first column, block) of each feature
    or column-wise)

Rank 0 merges the ID pieces (owners never share an ID) and writes the row pieces into the unsharded
tables' rows (the ``RowKeys`` contract: a row-keyed kind stores them as ``FusedRowwiseAdagrad`` in
``.rows``), takes the serving forms, and writes the bundle with the dense part (the same on every
rank, DDP) into ``<ray.storage_path>/<run>-export-<time>/``, where the driver, which may be on
another node, copies it out and removes it. The driver imports neither torch nor torchrec.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.fs

from recmem.config import Config, model_embedding_dim
from recmem.train.distributed.store import META, complete_checkpoints, latest_checkpoint


def is_ray_checkpoint(path: str | Path) -> bool:
    """True for a Ray checkpoint folder (``meta.json`` and rank shards) or a Ray run folder."""
    p = Path(path)
    return p.is_dir() and ((p / META).is_file() or any(c.name.startswith("checkpoint_") for c in p.iterdir()))


def ray_run_of(cfg: Config, run_id: str) -> str | None:
    """The Ray run under ``cfg``'s storage path whose ``recmem_run.json`` names the MLflow run
    ``run_id`` and that has a complete checkpoint (the newest such, by name)."""
    from recmem.train.distributed.launcher import _RUN_FILE, _storage_path, resolve_paths

    storage = _storage_path(resolve_paths(cfg))
    fs, base = pyarrow.fs.FileSystem.from_uri(storage)
    found = []
    for info in fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True)):
        record = f"{info.path}/{_RUN_FILE}"
        if info.type != pyarrow.fs.FileType.Directory or fs.get_file_info(record).type != pyarrow.fs.FileType.File:
            continue
        with fs.open_input_stream(record) as f:
            try:
                named = json.loads(f.read()).get("mlflow_run_id")
            except ValueError:
                continue
        if named == run_id and latest_checkpoint(storage, info.base_name) is not None:
            found.append(info.base_name)
    return max(found) if found else None


def export_ray(cfg: Config, out: Path, fmt: str, folder: str | Path | None = None) -> Path:
    """Gather the newest complete checkpoint of the Ray run ``ray.run_name`` (or the checkpoint or run
    ``folder``) into a bundle under ``out``; returns its folder.

    Starts as many workers as wrote the checkpoint, with ``ray.sharding`` as configured (it must be
    the plan the checkpoint was written with).

    Raises:
        FileNotFoundError: no complete checkpoint there.
        ValueError: the checkpoint's plan is not this config's.
    """
    import ray

    from recmem.train.distributed.group import run_workers
    from recmem.train.distributed.launcher import (
        _check_fits, _init_ray, _no_checkpoint_message, _run_folder, _storage_path, resolve_paths,
    )

    cfg = resolve_paths(cfg)
    storage = _storage_path(cfg)
    if folder is not None:
        fs, exact, run = _local_checkpoint(Path(folder))
        name = posixpath.basename(run)
    else:
        found = latest_checkpoint(storage, cfg.ray.run_name)
        if found is None:
            raise FileNotFoundError(_no_checkpoint_message(storage, cfg.ray.run_name))
        fs, exact, _ = found
        run, name = posixpath.dirname(exact.rstrip("/")), cfg.ray.run_name
    meta = dict(complete_checkpoints(fs, run))[exact]
    workers = meta["world_size"]
    # fp32 on the CPU: the bundle's dense part runs so, and the export check compares like with like.
    cfg = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, num_workers=workers),
                              train=dataclasses.replace(cfg.train, device="cpu", precision="fp32"))
    staging = _run_folder(storage, f"{name}-export-{time.strftime('%Y%m%d-%H%M%S')}")
    payload = {"config": cfg, "fs": fs, "folder": exact, "format": fmt, "out": staging}
    started = _init_ray(cfg)
    try:
        _check_fits(cfg, started)
        return _copy_out(staging[0], run_workers(cfg, export_worker, payload, retries=0), out)
    finally:
        if started:
            ray.shutdown()
        if staging[0].get_file_info(staging[1]).type != pyarrow.fs.FileType.NotFound:
            staging[0].delete_dir(staging[1])


def _local_checkpoint(folder: Path) -> tuple[pyarrow.fs.FileSystem, str, str]:
    """(filesystem, checkpoint folder, run folder) of a checkpoint or run folder given by path."""
    fs = pyarrow.fs.LocalFileSystem()
    folder = folder.resolve()
    if (folder / META).is_file():
        run = str(folder.parent)
        if str(folder) not in dict(complete_checkpoints(fs, run)):
            raise FileNotFoundError(f"{folder}: an incomplete Ray checkpoint (a rank's shard is missing)")
        return fs, str(folder), run
    found = complete_checkpoints(fs, str(folder))
    if not found:
        raise FileNotFoundError(f"{folder}: no complete Ray checkpoint in this run folder")
    return fs, found[0][0], str(folder)


def _copy_out(fs: pyarrow.fs.FileSystem, bundle: str, out: Path) -> Path:
    """Copy the bundle folder rank 0 wrote (``bundle`` on ``fs``) into ``out``; its path there."""
    version = posixpath.basename(bundle.rstrip("/"))
    final = Path(out) / version
    if final.exists():
        return final
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(out) / f".copy-{version}"
    pyarrow.fs.copy_files(bundle, str(tmp), source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem())
    tmp.rename(final)
    return final


def export_worker(payload: dict[str, Any]) -> str | None:
    """``recmem export`` on a worker (see the module docstring).

    Args:
        payload: ``{"config": Config, "fs": pyarrow FileSystem, "folder": checkpoint folder,
            "format": row format, "out": (pyarrow FileSystem, folder)}``; the driver started as many
            workers as wrote the checkpoint.

    Returns:
        On rank 0, the bundle's folder under ``out`` (on its filesystem); None on the others.
    """
    import torch
    import torch.distributed as dist

    from recmem.export.check import check_bundle, probe_batch
    from recmem.train.distributed.store import RayCheckpoints
    from recmem.train.distributed.worker import _quiet_libraries, _worker_model

    cfg = payload["config"]
    _quiet_libraries(cfg)
    rank, world_size, model, plan = _worker_model(cfg)
    store = RayCheckpoints(rank, world_size, plan)
    store._check_meta(payload["fs"], payload["folder"])
    state = store._read_shard(payload["fs"], payload["folder"])
    model.load_state_dict(state["model"])
    model.eval()
    probe = probe_batch(cfg)  # the same rows on every rank: the sharded forward is collective
    with torch.no_grad():
        expected = model(probe) if probe is not None else None
    pieces = rank_pieces(model, rank, world_size)
    gathered: list[Any] = [None] * world_size if rank == 0 else None
    if world_size > 1:
        dist.gather_object(pieces, gathered, dst=0, group=dist.new_group(backend="gloo"))
    else:
        gathered = [pieces]
    if rank > 0:
        return None
    from recmem.export.job import bundle_info, feature_kinds, schema_dict
    from recmem.export.writer import write_bundle

    forms = merged_forms(cfg, gathered)
    info = bundle_info(cfg, state, payload["folder"], sharding=plan.get("sharding"))
    kinds = feature_kinds(cfg.model.tables, list(cfg.data.schema.sparse))
    fs, staging = payload["out"]
    with tempfile.TemporaryDirectory(prefix="recmem-export-") as folder:
        written = write_bundle(folder, forms, kinds, model.dense, schema_dict(cfg), payload["format"], info)
        if probe is not None:
            check_bundle(written, probe, expected, list(cfg.data.schema.sparse))
        bundle = f"{staging}/{Path(written).name}"
        fs.create_dir(staging, recursive=True)
        pyarrow.fs.copy_files(str(written), bundle, source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=fs)
    return bundle


def rank_pieces(model: Any, rank: int, world_size: int) -> dict[str, tuple[str, Any]]:
    """This rank's pieces of every feature's table: ``("form", ServingForm)`` (a whole table, rank 0's
    replica, or an ID shard's IDs) or ``("rows", [(global rows [k], first column, block [k, d]), ...])``."""
    import torch

    from recmem.tables.replicated import ReplicatedTable
    from recmem.tables.sharded import RowShard, ShardedTable
    from recmem.tables.ssd import SSDTable
    from recmem.train.distributed.dmp import DmpTables

    out: dict[str, tuple[str, Any]] = {}
    for table in model.tables.tables:
        if isinstance(table, ReplicatedTable) and rank > 0:
            continue  # every replica holds the same table: rank 0's is the one
        if isinstance(table, DmpTables):
            for f, parts in table._local_parts().items():
                out[f] = ("rows", [(torch.arange(r0, r0 + p.shape[0]), c0, p.detach().clone()) for r0, c0, p in parts])
        elif isinstance(table, ShardedTable) and isinstance(table.shard, RowShard):
            shard = table.shard
            for t, f in enumerate(table.feature_names):
                mine = torch.arange(rank, shard.global_rows[t], world_size)
                out[f] = ("rows", [(mine, 0, shard.rows.weights(t)[: len(mine)].detach().clone())])
        elif isinstance(table, ShardedTable) and isinstance(table.shard, SSDTable):
            shard = table.shard
            for f, form in zip(table.feature_names, shard.to_serving()):  # its rows k = rank mod W, in order
                out[f] = ("rows", [(torch.arange(rank, shard.num_embeddings, world_size), 0, form.tensors["rows"])])
        else:  # a whole table (one worker) or an ID shard: its own serving form
            part = table.shard if isinstance(table, ShardedTable) else table
            out.update({f: ("form", form) for f, form in zip(table.feature_names, part.to_serving())})
    return out


def merged_forms(cfg: Config, gathered: list[dict[str, tuple[str, Any]]]) -> list[Any]:
    """Every feature's serving form, schema order, from all ranks' :func:`rank_pieces`."""
    import torch

    from recmem.tables import build_tables
    from recmem.tables.base import ServingForm

    sparse = list(cfg.data.schema.sparse)
    needs_rows = any(kind == "rows" for pieces in gathered for kind, _ in pieces.values())
    width = model_embedding_dim(cfg.model)

    def in_ram(kind: type, block: Any, names: list[str], seed: int, root: Path, where: str) -> Any:
        # An ssd block's rows go into its RAM twin, hash (the same rows, id mod n): a bundle holds
        # every row anyway, and building the ssd table here would make a row file on disk.
        if block.kind == "ssd":
            from recmem.tables.hash import HashTable

            return HashTable(names, block.num_embeddings, block.embedding_dim, block.learning_rate, seed)
        return kind.from_config(block, names, seed, root, where, output_dim=width)

    whole = build_tables(cfg.model.tables, sparse, Path(cfg.data.root), cfg.seed, make=in_ram,
                         output_dim=width) if needs_rows else None
    forms = []
    for f in sparse:
        kinds = {pieces[f][0] for pieces in gathered if f in pieces}
        if kinds == {"rows"}:
            table, t = _owner(whole, f)
            weights = table.rows.weights(t)  # [n, D] of the unsharded table
            with torch.no_grad():
                for pieces in gathered:
                    for rows, col0, block in pieces.get(f, ("rows", []))[1]:
                        weights[rows, col0 : col0 + block.shape[1]] = block
            forms.append(table.to_serving()[t])
        elif kinds == {"form"}:
            parts = [pieces[f][1] for pieces in gathered if f in pieces]
            forms.append(parts[0] if len(parts) == 1 else _merge_keyed(parts))
        else:
            raise RuntimeError(f"feature {f}: pieces of kinds {sorted(kinds)} from the workers")
    return [ServingForm(*form) for form in forms]


def _owner(tables: Any, feature: str) -> tuple[Any, int]:
    for table in tables.tables:
        if feature in table.feature_names:
            return table, table.feature_names.index(feature)
    raise KeyError(feature)


def _merge_keyed(parts: list[Any]) -> Any:
    """One keyed serving form from ID shards' forms (their keys are disjoint)."""
    import torch

    from recmem.tables.base import ServingForm

    if any(p.lookup != "keyed" for p in parts):
        raise RuntimeError("only keyed serving forms come from ID shards")
    keys = torch.cat([p.tensors["keys"] for p in parts])
    rows = torch.cat([p.tensors["rows"] for p in parts])
    order = torch.argsort(keys)
    return ServingForm("keyed", {"keys": keys[order], "rows": rows[order], "default": parts[0].tensors["default"]})
