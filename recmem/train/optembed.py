"""``recmem optembed``: OptEmbed's three phases in one command (``recmem/tables/optembed``).

1. **supernet**: the configured model, its ``optembed`` blocks as supernets, trained by the usual
   loop (checkpoints in ``<train.checkpoint_dir>/supernet``, resumed as ``recmem train`` resumes).
2. **search**: the supernet's final checkpoint scores candidate widths by validation AUC (eval
   mode: each field at the candidate's width, rows pruned by the learned thresholds) in an
   evolutionary search (``recmem/train/evolution.py``) whose knobs are the first ``optembed``
   block's options. Its state is saved after every generation in ``<checkpoint_dir>/search``
   (``state.json``) and a rerun continues from there (more ``iterations`` extend it) unless the
   supernet or the search's other options changed (``key.json``); the outcome is one plan file
   per block (``plan-<i>-<sha256>.pt``: widths, kept IDs, whether the OOV row was kept).
3. **retrain**: the model again from scratch, each ``optembed`` block now the compact table of its
   plan (``options.plan``), trained by the loop (checkpoints in ``<checkpoint_dir>/retrain-<sha256>``,
   one folder per set of plans).

Each phase is an MLflow run nested under one parent run (its id kept in
``<checkpoint_dir>/optembed.json``, so a rerun continues the same runs). The phases run in this
process on one worker (``ray.*`` is not used).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from recmem.config import Config, ConfigError
from recmem.tables.optembed import SupernetTable, compact_bytes, optembed_options
from recmem.train.checkpoint import file_sha256, load_latest
from recmem.train.evolution import SearchSettings, SearchState, evolve
from recmem.train.local import local_source, train_local
from recmem.train.loop import TrainResult, build_job_model, evaluate


@dataclass
class OptEmbedResult:
    """What the three phases produced."""

    supernet: TrainResult
    widths: list[list[int]]
    """The found widths, per ``optembed`` block."""
    search_auc: float
    plans: list[Path]
    retrain: TrainResult
    retrain_checkpoints: str
    """The retrain's ``train.checkpoint_dir``."""
    run: str


def optembed_blocks(cfg: Config) -> list[int]:
    """Indexes of the config's ``optembed`` blocks.

    Raises:
        ConfigError: none, or one that already names a plan (the command writes the plans).
    """
    blocks = [i for i, t in enumerate(cfg.model.tables) if t.kind == "optembed"]
    if not blocks:
        raise ConfigError("model.tables: no block of kind 'optembed' to search")
    for i in blocks:
        if optembed_options(cfg.model.tables[i], f"model.tables.{i}").plan:
            raise ConfigError(f"model.tables.{i}.options.plan: `recmem optembed` writes the plans; leave it empty")
    return blocks


SUPERNET_OPTIONS = ("min_count", "alpha", "threshold_lr", "threshold_init", "sample_widths")
"""The options the supernet is built from: only these reach its config (and so its checkpoints'
resume key), so a changed search knob does not refuse the trained supernet's resume."""


def phase_config(cfg: Config, phase: str, plans: dict[int, Path] | None = None) -> Config:
    """``cfg`` for one phase: its own checkpoint folder and MLflow run name; each ``optembed``
    block keeps the supernet's options, or for the retrain (``plans``) only its ``options.plan``."""
    out = copy.deepcopy(cfg)
    out.train.checkpoint_dir = f"{cfg.train.checkpoint_dir}/{phase}"
    out.tracking.run_name = f"{cfg.tracking.run_name or 'optembed'}/{phase}"
    for table in out.model.tables:
        if table.kind == "optembed":
            table.options = {k: v for k, v in table.options.items() if k in SUPERNET_OPTIONS}
    for i, path in (plans or {}).items():
        out.model.tables[i].options = {"plan": str(path.resolve())}
    return out


def run_optembed(cfg: Config) -> OptEmbedResult:
    """Supernet, search, retrain (see the module docstring); each phase resumes where a previous
    run of the same command stopped."""
    from recmem.tracking.logger import RunLogger, runs_marked_failed

    blocks = optembed_blocks(cfg)
    base = Path(cfg.workdir) / cfg.train.checkpoint_dir
    base.mkdir(parents=True, exist_ok=True)
    record = base / "optembed.json"
    parent_id = json.loads(record.read_text()).get("run_id") if record.is_file() else None
    named = copy.deepcopy(cfg)
    named.tracking.run_name = cfg.tracking.run_name or "optembed"
    with runs_marked_failed():
        parent = RunLogger(named, run_id=parent_id)
        record.write_text(json.dumps({"run_id": parent.run_id}))
        supernet_cfg = phase_config(cfg, "supernet")
        supernet = train_local(supernet_cfg)
        state, plans, widths = search_phase(cfg, supernet_cfg, blocks, base / "search")
        # one folder per set of plans: a retrain over a new search starts afresh beside the old one
        retrain_cfg = phase_config(cfg, "retrain-" + "-".join(p.stem.rsplit("-", 1)[1] for p in plans),
                                   dict(zip(blocks, plans)))
        retrain = train_local(retrain_cfg)
        best_auc = state.best()[1]
        parent.log_metrics({"supernet/valid_auc": supernet.metrics.get("valid/auc", float("nan")),
                            "search/best_auc": best_auc, **{f"retrain/{k.replace('/', '_')}": v
                                                            for k, v in retrain.metrics.items()}}, retrain.step)
        run = parent.run_url()
        parent.close()
    return OptEmbedResult(supernet, widths, best_auc, plans, retrain, retrain_cfg.train.checkpoint_dir, run)


