"""``recmem online``: score each new window of the stream, then train on it, and commit both together.

Per window (a landed file, or ``online.window_rows`` rows of one)::

    source.next_window(committed offsets)      rows after what the last checkpoint holds
      -> score (eval mode, no table updates)   online/auc, online/logloss: test-then-train
      -> train (TrainingSession.train_window)  the same steps as ``recmem train``
      -> expire rows idle past the TTL at the window's newest event time (data time)
      -> checkpoint {model, optimizer, offsets} in one atomic file: the commit
      -> publish a row delta of what that checkpoint holds (``sync.py``), on its interval
         (online/freshness_s: from the file's landing to its rows being served)
      -> on its schedule, register a snapshot; move ``champion`` only past the guardrail (``snapshot.py``)

Exactly once: the offsets consumed are saved in the same file as the model and optimizer state
(``TrainingSession.checkpoint``), so every checkpoint is a model *and* the rows it has trained.
A run killed at any point resumes from the newest checkpoint and asks the source for the rows after
its offsets: a window cut short is trained again from its start on the state before it, and a
trained window is never read again. Deltas are built only after the checkpoint that holds their rows
is written, so serving never shows rows that a crash could take back (see ``sync.py`` for a crash
between the checkpoint and the push).

SIGTERM (and Ctrl-C) lets the window in progress finish and checkpoint, then the loop exits 0.

With ``ray.enabled`` and ``ray.num_workers > 1`` the same loop runs on Ray workers with sharded
tables (``workers.py``): rank 0 picks each window and every worker trains its share of it
(``distributed.py``); the commit is a checkpoint of every worker's shard.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recmem.config import Config, ConfigError, to_dict
from recmem.online.source import LandingDirectory, StreamSource, Window
from recmem.tracking.logger import flatten

Say = Callable[[str], None]


@dataclass
class OnlineResult:
    """What a finished online run reports.

    Attributes:
        windows: windows trained in total (this run and the runs it resumed).
        rows: rows trained in total.
        offsets: the committed ``{key: rows consumed}``.
        history: per window of this run: ``window``, ``key``, ``rows``, ``auc``, ``logloss``, ``lag_s``,
            ``newest_time``, ``rows_live``.
        quarantined: files this run quarantined.
        run: the MLflow run's URL (empty without tracking).
    """

    windows: int
    rows: int
    offsets: dict[str, int]
    history: list[dict[str, Any]] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    run: str = ""


def online_key(cfg: Config) -> dict[str, Any]:
    """The resume key of an online job's checkpoints: the model config, and the stream they follow
    (its offsets, not a fingerprint, say which rows they hold; see ``train/resume.py``)."""
    config = flatten({"model": to_dict(cfg.model), "data": {"schema": to_dict(cfg.data.schema)}})
    landing = cfg.online.landing
    return {"config": config, "data": {"root": landing, "files": 0, "rows": 0, "fingerprint": f"stream:{landing}"}}


class StopFlag:
    """Set by SIGTERM / SIGINT (or a caller): the loop ends after the window in progress."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self, *_: Any) -> None:
        """Ask the loop to stop (a signal handler's signature)."""
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``, waking early when set."""
        self._event.wait(seconds)


def run_online(cfg: Config, say: Say = print, stop: StopFlag | None = None,
               source: StreamSource | None = None,
               post: Callable[[str, bytes], tuple[int, dict]] | None = None) -> OnlineResult:
    """Follow ``cfg.online``'s stream until stopped (or idle for ``online.idle_exit_s``, or after
    ``online.max_windows`` windows), training each window after scoring it.

    Args:
        cfg: the job (``online`` section, model, schema, tracking).
        say: where the status line and reports go.
        stop: a flag the loop checks between windows; default: one that SIGTERM / SIGINT set (only
            from the main thread).
        source: the stream; default: :class:`~recmem.online.source.LandingDirectory` of
            ``online.landing``.
        post: how deltas reach ``online.endpoints`` (``sync.http_post`` by default; tests pass a
            server's own methods). Deltas (``sync.DeltaPublisher``) go out when ``online.endpoints``
            is set; snapshots (``snapshot.Snapshotter``) follow when ``online.register_as`` and
            ``online.snapshot_every`` are set.

    On Ray workers (``ray.num_workers > 1``: ``workers.run_online_ray``) the workers read the stream
    and reach the endpoints themselves, and SIGTERM / SIGINT reach them through the run folder; the
    caller passes none of ``stop``, ``source`` and ``post``.

    Raises:
        ResumeError: the newest checkpoint was written for another model config or stream.
        ConfigError: ``stop``, ``source`` or ``post`` given for Ray workers.
    """
    o = cfg.online
    if cfg.ray.enabled and cfg.ray.num_workers > 1:
        if stop is not None or source is not None or post is not None:
            raise ConfigError(f"ray.num_workers={cfg.ray.num_workers}: the workers read online.landing and reach "
                              "online.endpoints themselves (no stop flag, source or post from the caller)")
        from recmem.online.workers import run_online_ray

        return run_online_ray(cfg, say)
    previous = {}
    if stop is None:
        stop = StopFlag()
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            previous = {s: signal.signal(s, stop.set) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _follow(cfg, say, stop, source or LandingDirectory(o.landing, cfg.data.schema, o.window_rows,
                                                                  report=say), post)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _follow(cfg: Config, say: Say, stop: StopFlag, source: StreamSource,
            post: Callable[[str, bytes], tuple[int, dict]] | None) -> OnlineResult:
    """:func:`run_online`'s loop (its arguments, resolved)."""
    from recmem.train.checkpoint import LocalCheckpoints
    from recmem.train.guards import state_bytes
    from recmem.train.loop import TrainingSession, build_job_model, make_dense_optimizer

    o = cfg.online
    model = build_job_model(cfg)
    optimizer = make_dense_optimizer(cfg, model.dense_parameters())
    store = LocalCheckpoints(Path(cfg.workdir) / o.checkpoint_dir, cfg.train.resume, key=online_key(cfg),
                             resume_changed=cfg.train.resume_changed)
    with store.session(state_bytes(model, optimizer)):
        session = TrainingSession(cfg, model, optimizer, store, track=cfg.tracking.enabled,
                                  params={"online.mode": "test-then-train"})
        done = (session.resumed or {}).get("online", {"offsets": {}, "windows": 0, "rows": 0})
        offsets, windows, rows = dict(done["offsets"]), int(done["windows"]), int(done["rows"])
        if session.resumed is not None:
            say(f"recmem online: resumed from {store.loaded_from}: {windows} windows, {rows:,} rows committed")
        publisher = None
        if o.endpoints:
            from recmem.online.sync import DeltaPublisher

            publisher = DeltaPublisher(cfg, model, say, post)
        snapshots = None
        if o.register_as and o.snapshot_every:
            from recmem.online.snapshot import Snapshotter

            snapshots = Snapshotter(cfg, say, publisher)
        result = OnlineResult(windows, rows, offsets)
        idle_since, started = time.monotonic(), time.monotonic()
        while not stop and not (o.max_windows and windows >= o.max_windows):
            window = source.next_window(offsets)
            if window is None:
                if o.idle_exit_s and time.monotonic() - idle_since >= o.idle_exit_s:
                    break
                stop.wait(o.poll_interval_s)
                continue
            batches, record = _score_then_train(session, window, cfg)
            offsets[window.key] = window.end
            windows, rows = windows + 1, rows + window.table.num_rows
            progress = {"online": {"offsets": dict(offsets), "windows": windows, "rows": rows}}
            session.checkpoint(progress)  # the commit: model, optimizer and offsets in one file
            record.update(window=windows, lag_s=time.time() - record["newest_time"]
                          if record["newest_time"] is not None else math.nan)
            if publisher is not None:
                record.update(publisher(session, windows))
                if "delta_version" in record and window.landed is not None:  # its rows are served now
                    record["freshness_s"] = time.time() - window.landed
            if snapshots is not None:
                record.update(snapshots(batches, record, windows))
            log_window(session, record)
            result.history.append(record)
            say(_status(record, rows - result.rows, time.monotonic() - started))
            idle_since = time.monotonic()
        result.windows, result.rows, result.offsets = windows, rows, offsets
        result.quarantined = list(getattr(source, "quarantined", []))
        final = {"online": {"offsets": dict(offsets), "windows": windows, "rows": rows}}
        session.finish(final, lambda: {}, figure=False)
        result.run = session.log.run_url() if session.log.enabled else ""
    return result


def _score_then_train(session: Any, window: Window, cfg: Config) -> tuple[list, dict[str, Any]]:
    """Score ``window`` with the model as it stands, then train on it; its batches and figures."""
    from recmem.train.loop import evaluate

    batches = list(window.batches(cfg.data.schema, cfg.data.batch_size))
    scored = evaluate(session.model, iter(batches), "online")
    for _ in session.train_window(batches, lambda: f"{window.key}, rows from {window.begin}"):
        pass
    times = [t for t in (b.max_event_time() for b in batches) if t is not None]
    newest = max(times) if times else None
    if newest is not None:
        for table in session.evictable:  # expiry runs on data time: the newest event trained
            table.evict(newest)
    live = [v for k, v in session.model.tables.stats().items() if k.endswith("/rows_live")]
    return batches, {"key": window.key, "rows": window.table.num_rows, "auc": scored["online/auc"],
                     "logloss": scored["online/logloss"], "calibration": scored["online/calibration"],
                     "newest_time": newest, "rows_live": sum(live) if live else math.nan}


def log_window(session: Any, record: dict[str, Any]) -> None:
    """A window's figures as ``online/<name>`` metrics at the session's step (its numbers only)."""
    session.log.log_metrics({f"online/{k}": float(v) for k, v in record.items()
                             if isinstance(v, (int, float)) and k != "newest_time"}, session.step)


def _status(record: dict[str, Any], rows: int, seconds: float) -> str:
    """The one status line per window: lag, windows, rows/s and the last delta."""
    delta = f", delta {record['delta_rows']:,} rows -> {record['delta_version']}" if "delta_version" in record else ""
    return (f"recmem online: window {record['window']} ({record['key']}, {record['rows']:,} rows) auc "
            f"{record['auc']:.4f} lag {record['lag_s']:.1f} s, {rows / max(seconds, 1e-9):,.0f} rows/s{delta}")
