"""The one object through which rank 0 talks to MLflow, the console and artifact files.

A tracking server is checked before a run opens (one clear error within seconds when it does not
answer) and written through an :class:`~recmem.tracking.outbox.Outbox` afterwards: a server that
dies mid-run costs the run a bounded wait at its end, never its training or checkpoints.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import IO, Any

import yaml
from tqdm import tqdm

from recmem.config import Config, to_dict
from recmem.tracking.outbox import (
    Item, Outbox, TrackingUnavailable, bound_http_retries, check_server, is_server, one_short_try, send_bytes,
    short_reason,
)

STEP_TAG = "recmem.step"
"""Run tag: the step of the run's latest metrics, which a driver follows to show its workers' progress."""

_QUIET_LEVELS = {
    "mlflow": logging.WARNING,  # "Creating initial MLflow database tables...", per new store
    "alembic": logging.WARNING,
    "matplotlib": logging.WARNING,  # "generated new fontManager", on a machine's first plot
    "fbgemm_gpu": logging.WARNING,
    # "Retrying (Retry(total=1, ...)) after connection broken" per attempt of an MLflow call to a
    # server that is down; the outbox says so once (recmem.tracking.outbox).
    "urllib3.connectionpool": logging.ERROR,
    # INFO: each planner decision; WARNING: notes on how recmem builds its plans, not on the run.
    "torchrec": logging.ERROR,
    "torch.fx._symbolic_trace": logging.ERROR,  # a note to torchrec's authors on each first forward
    # The local instance's default: token auth on, and how to opt out. recmem started that instance.
    "ray._private.authentication": logging.ERROR,
}
_QUIET_PACKAGES = ("fbgemm_gpu", "torchrec", "ray")


class _LibraryInfoFilter(logging.Filter):
    """Drops records below WARNING logged from inside the given package folders.

    Levels cannot stop these: fbgemm logs with the root logger itself (``logging.info``: each TBE's
    arguments, "Successfully loaded: ..." per library it loads), and Ray's libraries with loggers
    named after their files.
    """

    def __init__(self, folders: list[str]) -> None:
        super().__init__()
        self.folders = tuple(folders)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not os.path.abspath(record.pathname).startswith(self.folders)


def quiet_libraries() -> None:
    """Turn this process's library chatter off (``tracking.verbose: false``): the INFO logs of
    MLflow, fbgemm, torchrec, Ray and matplotlib, torchrec's warnings, and the Python warnings raised
    from inside torch, torchrec, fbgemm, MLflow and Ray (deprecations one library owes another).
    Warnings attributed to recmem's code, and every error, still show. Idempotent; also the setup
    hook of every process of recmem's embedded Ray (``launcher._init_ray``)."""
    # MLflow sets its own logger to INFO when it is first imported, unless told not to.
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    for name, level in _QUIET_LEVELS.items():
        logging.getLogger(name).setLevel(level)
    folders = [f"{folder}{os.sep}" for name in _QUIET_PACKAGES if (spec := importlib.util.find_spec(name))
               for folder in spec.submodule_search_locations or ()]
    root = logging.getLogger()
    for target in (root, *root.handlers):
        if not any(isinstance(f, _LibraryInfoFilter) for f in target.filters):
            target.addFilter(_LibraryInfoFilter(folders))
    warnings.filterwarnings("ignore", module=r"(torch|torchrec|fbgemm_gpu|mlflow|ray)(\.|$)")


