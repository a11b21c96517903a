"""The memory/quality frontier (issue 11): DLRM over each table kind at 1x, 4x, 16x and 64x less
embedding memory than `full`, trained for the same number of steps.

For each kind and ratio r the kind's size function (``frontier_kinds.FRONTIER_KINDS``) picks the
blocks whose built tables measure closest below full's bytes / r; the point is then trained as
``recmem train`` trains a job (its own folder, a nested MLflow run under one parent) and reports:

- ``bytes``: the trained tables' ``memory_bytes()`` at the final validation (rows, optimizer state,
  projections, ID maps: measured from the live tensors), and full's bytes over it (``achieved``);
- valid AUC, logloss, the gap to the generator's oracle AUC (synthetic data only), training
  samples/s (the loop's step time; the machine's load shows in it) and the steps taken;
- with several seeds (``--seeds``) each point is trained once per seed (the seed sets the tables'
  and the dense part's initialisation; the data and its order stay the same), and the report gives
  the mean and spread of each point and a paired verdict for `qr` and `multihash` against `hash`
  (``frontier_report.py``).

A kind that cannot reach a ratio gets a row saying so, with the least bytes it can take. The report
is a Markdown table, a plot of AUC against bytes (log x, one line per kind) and the issue's targets
with pass/fail, written to ``out`` and logged to the parent run.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from recmem.bench.frontier_kinds import FRONTIER_KINDS, WANTED_KINDS, Budget, measurer
from recmem.config import Config, ConfigError, from_dict, to_dict


@dataclass
class FrontierOptions:
    """What to run.

    Attributes:
        out: folder of the points' runs and the report.
        ratios: memory ratios to full.
        steps: training steps of every point (0: the config's ``train.max_steps``, else its epochs
            over the training split).
        kinds: kinds in table order; one without a ``FRONTIER_KINDS`` entry gets a row saying so.
        learning_rates: per kind, the table learning rate to use instead of the config's.
        seeds: the seeds every point is trained with (each one run per seed).
        multihash: `multihash`'s sizing, k hashes and ``sum`` or ``concat`` (``Budget.multihash``).
    """

    out: Path
    ratios: tuple[float, ...] = (1, 4, 16, 64)
    steps: int = 0
    kinds: tuple[str, ...] = WANTED_KINDS
    learning_rates: dict[str, float] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    multihash: tuple[int, str] = (4, "concat")


@dataclass
class Point:
    """One kind at one ratio and seed (``auc`` NaN when it was not trained: ``note`` says why)."""

    kind: str
    ratio: float
    bytes: int
    achieved: float
    auc: float = math.nan
    logloss: float = math.nan
    oracle_gap: float = math.nan
    samples_per_second: float = math.nan
    steps: int = 0
    note: str = ""
    seed: int = 0

    @property
    def trained(self) -> bool:
        """Whether the point was trained (it has an AUC)."""
        return not math.isnan(self.auc)


def ensure_data(cfg: Config) -> str | None:
    """Make ``cfg``'s data root if it is missing: generate the synthetic data, or prepare the raw log
    (``data.raw.path``). Returns None when ready, else why the dataset is skipped (no raw log)."""
    from recmem.data.dataset import count_rows
    from recmem.lock import exclusive

    root = Path(cfg.data.root)
    try:
        count_rows(root, "train")
        return None
    except FileNotFoundError:
        pass
    with exclusive(root, "generate" if not cfg.data.raw.path else "prepare"):
        if not cfg.data.raw.path:
            from recmem.data.synthetic import generate

            print(f"frontier: generating synthetic data in {root}", flush=True)
            generate(cfg.data.synthetic, cfg.data.schema, root)
            return None
        if not Path(cfg.data.raw.path).is_file():
            return f"{cfg.data.raw.path}: no such raw log (data.raw.path); dataset skipped"
        from recmem.data.convert import convert_raw
        from recmem.data.stats import write_stats

        convert_raw(cfg.data.raw, cfg.data.schema, root)
        write_stats(root, cfg.data.schema)
    return None


QUICK_STEPS = 6


def quick(cfg: Config, opts: FrontierOptions) -> tuple[Config, FrontierOptions]:
    """The test suite's frontier: small MLPs, 2 ratios (1x, 16x), :data:`QUICK_STEPS` steps, and for
    synthetic data 4,000 generated training rows under ``opts.out``."""
    data = to_dict(cfg)
    if not cfg.data.raw.path:
        data["data"]["root"] = str(Path(opts.out) / "quick-data")
        data["data"]["synthetic"].update(train_rows=4000, valid_rows=1000, chunk_rows=4000)
    data["data"]["batch_size"] = min(cfg.data.batch_size, 256)
    data["model"].update(bottom_mlp=[16, cfg.model.embedding_dim or cfg.model.tables[0].embedding_dim],
                         top_mlp=[16, 1])
    return from_dict(Config, data), FrontierOptions(opts.out, (1, 16), QUICK_STEPS, opts.kinds, opts.learning_rates,
                                                    opts.seeds, opts.multihash)


def steps_for(cfg: Config, opts: FrontierOptions) -> int:
    """Every point's step budget (see :attr:`FrontierOptions.steps`)."""
    from recmem.data.dataset import count_rows

    if opts.steps:
        return opts.steps
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return cfg.train.epochs * (count_rows(Path(cfg.data.root), "train") // cfg.data.batch_size)


def point_config(cfg: Config, blocks, kind: str, ratio: float, steps: int, workdir: Path, tracking_uri: str,
                 learning_rate: float | None, seed: int = 0) -> Config:
    """The job of one point: ``cfg`` with ``blocks`` as its tables at the model's width, ``steps``
    steps (one validation, one checkpoint at the end), ``seed``, its own folder, the parent's
    tracking store."""
    data = to_dict(cfg)
    tables = [to_dict(b) for b in blocks]
    if learning_rate is not None:
        for t in tables:
            t["learning_rate"] = learning_rate
    data["model"].update(tables=tables, embedding_dim=cfg.model.embedding_dim or cfg.model.tables[0].embedding_dim)
    data["train"].update(max_steps=steps, epochs=10**6, eval_every=0, checkpoint_every=0, progress=False)
    data["workdir"] = str(workdir)
    data["seed"] = seed
    data["ray"]["enabled"] = False
    data["tracking"].update(tracking_uri=tracking_uri, run_name=f"{kind} {ratio:g}x seed {seed}")
    return from_dict(Config, data)


def run_frontier(cfg: Config, opts: FrontierOptions) -> list[Point]:
    """Size, train and report every kind at every ratio on ``cfg``'s data (its first block must be
    the `full` reference); returns the points in table order.

    Raises:
        ConfigError: the config's tables are not one `full` block.
    """
    from recmem.tracking.logger import RunLogger, default_tracking_uri, runs_marked_failed

    if len(cfg.model.tables) != 1 or cfg.model.tables[0].kind != "full":
        raise ConfigError("model.tables: the frontier's reference is one `full` block over every feature")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    measure = measurer(cfg)
    full_bytes = measure(cfg.model.tables)
    steps = steps_for(cfg, opts)
    parent_cfg = copy.deepcopy(cfg)
    parent_cfg.workdir = str(out)
    parent_cfg.tracking.run_name = f"frontier {Path(cfg.data.root).name}"
    tracking_uri = cfg.tracking.tracking_uri or default_tracking_uri(out)
    parent_cfg.tracking.tracking_uri = tracking_uri
    points: list[Point] = []
    with runs_marked_failed():
        log = RunLogger(parent_cfg)
        log.log_params({"frontier.ratios": ",".join(f"{r:g}" for r in opts.ratios), "frontier.steps": str(steps),
                        "frontier.full_bytes": str(full_bytes),
                        "frontier.seeds": ",".join(str(s) for s in opts.seeds),
                        "frontier.multihash": "{}:{}".format(*opts.multihash)})
        # full (the reference, at 1x only) first, then ratio by ratio in the order given, so that a
        # long run's partial report (rewritten after every point) holds whole ratios
        order = [("full", 1.0)] if "full" in opts.kinds else []
        order += [(kind, ratio) for ratio in opts.ratios for kind in opts.kinds if kind != "full"]
        for kind, ratio in order:
            budget = Budget(cfg, full_bytes, ratio, measure, opts.multihash)
            for seed in opts.seeds:
                points.append(_point(cfg, kind, ratio, budget, steps, out, tracking_uri,
                                     opts.learning_rates.get(kind), seed))
            write_report(_in_table_order(points, opts.kinds), full_bytes, steps, cfg, out, None)
        points = _in_table_order(points, opts.kinds)
        write_report(points, full_bytes, steps, cfg, out, log)
        log.close()
    return points


def _in_table_order(points: list[Point], kinds: tuple[str, ...]) -> list[Point]:
    return sorted(points, key=lambda p: (kinds.index(p.kind), p.ratio, p.seed))


def _point(cfg: Config, kind: str, ratio: float, budget: Budget, steps: int, out: Path, tracking_uri: str,
           learning_rate: float | None, seed: int) -> Point:
    """Size ``kind`` at ``ratio`` and train it with ``seed``, or say why not."""
    entry = FRONTIER_KINDS.get(kind)
    if entry is None:
        return Point(kind, ratio, 0, math.nan, note="no entry in FRONTIER_KINDS", seed=seed)
    sizing = entry.size(budget)  # the measurer's cache makes a second seed's sizing free
    if sizing.blocks is None:
        return Point(kind, ratio, sizing.bytes, budget.full_bytes / sizing.bytes, note=sizing.note, seed=seed)
    job = point_config(cfg, sizing.blocks, kind, ratio, steps, out / "points" / f"{kind}-{ratio:g}x-seed{seed}",
                       tracking_uri, learning_rate, seed)
    print(f"frontier: {kind} at {ratio:g}x, seed {seed}: {sizing.note} ({sizing.bytes:,} bytes built)", flush=True)
    run = entry.train(job)
    measured = int(run.metrics["tables/memory_bytes"])  # the trained tables' live bytes, not the sizing's
    m = run.metrics
    point = Point(kind, ratio, measured, budget.full_bytes / measured, m.get("valid/auc", math.nan),
                  m.get("valid/logloss", math.nan), m.get("valid/auc_gap", math.nan), run.samples_per_second,
                  run.steps, sizing.note, seed)
    print(f"frontier: {kind} at {ratio:g}x, seed {seed}: valid AUC {point.auc:.4f}, {measured:,} bytes "
          f"({point.achieved:.1f}x)", flush=True)
    return point


def write_report(points: list[Point], full_bytes: int, steps: int, cfg: Config, out: Path, log) -> None:
    """``frontier.md`` (table and targets), ``frontier.png`` and ``points.json`` in ``out``; with a
    ``log`` (the parent run's logger) also logged as artifacts and each point's mean, std, min and
    max over seeds as metrics (step: the ratio), and printed."""
    import json

    from recmem.bench.frontier_report import plot, summarize, table, targets

    name = Path(cfg.data.root).name
    text = (f"# Frontier on {name}\n\n{table(points, full_bytes, steps)}\n\n## Targets\n\n"
            + "\n".join(f"- {line}" for line in targets(points)) + "\n")
    (out / "frontier.md").write_text(text)
    (out / "points.json").write_text(json.dumps([asdict(p) for p in points], indent=1, default=str))
    figure = plot(points, f"valid AUC vs embedding bytes ({name}, {steps} steps each)")
    figure.savefig(out / "frontier.png", dpi=120)
    if log is None:
        return
    log.log_figure(figure, "frontier.png")
    log.log_text(text, "frontier.md")
    for g in summarize(points):
        if g.trained:
            log.log_metrics({f"{g.kind}/valid_auc": g.auc, f"{g.kind}/valid_auc_std": g.std,
                             f"{g.kind}/valid_auc_min": g.low, f"{g.kind}/valid_auc_max": g.high,
                             f"{g.kind}/bytes": float(g.bytes)}, int(g.ratio))
    print(text, flush=True)