def _digest(state: dict) -> str:
    """SHA-256 of a model state's tensors (a finished run's checkpoint is re-saved on a rerun, so its
    file's bytes may change while its weights do not)."""
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if isinstance(tensor, torch.Tensor):
            h.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
            if tensor.numel():  # an empty tensor may carry stride 0, which no byte view accepts
                h.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _resumable(folder: Path, key: dict, num_fields: int, dim: int) -> tuple[SearchState | None, str | None]:
    """The saved search state and its MLflow run when it was searching with the same supernet and
    knobs (``key``, kept in ``key.json`` beside it), else (None, None) and a line saying why."""
    path, record = folder / "state.json", folder / "key.json"
    saved = json.loads(record.read_text()) if record.is_file() else {}
    if saved.get("key") != key:
        if path.is_file():
            tqdm.write(f"recmem: {folder}: the supernet or the search's options changed; searching afresh")
        return None, None
    return (SearchState.load(path, num_fields, dim) if path.is_file() else None), saved.get("run_id")


def search_phase(cfg: Config, supernet_cfg: Config, blocks: list[int],
                 folder: Path) -> tuple[SearchState, list[Path], list[list[int]]]:
    """Load the supernet's final checkpoint, search widths (resuming ``folder/state.json``) and write
    each block's plan; the search state, the plan files and the widths found per block."""
    from recmem.tracking.logger import RunLogger

    folder.mkdir(parents=True, exist_ok=True)
    checkpoints = Path(supernet_cfg.workdir) / supernet_cfg.train.checkpoint_dir
    found = load_latest(checkpoints)
    if found is None:
        raise FileNotFoundError(f"{checkpoints}: no supernet checkpoint to search with")
    model = build_job_model(supernet_cfg)
    model.load_state_dict(found[0]["model"])
    model.eval()
    tables = [t for t in model.tables.tables if isinstance(t, SupernetTable)]
    sizes = [len(t.feature_names) for t in tables]
    dim = tables[0].embedding_dim
    options = optembed_options(cfg.model.tables[blocks[0]], f"model.tables.{blocks[0]}")
    batches = list(itertools.islice(local_source(cfg)("valid", 0, 0), options.search_batches or None))
    kept = [int(k[:-1].sum()) for t in tables for k in t.kept()]  # per field, the vocabulary rows kept

    def split(candidate: tuple[int, ...]) -> list[list[int]]:
        starts = list(itertools.accumulate(sizes, initial=0))
        return [list(candidate[a:b]) for a, b in zip(starts, starts[1:])]

    def score(candidate: tuple[int, ...]) -> float:
        for table, widths in zip(tables, split(candidate)):
            table.set_widths(widths)
        return evaluate(model, iter(batches))["valid/auc"]

    def allowed(candidate: tuple[int, ...]) -> bool:
        return not options.max_bytes or compact_bytes(kept, list(candidate)) <= options.max_bytes

    if not allowed(tuple([1] * sum(sizes))):
        least = compact_bytes(kept, [1] * sum(sizes))
        raise ConfigError(f"model.tables.{blocks[0]}.options.max_bytes: {options.max_bytes:,} is out of reach: the "
                          f"{sum(kept):,} rows the thresholds kept take {least:,} bytes at width 1 (raise "
                          "options.alpha or options.threshold_lr to prune more, or options.min_count)")
    settings = SearchSettings(options.population, options.top_k, options.mutations, options.crossovers,
                              options.mutation_prob, options.iterations, cfg.seed)
    path = folder / "state.json"
    # iterations stay out of the key: generation g draws from (seed, g) alone, so more iterations
    # continue a finished search exactly as a longer one would have run
    knobs = {k: v for k, v in settings.__dict__.items() if k != "iterations"}
    key = {"supernet": found[1].name, "supernet_sha256": _digest(found[0]["model"]), "settings": knobs,
           "max_bytes": options.max_bytes, "search_batches": options.search_batches}
    state, run_id = _resumable(folder, key, sum(sizes), dim)
    log = RunLogger(phase_config(cfg, "search"), run_id=run_id)
    (folder / "key.json").write_text(json.dumps({"key": key, "run_id": log.run_id}))

    def after(s: SearchState) -> None:
        s.save(path)
        log.log_metrics({"search/best_auc": s.best()[1], "search/candidates": float(len(s.scores))}, s.generation)

    state = evolve(sum(sizes), dim, score, settings, allowed, state, after)
    widths = split(state.best()[0])
    plans = []
    for i, table, block_widths in zip(blocks, tables, widths):
        draft = folder / f"plan-{i}.pt"
        table.compact_plan(block_widths).save(draft)
        # named by its content: a retrain resumed over another plan is refused by its resume key
        plans.append(draft.with_name(f"plan-{i}-{file_sha256(draft)[:12]}.pt"))
        os.replace(draft, plans[-1])
        log.log_params({f"tables.{i}.widths": block_widths})
        log.log_artifact(plans[-1], "plans")
    total = sum(sum(t.rows.rows) for t in tables)
    log.log_metrics({"search/rows_kept": float(sum(kept)), "search/kept_fraction": sum(kept) / total,
                     "search/compact_bytes": float(compact_bytes(kept, list(state.best()[0])))}, state.generation)
    log.close()
    return state, plans, widths
