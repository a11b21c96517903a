"""Online training figures (issue 13): online against frozen, and freshness with a server running.

``compare_frozen``: the config's training split, in time order, is landed as files of
``file_rows`` rows (``producer.land_stream``, as ``recmem generate --landing`` lands the synthetic
one); ``recmem online`` trains the first ``warmup_files`` windows, and a copy of that
model is *frozen*; the loop then continues window by window (test-then-train). Every later window
is also scored by the frozen model: the online model's mean test-then-train AUC against the frozen
model's on the same windows is the margin drift costs a model that stops learning. Rows live per
window show the TTL bounding the tables. Works for the drifting synthetic stream and for a replay of
a real, time-ordered log (the Criteo sample), whichever ``data.root`` the config names.

``freshness``: a model server (the embedded one, in this process) starts from the loop's first
model; ``recmem online`` runs in its own process pushing deltas to it; the producer of ``recmem
generate --landing`` (``producer.land_stream``) lands a file every ``land_every_s`` seconds. For
each file the benchmark picks an ID seen in no earlier file; the freshness of the file is the time
from its rename into the landing folder until the server scores a row holding that ID differently
from a row holding an ID never seen (the same request, so the same model version): i.e. until the
server answers with a row trained from that file.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recmem.config import Config, load_config
from recmem.online.producer import land_stream

Say = Callable[[str], None]
NEVER_SEEN = 2**62 + 12_345
"""An ID no generator or log produces: the probe's reference row."""


@dataclass(frozen=True)
class OnlineBenchOptions:
    """What one run measures.

    Attributes:
        config: the job (``jobs/configs/online.yaml``, or the Criteo replay's).
        overrides: ``key=value`` overrides.
        out: the benchmark's folder (landing directory, checkpoints, server bundle, logs); emptied.
        file_rows: rows per landed file.
        warmup_files: windows trained before the frozen copy is taken.
        max_files: land at most this many files (0: the whole training split).
        land_every_s: freshness: seconds between two landed files.
    """

    config: str
    overrides: list[str] = field(default_factory=list)
    out: str = "runs/bench_online"
    file_rows: int = 5000
    warmup_files: int = 3
    max_files: int = 0
    land_every_s: float = 2.0


def stream_table(cfg: Config, max_rows: int = 0) -> pa.Table:
    """The training split in reading (time) order, at most ``max_rows`` rows (0: all)."""
    parts = sorted((Path(cfg.data.root) / "train").glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"{cfg.data.root}/train: no part files (recmem generate / prepare first)")
    tables, rows = [], 0
    for part in parts:
        tables.append(pq.read_table(part))
        rows += tables[-1].num_rows
        if max_rows and rows >= max_rows:
            break
    table = pa.concat_tables(tables)
    return table.slice(0, max_rows) if max_rows else table


def _fresh(out: Path) -> Path:
    shutil.rmtree(out, ignore_errors=True)
    (out / "landing").mkdir(parents=True)
    return out


