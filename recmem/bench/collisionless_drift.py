"""Collisionless tables on drifting data: TTL and admission against no expiry and the hashing trick.

Generates ``data.root`` with recmem's synthetic generator when it holds no training data (IDs are
born and die over the log's days, so a table that never forgets keeps growing), then trains one
variant after another on the same data and the same batches, in this process:

- ``no_ttl``: the config's collisionless table with ``ttl`` off and no admission filter;
- ``ttl``: the config's table (its ``ttl``, data time), admission off;
- ``ttl_12h``: a TTL of 12 hours, shorter than the gap between two sightings of some IDs that are
  still alive (what an over-eager TTL costs);
- ``ttl_min2`` / ``ttl_min3``: the same with admission after 2 / 3 sightings;
- ``hash_equal_memory``: the hashing trick with ``num_embeddings`` chosen so its ``memory_bytes``
  equals ``ttl_min2``'s at the end of its run (rows, Adagrad state, ID map and filter all counted).

Each variant is an MLflow run (the loop logs ``valid/*`` and ``tables/*`` at every validation),
nested under the benchmark's run, which gets the comparison figure (rows live, table memory and valid
AUC against data time), ``compare/<variant>/<metric>`` numbers and ``comparison.json``. The config's
first table block is the one the variants change; overrides apply to every variant.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from recmem.config import Config, load_config
from recmem.data.batch import Batch
from recmem.data.synthetic import generate
from recmem.tracking.logger import RunLogger
from recmem.tracking.plots import plt
from recmem.train.local import local_source
from recmem.train.loop import TrainResult, train

SECONDS_PER_DAY = 86_400
TABLE = "model.tables.0"
VARIANTS = {
    "no_ttl": [f"{TABLE}.options.ttl=null", f"{TABLE}.options.min_count=1"],
    "ttl": [f"{TABLE}.options.min_count=1"],
    "ttl_12h": [f"{TABLE}.options.ttl=43200", f"{TABLE}.options.min_count=1"],
    "ttl_min2": [f"{TABLE}.options.min_count=2"],
    "ttl_min3": [f"{TABLE}.options.min_count=3"],
}
HASH_PEER, HASH_VARIANT = "ttl_min2", "hash_equal_memory"

Say = Callable[[str], None]
"""Where progress lines go (``print`` in the job)."""


@dataclass(frozen=True)
class DriftOptions:
    """What one run compares.

    Attributes:
        config: the base config (``jobs/configs/collisionless_drift.yaml``).
        overrides: ``key=value`` overrides for every variant.
        figure: also write the comparison figure here (PNG); None: only to MLflow.
    """

    config: str
    overrides: list[str] = field(default_factory=list)
    figure: str | None = None


class TimedSource:
    """The local Parquet source, noting the data time of each training batch it yields.

    ``times[k]`` is the latest event time of the k-th training batch, so a validation after step s
    saw data up to ``times[s - 1]`` (one epoch, no resume: steps and batches coincide).
    """

    def __init__(self, cfg: Config) -> None:
        self._inner = local_source(cfg)
        self.times: list[int] = []

    def __call__(self, split: str, epoch: int, start_batch: int) -> Iterator[Batch]:
        for batch in self._inner(split, epoch, start_batch):
            if split == "train":
                self.times.append(batch.max_event_time())
            yield batch


def curve(result: TrainResult, times: list[int], start: int) -> dict[str, list[float]]:
    """Per validation: data time (days since the log's start), rows live, table MiB and valid AUC."""
    points = [h for h in result.history if "valid/auc" in h]
    rows = [h.get("tables/0/rows_live", float("nan")) for h in points]  # a hash table has no live rows
    return {"day": [(times[int(h["step"]) - 1] - start) / SECONDS_PER_DAY for h in points],
            "rows_live": rows, "memory_mib": [h["tables/memory_bytes"] / 2**20 for h in points],
            "valid_auc": [h["valid/auc"] for h in points]}


def run_variant(name: str, opts: DriftOptions, overrides: list[str], say: Say) -> tuple[dict, TrainResult]:
    """Train one variant; returns its curve and result."""
    cfg = load_config(opts.config, [*opts.overrides, *overrides, f"tracking.run_name={name}",
                                    f"train.checkpoint_dir=checkpoints/{name}"])
    source = TimedSource(cfg)
    result = train(cfg, source)
    start = cfg.data.synthetic.start_time
    say(f"{name}: valid AUC {result.metrics['valid/auc']:.4f}, "
        f"memory {result.metrics['tables/memory_bytes'] / 2**20:.1f} MiB, {result.samples_per_second:,.0f} samples/s")
    return curve(result, source.times, start), result


def hash_rows(cfg: Config, memory_bytes: float) -> int:
    """Rows per feature of a `hash` table whose rows and Adagrad state take ``memory_bytes``."""
    table = cfg.model.tables[0]
    return max(1, round(memory_bytes / (len(cfg.data.schema.sparse) * (table.embedding_dim + 1) * 4)))


def figure(curves: dict[str, dict[str, list[float]]], oracle_auc: float) -> plt.Figure:
    """Rows live, table memory and valid AUC against data time, one line per variant."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (("rows_live", "rows live (all features)"), ("memory_mib", "table memory (MiB)"),
              ("valid_auc", "valid AUC"))
    for ax, (key, label) in zip(axes, panels):
        for name, c in curves.items():
            ax.plot(c["day"], c[key], marker="o", ms=3, label=name)
        ax.set(xlabel="data time (days)", ylabel=label, title=label)
        ax.grid(alpha=0.3)
    axes[2].axhline(oracle_auc, ls="--", color="gray", label="oracle (true CTR)")
    axes[2].legend(loc="lower right", fontsize=8)
    fig.suptitle("collisionless tables on drifting synthetic data")
    fig.tight_layout()
    return fig


def summarise(results: dict[str, TrainResult], curves: dict[str, dict[str, list[float]]]) -> dict:
    """Final metrics of every variant, and the differences the acceptance criteria name."""
    out = {name: {"valid_auc": r.metrics["valid/auc"], "valid_logloss": r.metrics["valid/logloss"],
                  "memory_mib": r.metrics["tables/memory_bytes"] / 2**20,
                  "rows_live": curves[name]["rows_live"][-1],
                  "samples_per_second": r.samples_per_second} for name, r in results.items()}
    auc = {name: v["valid_auc"] for name, v in out.items()}
    out["deltas"] = {"ttl_minus_no_ttl_auc": auc["ttl"] - auc["no_ttl"],
                     "ttl_12h_minus_no_ttl_auc": auc["ttl_12h"] - auc["no_ttl"],
                     "ttl_min2_minus_ttl_auc": auc["ttl_min2"] - auc["ttl"],
                     "ttl_min3_minus_ttl_auc": auc["ttl_min3"] - auc["ttl"],
                     "ttl_min2_minus_hash_auc": auc["ttl_min2"] - auc[HASH_VARIANT]}
    return out


def run_drift(opts: DriftOptions, say: Say = print) -> tuple[dict, str]:
    """Generate the data if needed, train every variant, log the comparison to MLflow.

    Args:
        opts: config, overrides and where the figure goes.
        say: takes one line per variant as it finishes.

    Returns:
        (the summary: per variant its final metrics, ``deltas``, ``hash_rows_per_feature``,
        ``oracle_auc``; the benchmark's MLflow run URL).
    """
    cfg = load_config(opts.config, [*opts.overrides, "tracking.run_name=collisionless_drift"])
    root = Path(cfg.data.root)
    if not any((root / "train").glob("part-*.parquet")):
        generate(cfg.data.synthetic, cfg.data.schema, root, progress=False)
    log = RunLogger(cfg)
    curves, results = {}, {}
    for name, overrides in VARIANTS.items():
        curves[name], results[name] = run_variant(name, opts, overrides, say)
    rows = hash_rows(cfg, results[HASH_PEER].metrics["tables/memory_bytes"])
    curves[HASH_VARIANT], results[HASH_VARIANT] = run_variant(
        HASH_VARIANT, opts, [f"{TABLE}.kind=hash", f"{TABLE}.num_embeddings={rows}", f"{TABLE}.options={{}}"], say)
    summary = summarise(results, curves)
    summary["hash_rows_per_feature"] = rows
    summary["oracle_auc"] = results["ttl"].metrics.get("valid/oracle_auc", float("nan"))
    log.log_metrics({f"compare/{k}": v for k, v in summary["deltas"].items()}, 0)
    log.log_metrics({f"compare/{name}/{k}": v for name in results for k, v in summary[name].items()}, 0)
    log.log_text(json.dumps({"summary": summary, "curves": curves}, indent=2), "comparison.json")
    fig = figure(curves, summary["oracle_auc"])
    log.log_figure(fig, "collisionless_drift.png")
    if opts.figure:
        fig.savefig(opts.figure, dpi=110)
    log.close()
    return summary, log.run_url()
