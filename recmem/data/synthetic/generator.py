"""Writing a synthetic click log to Parquet, chunk by chunk, time-ordered, train before valid; or
handing its training rows out as a stream of files (``recmem generate --landing``)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from recmem.config import ConfigError, SchemaConfig, SyntheticConfig
from recmem.data.stats import write_stats
from recmem.data.synthetic.oracle import OracleMeter
from recmem.data.synthetic.truth import GroundTruth, build_truth

SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class Clock:
    """Maps a row's position in the log to its data time.

    Traffic follows a daily cycle, rate ``1 + a * cos(2 pi (day_fraction - 0.85))`` (busiest in the
    evening), so rows are denser at some hours, as in a real log. Row ``i`` of ``N`` is stamped with
    the time by which the fraction ``(i + 0.5) / N`` of the traffic has arrived: non-decreasing in
    ``i``, and the same whatever the chunking.
    """

    start_time: int
    num_days: int
    total_rows: int
    amplitude: float

    def seconds(self, rows: np.ndarray) -> np.ndarray:
        """Data time since the log's start of rows ``rows`` [B] int64 -> [B] int64 seconds."""
        grid = np.linspace(0.0, self.num_days, self.num_days * 1440 + 1)  # minutes, in days
        phase = 2.0 * np.pi * (grid - 0.85)
        traffic = grid + self.amplitude / (2.0 * np.pi) * (np.sin(phase) - np.sin(phase[0]))
        wanted = (rows + 0.5) / self.total_rows * traffic[-1]
        return (np.interp(wanted, traffic, grid) * SECONDS_PER_DAY).astype(np.int64)


def generate(cfg: SyntheticConfig, schema: SchemaConfig, out_root: Path, progress: bool = True) -> dict:
    """Write a synthetic Criteo-shaped log under ``out_root`` and return a summary of it.

    Layout: ``train/part-00000.parquet ...`` then ``valid/part-*.parquet`` (the last rows in time),
    one part per ``cfg.chunk_rows`` rows; ``stats/`` (feature statistics of train); and
    ``synthetic.json`` (the config and the summary). Existing ``part-*.parquet`` files of the two
    splits are removed first, so a smaller rerun leaves no stale parts. Columns, named by ``schema``:
    label float32, dense float32 (log(1 + count)), sparse int64 raw IDs, event_time int64 seconds,
    true_prob float32. Memory stays at one chunk plus the ground truth's tables; the same config
    gives the same bytes.

    Args:
        cfg: sizes, seed and the shape of the hidden ground truth.
        schema: column names; its sparse and dense lists must match ``cfg.cardinalities`` and
            ``cfg.dense_missing``, and it must name ``event_time`` and ``true_prob`` columns.
        out_root: the data root.
        progress: show a progress bar on stderr.

    Returns:
        ``train/rows``, ``train/positive_rate``, ``train/mean_true_prob``, ``train/oracle_auc``,
        ``train/oracle_logloss``, the same for ``valid/``, ``seconds`` and ``rows_per_s`` (the
        whole call: ground truth, Parquet and feature statistics).
    """
    _check(cfg, schema)
    started = time.perf_counter()
    truth = build_truth(cfg)
    out_root = Path(out_root)
    total = cfg.train_rows + cfg.valid_rows
    clock = Clock(cfg.start_time, cfg.num_days, total, cfg.diurnal_amplitude)
    summary: dict = {}
    with tqdm(total=total, unit="rows", disable=not progress, desc="generate") as bar:
        splits = (("train", 0, cfg.train_rows), ("valid", cfg.train_rows, cfg.valid_rows))
        for split, first, rows in splits:
            folder = _empty_split(out_root / split)
            meter = OracleMeter()
            for part, lo in enumerate(range(first, first + rows, cfg.chunk_rows)):
                hi = min(lo + cfg.chunk_rows, first + rows)
                table = _chunk(truth, schema, clock, cfg.seed, lo, hi, meter)
                pq.write_table(table, folder / f"part-{part:05d}.parquet", compression="zstd")
                bar.update(hi - lo)
            summary.update(meter.summary(split))
    write_stats(out_root, schema, "train")
    summary["seconds"] = time.perf_counter() - started
    summary["rows_per_s"] = total / summary["seconds"]
    meta = {"config": dataclasses.asdict(cfg), "summary": summary}
    (out_root / "synthetic.json").write_text(json.dumps(meta, indent=2))
    return summary