def compare_frozen(opts: OnlineBenchOptions, say: Say = print) -> dict[str, Any]:
    """Online against frozen on the config's stream (see the module docstring); the summary."""
    from recmem.online.loop import run_online
    from recmem.train.checkpoint import load_latest
    from recmem.train.loop import build_job_model, evaluate

    out = _fresh(Path(opts.out))
    base = load_config(opts.config, list(opts.overrides))
    table = stream_table(base, opts.max_files * opts.file_rows)
    files = [table.slice(i, opts.file_rows) for i in range(0, table.num_rows, opts.file_rows)]
    land_stream(files, str(out / "landing"), 0.0, say=lambda line: None)
    cfg = load_config(opts.config, [*opts.overrides, f"workdir={out}", f"online.landing={out / 'landing'}",
                                    "online.idle_exit_s=0.01", "train.resume=true"])
    quiet = lambda line: None  # noqa: E731 (the per-window lines are in the summary)
    warm = load_config(opts.config, [*opts.overrides, f"workdir={out}", f"online.landing={out / 'landing'}",
                                     f"online.max_windows={opts.warmup_files}"])
    started = time.perf_counter()
    run_online(warm, say=quiet)
    frozen_state, _ = load_latest(out / cfg.online.checkpoint_dir)
    result = run_online(cfg, say=quiet)
    seconds = time.perf_counter() - started
    frozen = build_job_model(cfg)
    frozen.load_state_dict(frozen_state["model"])
    later = [h for h in result.history if h["window"] > opts.warmup_files]
    frozen_auc = [evaluate(frozen, _batches(cfg, files[h["window"] - 1]), "f")["f/auc"] for h in later]
    online_auc = [h["auc"] for h in later]
    summary = {
        "files": len(files), "file_rows": opts.file_rows, "warmup_files": opts.warmup_files,
        "online_auc": float(np.nanmean(online_auc)), "frozen_auc": float(np.nanmean(frozen_auc)),
        "margin": float(np.nanmean(online_auc) - np.nanmean(frozen_auc)),
        "windows_online_better": int(sum(o > f for o, f in zip(online_auc, frozen_auc))),
        "windows_compared": len(later),
        "rows_live_max": float(np.nanmax([h["rows_live"] for h in result.history])),
        "rows_live_last": float(result.history[-1]["rows_live"]),
        "distinct_ids": int(sum(len(np.unique(table.column(c).to_numpy(zero_copy_only=False)))
                                for c in cfg.data.schema.sparse)),
        "train_rows_per_s": table.num_rows / seconds,
        "per_window": [{"window": h["window"], "online_auc": h["auc"], "frozen_auc": f, "rows_live": h["rows_live"]}
                       for h, f in zip(later, frozen_auc)],
    }
    say(f"online AUC {summary['online_auc']:.4f} vs frozen {summary['frozen_auc']:.4f} (margin "
        f"{summary['margin']:+.4f}, online better in {summary['windows_online_better']}/{len(later)} windows); "
        f"rows live max {summary['rows_live_max']:,.0f} of {summary['distinct_ids']:,} distinct IDs")
    return summary


def _batches(cfg: Config, table: pa.Table):
    from recmem.data.collate import collate

    for start in range(0, table.num_rows, cfg.data.batch_size):
        yield collate(table.slice(start, cfg.data.batch_size), cfg.data.schema)


def freshness(opts: OnlineBenchOptions, say: Say = print) -> dict[str, Any]:
    """Landing-to-serving freshness with a server running (see the module docstring); the summary."""
    from recmem.export.job import bundle_info, export_model
    from recmem.serve.http import ModelHTTPServer
    from recmem.serve.service import ModelService, Served
    from recmem.serving import load_bundle
    from recmem.train.loop import build_job_model

    out = _fresh(Path(opts.out))
    cfg = load_config(opts.config, list(opts.overrides))
    count = opts.max_files or 20
    table = stream_table(cfg, count * opts.file_rows)
    fp32 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device="cpu", precision="fp32"))
    model = build_job_model(fp32)  # the loop's first weights (the same seed), exported as a server loads them
    bundle = export_model(model, fp32, out / "bundles", "fp32", bundle_info(fp32, {"model": model.state_dict()}, "start"))
    service = ModelService("online", Served(load_bundle(bundle)))
    server = ModelHTTPServer(("127.0.0.1", 0), service)
    server.start()
    endpoint = f"http://127.0.0.1:{server.port}"
    log = open(out / "online.log", "w")
    command = [sys.executable, "-m", "recmem.cli", "online", "--config", opts.config, *opts.overrides,
               f"workdir={out}", f"online.landing={out / 'landing'}", f"online.endpoints=[{endpoint}]",
               "online.sync_interval_s=0", "online.poll_interval_s=0.1", "train.resume=false"]
    loop = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    probes: dict[int, dict[str, Any]] = {}
    try:
        _wait_until_polling(out / "online.log", loop)
        seen = {c: set() for c in cfg.data.schema.sparse}
        prober = _Prober(endpoint, cfg, probes)
        prober.start()

        def probe(k: int, name: str, piece: pa.Table, landed: float) -> None:
            column, new_id = _new_id(piece, cfg.data.schema.sparse, seen)
            probes[k] = {"column": column, "id": new_id, "landed": landed, "served": None}

        pieces = (table.slice(k * opts.file_rows, opts.file_rows) for k in range(count))
        land_stream(pieces, str(out / "landing"), opts.land_every_s, landed=probe, say=lambda line: None)
        deadline = time.time() + 60
        while any(p["served"] is None for p in probes.values()) and time.time() < deadline and loop.poll() is None:
            time.sleep(0.05)
        prober.stop()
    finally:
        loop.terminate()
        loop.wait(timeout=60)
        server.shutdown()
        server.server_close()
        log.close()
    seconds = np.array([p["served"] - p["landed"] for p in probes.values() if p["served"] is not None])
    summary = {"files": count, "file_rows": opts.file_rows, "land_every_s": opts.land_every_s,
               "served": int(len(seconds)), "p50_s": float(np.percentile(seconds, 50)) if len(seconds) else None,
               "p95_s": float(np.percentile(seconds, 95)) if len(seconds) else None,
               "max_s": float(seconds.max()) if len(seconds) else None, "exit_code": loop.returncode,
               "per_file_s": [round(float(s), 3) for s in seconds]}
    say(f"freshness over {len(seconds)}/{count} files: p50 {summary['p50_s']} s, p95 {summary['p95_s']} s, "
        f"max {summary['max_s']} s (files of {opts.file_rows:,} rows every {opts.land_every_s:g} s)")
    return summary