def default_tracking_uri(workdir: str | Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite file in ``workdir`` (artifacts beside it)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested config data -> ``{"train.lr": "0.01", ...}`` for MLflow params."""
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(data, list) and any(isinstance(v, (dict, list)) for v in data):
        return flatten({str(i): v for i, v in enumerate(data)}, prefix)
    return {prefix[:-1]: str(data)[:500]}


@contextmanager
def runs_marked_failed() -> Iterator[None]:
    """On an exception, end the MLflow run the block started and left active as FAILED, then re-raise.

    Without it a crashed job's run stays RUNNING in the MLflow UI. A run active before the block (a
    notebook's, a parent pipeline's) is left alone.
    """
    import mlflow

    before = mlflow.active_run()
    try:
        yield
    except BaseException:
        run = mlflow.active_run()
        if run is not None and (before is None or run.info.run_id != before.info.run_id):
            mlflow.end_run("FAILED")
        raise


def check_tracking(cfg: Config) -> None:
    """Before any heavy work: check that ``cfg``'s tracking server answers, and bound MLflow's HTTP
    retries in this process (:func:`~recmem.tracking.outbox.bound_http_retries`). Nothing to do for
    a local store or with tracking off.

    Raises:
        TrackingUnavailable: the server does not answer within seconds.
    """
    uri = cfg.tracking.tracking_uri or default_tracking_uri(cfg.workdir)
    if cfg.tracking.enabled and is_server(uri):
        bound_http_retries()
        check_server(uri)


def warm_tracking(cfg: Config) -> threading.Thread:
    """Import MLflow and open its store (creating its tables on first use) in a background thread.

    Both cost a second or two that a Ray driver can spend while ``ray.init`` waits for Ray's
    processes to start; join the thread before the first :class:`RunLogger`. Nothing here touches
    MLflow's active-run state, which is per thread. Call :func:`check_tracking` first: the caller
    joins this thread, and only a bounded MLflow gives up on a server that stops answering in between.
    """

    def warm() -> None:
        import mlflow

        if cfg.tracking.enabled:
            uri = cfg.tracking.tracking_uri or default_tracking_uri(cfg.workdir)
            with suppress(Exception):  # the RunLogger that follows reports a store that fails
                mlflow.MlflowClient(uri).get_experiment_by_name(cfg.tracking.experiment)

    thread = threading.Thread(target=warm, name="recmem-warm-tracking", daemon=True)
    thread.start()
    return thread


class RunLogger:
    """MLflow run for one training job; a no-op shell when tracking is disabled or on ranks > 0.

    An MLflow run that is already active (a notebook, a parent pipeline) is kept: this run nests under
    it instead of failing or hijacking it. ``run_id`` lets a resumed job continue the same run.

    Opening the run is the only step that waits on a tracking server, and it fails in seconds when
    the server does not answer. After it, writes go through an :class:`Outbox`: a server that stops
    answering costs a step nothing, and what it never takes is saved in the workdir and named in one
    line at :meth:`close`. Metric values are logged as they are, NaN included (MLflow stores NaN as
    NaN and clamps infinities to +-1.8e308), so a diverging run shows its failure, not a gap.

    Args:
        cfg: the resolved job config (logged as params and as a YAML artifact).
        enabled: False for a silent logger (ranks > 0, tests).
        run_id: an MLflow run to continue (from a checkpoint), or None for a new run.

    Raises:
        TrackingUnavailable: the tracking server does not answer, or refuses to open the run.
    """

    def __init__(self, cfg: Config, enabled: bool = True, run_id: str | None = None) -> None:
        self.enabled = enabled and cfg.tracking.enabled
        self.run_id: str | None = None
        self.tracking_uri = ""
        if not self.enabled:
            return
        check_tracking(cfg)
        import mlflow

        self._mlflow = mlflow
        self.tracking_uri = cfg.tracking.tracking_uri or default_tracking_uri(cfg.workdir)
        try:
            self.run_id = self._open(cfg, run_id)
        except mlflow.exceptions.MlflowException as e:
            raise TrackingUnavailable(f"MLflow at {self.tracking_uri} did not open the run: {short_reason(e)}") from e
        self._client = mlflow.MlflowClient(self.tracking_uri)
        self._reads_fail = False  # the store stopped answering the progress reads of ``following``
        self._outbox = Outbox(self.tracking_uri, self.run_id, cfg.workdir,
                              say=lambda line: tqdm.write(line, file=sys.stderr))
        if run_id is None:
            self._log_config(cfg)

    def _open(self, cfg: Config, run_id: str | None) -> str:
        """Start (or continue) the run; its id."""
        mlflow = self._mlflow
        mlflow.set_tracking_uri(self.tracking_uri)
        experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
        if experiment is None:
            artifacts = None
            if self.tracking_uri.startswith("sqlite:"):
                artifacts = (Path(cfg.workdir).resolve() / "mlruns").as_uri()
            experiment_id = mlflow.create_experiment(cfg.tracking.experiment, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        nested = mlflow.active_run() is not None
        run = mlflow.start_run(
            run_id=run_id,
            experiment_id=None if run_id else experiment_id,
            run_name=None if run_id else (cfg.tracking.run_name or None),
            nested=nested,
        )
        return run.info.run_id

    def _log_config(self, cfg: Config) -> None:
        params = flatten(to_dict(cfg))
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            self.log_params(dict(items[i : i + 100]))
        self.log_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), "config.yaml")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log numeric metrics at ``step`` (names ``split/name``; NaN is logged as NaN)."""
        if self.enabled:
            now = int(time.time() * 1000)  # the time of the step, however late it is delivered
            from mlflow.entities import Metric, RunTag

            values = {k: float(v) for k, v in metrics.items()}
            batch = [Metric(k, v, now, step) for k, v in values.items()]
            send = partial(self._client.log_batch, self.run_id, metrics=batch, tags=[RunTag(STEP_TAG, str(step))])
            self._outbox.put(Item(send, {"kind": "metrics", "step": step, "timestamp": now, "metrics": values}))

    def log_params(self, params: dict[str, Any]) -> None:
        """Log extra params (e.g. the sharding plan)."""
        if self.enabled:
            from mlflow.entities import Param

            values = {k: str(v)[:500] for k, v in params.items()}
            send = partial(self._client.log_batch, self.run_id, params=[Param(k, v) for k, v in values.items()])
            self._outbox.put(Item(send, {"kind": "params", "params": values}))

    def log_text(self, text: str, name: str) -> None:
        """Write ``text`` as the artifact ``name``."""
        if self.enabled:
            self._log_bytes(text.encode(), name)

    def log_figure(self, figure: Any, name: str) -> None:
        """Save a matplotlib figure as the artifact ``name`` (PNG; drawn now, the figure may close)."""
        if self.enabled:
            png = BytesIO()
            figure.savefig(png, format="png")
            self._log_bytes(png.getvalue(), name)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        """Copy a local file into the run's artifacts."""
        if self.enabled:
            name = f"{folder}/{Path(path).name}" if folder else Path(path).name
            send = partial(self._client.log_artifact, self.run_id, str(path), folder)
            self._outbox.put(Item(send, {"kind": "artifact", "name": name, "file": str(path)}))

    def _log_bytes(self, data: bytes, name: str) -> None:
        send = partial(send_bytes, self._client, self.run_id, data, name)
        self._outbox.put(Item(send, {"kind": "artifact", "name": name}, data))

    def run_url(self) -> str:
        """Where to find the run: its id and tracking store."""
        return f"run {self.run_id} in {self.tracking_uri}" if self.enabled else "tracking disabled"

    @contextmanager
    def following(self, show: bool = True, stream: IO[str] | None = None, poll_s: float = 1.0,
                  line_every_s: float = 30.0) -> Iterator[None]:
        """While the block runs, show the progress that other processes log into this run (the Ray
        driver follows its rank-0 worker): see :class:`ProgressView`. Nothing when ``show`` is False
        or tracking is off.

        Args:
            show: draw at all (``train.progress``).
            stream: where to draw; default ``sys.stderr``.
            poll_s: seconds between reads of the run.
            line_every_s: on a stream that is not a terminal, seconds between progress lines.
        """
        if not (show and self.enabled):
            yield
            return
        view = ProgressView(stream or sys.stderr, line_every_s)
        stop = threading.Event()

        answered = [True]  # the latest read's outcome

        def poll() -> None:
            answered[0] = False
            run = self._client.get_run(self.run_id)
            answered[0] = True
            if STEP_TAG in run.data.tags:
                view.update(int(run.data.tags[STEP_TAG]), run.data.metrics)

        def follow() -> None:
            while not stop.wait(poll_s):
                # A read that fails (a store busy with the workers' writes, a server gone) only
                # delays the view.
                with suppress(Exception):
                    poll()

        thread = threading.Thread(target=follow, name="recmem-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(max(poll_s, 5.0))  # a read hanging on a server that is gone is not waited for
            self._reads_fail = not answered[0] or thread.is_alive()
            if not self._reads_fail:
                with suppress(Exception):
                    poll()
            view.close()

    def close(self, status: str = "FINISHED", flush_s: float = 10.0) -> None:
        """Deliver what is queued (at most ``flush_s`` seconds), end the run this logger started (a
        parent run stays active), and say in one line what did not reach MLflow and where it is."""
        if not self.enabled:
            return
        self._outbox.flush(flush_s)
        active = self._mlflow.active_run()
        if active and active.info.run_id == self.run_id:
            # A store that is down gets one short try; end_run ends the run here before it calls.
            with nullcontext() if self._outbox.answering and not self._reads_fail else one_short_try():
                try:
                    self._mlflow.end_run(status)
                except self._mlflow.exceptions.MlflowException:
                    self._outbox.save_status(status)
        self._outbox.report()


class ProgressView:
    """A training job's progress on the console, fed the step and latest metrics of its run.

    On a terminal: a live line (step, time, loss, samples/s, validation AUC). Elsewhere (a log
    file, CI), where each redraw of a bar would be a line of its own: one line at each new
    validation and otherwise at most one every ``line_every_s`` seconds, plus the last step on close.

    Args:
        stream: where to write.
        line_every_s: seconds between progress lines when ``stream`` is not a terminal.
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, stream: IO[str], line_every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream, self.line_every_s, self.clock = stream, line_every_s, clock
        self.start = self.last_line = clock()
        self.step, self.printed_step, self.metrics = 0, 0, {}
        is_tty = getattr(stream, "isatty", lambda: False)()
        # Redrawn on each update (they come at most once a poll), and on each poll for the clock. No
        # rate of its own: steps arrive in jumps of train.log_every; the workers' samples/s is exact.
        self.bar = tqdm(desc="train", file=stream, dynamic_ncols=True, mininterval=0, miniters=1,
                        bar_format="{desc}: step {n_fmt} [{elapsed}{postfix}]") if is_tty else None

    def update(self, step: int, metrics: dict[str, float]) -> None:
        """The run is at ``step`` with these latest metrics (``train/loss``, ``valid/auc``, ...)."""
        new_validation = metrics.get("valid/auc") != self.metrics.get("valid/auc")
        self.step, self.metrics = step, dict(metrics)
        if self.bar is not None:
            self.bar.set_postfix_str(self._summary(), refresh=False)
            if step > self.bar.n:
                self.bar.update(step - self.bar.n)
            else:
                self.bar.refresh()
        elif step > self.printed_step and (new_validation or self.clock() - self.last_line >= self.line_every_s):
            self._line()

    def close(self) -> None:
        """Finish the bar, or write the last step's line if it has none yet."""
        if self.bar is not None:
            self.bar.close()
        elif self.step > self.printed_step:
            self._line()

    def _summary(self) -> str:
        m = self.metrics
        parts = [f"loss {m['train/loss']:.4f}" if "train/loss" in m else "",
                 f"{m['train/samples_per_second']:,.0f} samples/s" if "train/samples_per_second" in m else "",
                 f"valid AUC {m['valid/auc']:.4f}" if "valid/auc" in m else ""]
        return ", ".join(p for p in parts if p)

    def _line(self) -> None:
        elapsed = tqdm.format_interval(self.clock() - self.start)
        summary = ", ".join(p for p in (f"step {self.step}", self._summary()) if p)
        print(f"train: {summary} ({elapsed})", file=self.stream, flush=True)
        self.printed_step, self.last_line = self.step, self.clock()