def stream_tables(cfg: SyntheticConfig, schema: SchemaConfig, file_rows: int,
                  max_files: int = 0) -> Iterator[pa.Table]:
    """The training split :func:`generate` writes, row for row, cut into tables of ``file_rows`` rows.

    Each is what one landed file of a stream holds: the files follow each other in data time, and
    since the log's IDs are born and die as data time passes (``ids.py``), later files hold IDs
    earlier ones never had and stop holding some they had. Rows are made one ``cfg.chunk_rows``
    chunk at a time, exactly as :func:`generate` makes them (the same config gives the same rows
    as its ``train/`` parts), so memory stays at a chunk plus a file.

    Args:
        cfg: the generator's config (``train_rows`` bounds the stream).
        schema: column names (as :func:`generate`).
        file_rows: rows per table; the last one may be shorter.
        max_files: stop after this many (0: the whole training split).

    Raises:
        ConfigError: a config :func:`generate` would refuse, or ``file_rows`` below 1.
    """
    _check(cfg, schema)
    if file_rows < 1 or max_files < 0:
        raise ConfigError(f"file rows ({file_rows}) must be positive and files ({max_files}) not negative")
    truth = build_truth(cfg)
    clock = Clock(cfg.start_time, cfg.num_days, cfg.train_rows + cfg.valid_rows, cfg.diurnal_amplitude)
    rows = min(cfg.train_rows, max_files * file_rows) if max_files else cfg.train_rows
    meter = OracleMeter()  # _chunk feeds one; the stream's summary does not need it
    held: list[pa.Table] = []
    for lo in range(0, rows, cfg.chunk_rows):
        # Whole chunks (their rows depend on where they start), cut at the stream's end.
        chunk = _chunk(truth, schema, clock, cfg.seed, lo, min(lo + cfg.chunk_rows, cfg.train_rows), meter)
        held.append(chunk.slice(0, rows - lo))
        while sum(t.num_rows for t in held) >= file_rows:
            table = pa.concat_tables(held)
            yield table.slice(0, file_rows)
            held = [table.slice(file_rows)]
    if sum(t.num_rows for t in held):
        yield pa.concat_tables(held)


def _chunk(
    truth: GroundTruth,
    schema: SchemaConfig,
    clock: Clock,
    seed: int,
    lo: int,
    hi: int,
    meter: OracleMeter,
) -> pa.Table:
    """Rows ``lo..hi-1`` of the log as an Arrow table; feeds ``meter``."""
    # A chunk's stream depends only on the seed and its first row, not on the chunks before it.
    rng = np.random.default_rng([seed, 1, lo])
    seconds = clock.seconds(np.arange(lo, hi))
    rows = truth.draw(rng, seconds / SECONDS_PER_DAY)
    prob = (1.0 / (1.0 + np.exp(-rows.logit))).astype(np.float32)
    label = (rng.random(hi - lo, dtype=np.float32) < prob).astype(np.float32)
    meter.update(prob, label)
    columns = {schema.label: label}
    columns.update({name: rows.dense[:, j] for j, name in enumerate(schema.dense)})
    for name, f, idx in zip(schema.sparse, truth.fields, rows.index):
        columns[name] = np.take(f.ids.raw_ids, idx)
    columns[schema.event_time] = seconds + clock.start_time
    columns[schema.true_prob] = prob
    return pa.table(columns)


def _empty_split(folder: Path) -> Path:
    """Create ``folder`` or clear the Parquet parts a previous run left in it."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("part-*.parquet"):
        stale.unlink()
    return folder


def _check(cfg: SyntheticConfig, schema: SchemaConfig) -> None:
    """Reject a config the generator cannot honour, naming the key at fault."""
    problems = [
        ("data.synthetic.cardinalities", len(cfg.cardinalities) != len(schema.sparse),
         f"needs one entry per sparse column ({len(schema.sparse)}), has {len(cfg.cardinalities)}"),
        ("data.synthetic.dense_missing", len(cfg.dense_missing) != len(schema.dense),
         f"needs one entry per dense column ({len(schema.dense)}), has {len(cfg.dense_missing)}"),
        ("data.schema.event_time", not schema.event_time, "the generator writes it: name a column"),
        ("data.schema.true_prob", not schema.true_prob, "the generator writes it: name a column"),
        ("data.synthetic.positive_rate", not 0.0 < cfg.positive_rate < 1.0, "must lie in (0, 1)"),
        ("data.synthetic.diurnal_amplitude", not 0 <= cfg.diurnal_amplitude < 1, "must lie in [0, 1)"),
        ("data.synthetic.chunk_rows", cfg.chunk_rows < 1, "must be positive"),
        ("data.synthetic.num_days", cfg.num_days < 1, "must be positive"),
        ("data.synthetic.train_rows", cfg.train_rows < 1, "must be positive"),
        ("data.synthetic.valid_rows", cfg.valid_rows < 0, "must not be negative"),
    ]
    for key, wrong, why in problems:
        if wrong:
            raise ConfigError(f"{key}: {why}")