def _wait_until_polling(log: Path, loop: subprocess.Popen, timeout_s: float = 300) -> None:
    """Wait until the loop has built its model (its precision line is in ``log``): from then on it
    polls the landing folder, so a file's freshness does not include the loop's start-up.

    Raises:
        RuntimeError: the loop exited or did not start in ``timeout_s``.
    """
    deadline = time.time() + timeout_s
    while loop.poll() is None and time.time() < deadline:
        if "dense layers in" in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise RuntimeError(f"recmem online did not start (exit code {loop.poll()}); see {log}")


def _new_id(piece: pa.Table, columns: list[str], seen: dict[str, set]) -> tuple[str, int]:
    """The most frequent ID of ``piece`` in no earlier file (the first column that has one); marks
    ``piece``'s IDs seen."""
    choice = None
    for column in columns:
        ids, counts = np.unique(piece.column(column).to_numpy(zero_copy_only=False), return_counts=True)
        fresh = np.array([i not in seen[column] for i in ids.tolist()], dtype=bool)
        if choice is None and fresh.any():
            best = int(np.argmax(np.where(fresh, counts, -1)))
            choice = (column, int(ids[best]))
        seen[column].update(ids.tolist())
    if choice is None:
        raise RuntimeError("a file holds no ID unseen before: use larger or more varied files")
    return choice


class _Prober(threading.Thread):
    """Polls the server for every landed file not served yet, each as two rows in one request."""

    def __init__(self, endpoint: str, cfg: Config, probes: dict[int, dict[str, Any]], every_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.probes, self.every_s = endpoint, probes, every_s
        self.template = {**{d: 0 for d in cfg.data.schema.dense}, **{s: None for s in cfg.data.schema.sparse}}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            pending = [(k, p) for k, p in list(self.probes.items()) if p["served"] is None]
            if pending:
                rows = []
                for _, p in pending:
                    rows += [{**self.template, p["column"]: p["id"]}, {**self.template, p["column"]: NEVER_SEEN}]
                request = urllib.request.Request(f"{self.endpoint}/predict", json.dumps({"rows": rows}).encode(),
                                                 {"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=10) as response:
                    answer = json.loads(response.read())["probabilities"]
                now = time.time()
                for j, (_, p) in enumerate(pending):
                    if abs(answer[2 * j] - answer[2 * j + 1]) > 1e-7:
                        p["served"] = now
            self._halt.wait(self.every_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
