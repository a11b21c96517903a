"""Delivery of rank 0's metrics, params and artifacts to MLflow, so that a tracking server that stops
answering never stops training.

A local store (SQLite, files) is written inline, as it always was. A tracking server (``http(s)://``)
is written by a background thread from an ordered queue, so a step only appends to a list. When the
server fails, the head of the queue is retried with backoff while the steps go on; after
``retry_s`` seconds of failures the outbox gives up on the server for the rest of the run. At the
end, ``flush`` waits a bounded time for the queue to drain (one more try for a server that is down).
Whatever did not reach MLflow is saved to ``<workdir>/mlflow-undelivered-<run id>.jsonl`` (artifacts
in a folder of that name) and counted in one line on stderr; ``python -m recmem.tracking.outbox
FILE`` delivers it to the same run later.

Before a run opens, :func:`check_server` asks a tracking server for any answer with a short timeout,
and :func:`bound_http_retries` caps MLflow's own HTTP retries (by default 7, with exponential backoff:
about four minutes of silence per call against a server that is down).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import ssl
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",  # two retries: 0 s, then 1 s + jitter apart
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",  # seconds per connect or read, not per upload
}
"""MLflow's HTTP settings while recmem tracks to a server, unless the environment sets them."""


class TrackingUnavailable(ConnectionError):
    """The tracking server cannot take the run: unreachable, or refusing it (the message says which)."""


def is_server(uri: str) -> bool:
    """True for a tracking server reached over HTTP (where a call can hang), False for a local store."""
    return uri.startswith(("http://", "https://"))


def bound_http_retries() -> None:
    """Cap MLflow's HTTP retries and timeouts in this process (:data:`HTTP_LIMITS`); a variable
    already set wins. MLflow reads them on every request, so this holds for calls made afterwards."""
    for name, value in HTTP_LIMITS.items():
        os.environ.setdefault(name, value)


@contextmanager
def one_short_try(timeout_s: int = 2) -> Iterator[None]:
    """MLflow HTTP calls in the block get one attempt of at most ``timeout_s`` seconds per connect
    or read: for the last call of a run whose server is known to be down. Process-wide while it
    lasts (MLflow has no per-call setting), so only for a moment when no other thread calls MLflow."""
    names = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    before = {name: os.environ.get(name) for name in names}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(timeout_s))
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def check_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fail within ``timeout_s`` when the tracking server at ``uri`` does not answer; a local store
    (SQLite, files) passes without a look. Any HTTP answer counts (an error page too: what it means
    is MLflow's to say on the first call), and so does a TLS certificate this check does not trust
    (MLflow's own settings, such as ``MLFLOW_TRACKING_INSECURE_TLS``, decide about it).

    Raises:
        TrackingUnavailable: nothing answered at ``uri`` in time.
    """
    if not is_server(uri):
        return
    start = time.monotonic()
    try:
        with urllib.request.urlopen(uri, timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as e:  # URLError, refused, timed out, a malformed address
        reason = getattr(e, "reason", e)
        if isinstance(reason, ssl.SSLError):
            return
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} does not answer ({reason}; {time.monotonic() - start:.1f} s): start it, "
            "point tracking.tracking_uri or MLFLOW_TRACKING_URI at one that runs, or set tracking.enabled=false"
        ) from None


@dataclass
class Item:
    """One write to MLflow: how to send it, and what to save instead when it cannot be sent.

    Args:
        send: the MLflow call.
        record: JSON-ready description (``kind``: metrics, params, artifact or status).
        data: an artifact's bytes (a local file's path is ``record["file"]``).
    """

    send: Callable[[], None]
    record: dict[str, Any]
    data: bytes | None = None


class Outbox:
    """The queue between rank 0's logging calls and the MLflow run ``run_id``.

    Args:
        tracking_uri: the store; a server is written in the background, a local store inline.
        run_id: the run every item belongs to.
        workdir: where what was not delivered is saved.
        retry_s: seconds of failed attempts after which the server is given up for the run.
        say: writes one line for the user (default: stderr).
    """

    def __init__(self, tracking_uri: str, run_id: str, workdir: str | Path, retry_s: float = 60.0,
                 say: Callable[[str], None] | None = None) -> None:
        self.tracking_uri, self.run_id, self.retry_s = tracking_uri, run_id, retry_s
        self.spool = Path(workdir) / f"mlflow-undelivered-{run_id}.jsonl"
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.saved: list[dict[str, Any]] = []
        self._queue: deque[Item] = deque()
        self._cond = threading.Condition()
        self._down_since: float | None = None
        self._closing = self._gave_up = self._abandoned = self._stuck = False
        self._thread: threading.Thread | None = None
        if is_server(tracking_uri):
            self._thread = threading.Thread(target=self._deliver, name="recmem-mlflow-outbox", daemon=True)
            self._thread.start()
            atexit.register(self._at_exit)  # a run that raises still sends, or saves, what it logged

    @property
    def answering(self) -> bool:
        """False once the store failed and has not answered since (or a call hangs in it)."""
        return self._down_since is None and not (self._gave_up or self._stuck)

    def put(self, item: Item) -> None:
        """Send ``item`` now (local store) or queue it (server); never raises for MLflow's failures."""
        if self._thread is None:
            try:
                item.send()
            except Exception as e:  # a locked or full local store: keep the item, keep training
                first, self._down_since = not self.saved, time.monotonic()
                self._save([item])
                if first:
                    self.say(f"recmem: MLflow store {self.tracking_uri} failed ({short_reason(e)}); "
                             f"what it does not take goes to {self.spool}")
            else:
                self._down_since = None
            return
        with self._cond:
            if self._gave_up or self._abandoned:
                self._save([item])
                return
            self._queue.append(item)
            self._cond.notify()

    def flush(self, timeout_s: float = 10.0) -> None:
        """Stop taking items and wait at most ``timeout_s`` for the queue to drain; a server that
        fails now gets no more retries. What is left is saved. Idempotent."""
        if self._thread is None or self._abandoned:
            return
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout_s)
        self._stuck = self._thread.is_alive()
        with self._cond:
            self._abandoned = True  # an answer still in flight is not waited for (it may arrive twice)
            self._save(list(self._queue))
            self._queue.clear()
        atexit.unregister(self._at_exit)

    def report(self) -> None:
        """One line on what was saved instead of delivered, if anything was."""
        if not self.saved:
            return
        steps = [r["step"] for r in self.saved if r["kind"] == "metrics"]
        values = sum(len(r.get("metrics", ())) for r in self.saved)
        what = [f"{values} metric values (steps {min(steps)}-{max(steps)})"] if steps else []
        what += [r["name"] for r in self.saved if r["kind"] == "artifact"]
        what += ["params"] * any(r["kind"] == "params" for r in self.saved)
        what += [f"run status {r['status']}" for r in self.saved if r["kind"] == "status"]
        self.say(f"recmem: {', '.join(what)} did not reach MLflow at {self.tracking_uri}; saved in {self.spool} "
                 f"(`python -m recmem.tracking.outbox {self.spool}` delivers them to run {self.run_id})")

    def save_status(self, status: str) -> None:
        """Record the run's end status, which the server did not take."""
        self._save([Item(lambda: None, {"kind": "status", "status": status})])

    def _at_exit(self) -> None:
        self.flush()
        self.report()

    def _deliver(self) -> None:
        delay = 0.5
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue or self._abandoned:
                    return
                item = self._queue[0]
            try:
                item.send()
            except Exception as e:
                if self._failed(e):
                    return
                with self._cond:
                    if not self._closing:
                        self._cond.wait(delay)  # close() wakes it for one last try
                delay = min(2 * delay, 10.0)
                continue
            with self._cond:
                if self._abandoned:
                    return
                self._queue.popleft()
            if self._down_since is not None:
                self.say(f"recmem: MLflow at {self.tracking_uri} answers again after "
                         f"{time.monotonic() - self._down_since:.0f} s")
                self._down_since, delay = None, 0.5

    def _failed(self, error: Exception) -> bool:
        """Note a failed attempt; True when the server is given up (everything queued is saved)."""
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            if not self._closing:
                self.say(f"recmem: MLflow at {self.tracking_uri} stopped answering ({short_reason(error)}); "
                         f"training goes on, tracking retries for {self.retry_s:.0f} s")
        if not (self._closing or now - self._down_since > self.retry_s):
            return False
        with self._cond:
            self._gave_up = True
            self._save(list(self._queue))
            self._queue.clear()
        if not self._closing:
            self.say(f"recmem: MLflow at {self.tracking_uri} gave no answer for {self.retry_s:.0f} s: "
                     f"the rest of this run's tracking goes to {self.spool}")
        return True

    def _save(self, items: list[Item]) -> None:
        if not items:
            return
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        folder = self.spool.with_suffix("")
        with self.spool.open("a") as f:
            for item in items:
                record = dict(item.record)
                if record["kind"] == "artifact":
                    target = folder / record["name"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if item.data is not None:
                        target.write_bytes(item.data)
                    else:
                        shutil.copyfile(record["file"], target)
                    record["file"] = str(target)
                # NaN stays NaN (a JSON extension Python reads back)
                f.write(json.dumps({"run_id": self.run_id, "tracking_uri": self.tracking_uri, **record}) + "\n")
                self.saved.append(record)


def send_bytes(client: Any, run_id: str, data: bytes, name: str) -> None:
    """Log ``data`` as the artifact ``name`` (``folder/file.ext``) of ``run_id``."""
    folder, _, filename = name.rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / filename
        path.write_bytes(data)
        client.log_artifact(run_id, str(path), folder or None)


def deliver_saved(spool: str | Path, tracking_uri: str | None = None) -> int:
    """Send what an outbox saved in ``spool`` to its run, in order; returns the metric values sent.

    Args:
        spool: a ``mlflow-undelivered-<run id>.jsonl`` file.
        tracking_uri: the store (default: ``MLFLOW_TRACKING_URI``, else the one the run was logging to).
    """
    import mlflow
    from mlflow.entities import Metric, Param

    records = [json.loads(line) for line in Path(spool).read_text().splitlines()]
    if not records:
        return 0
    client = mlflow.MlflowClient(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or records[0]["tracking_uri"])
    sent = 0
    for record in records:
        run_id, kind = record["run_id"], record["kind"]
        if kind == "metrics":
            metrics = [Metric(k, v, record["timestamp"], record["step"]) for k, v in record["metrics"].items()]
            client.log_batch(run_id, metrics=metrics)
            sent += len(metrics)
        elif kind == "params":
            client.log_batch(run_id, params=[Param(k, v) for k, v in record["params"].items()])
        elif kind == "artifact":
            send_bytes(client, run_id, Path(record["file"]).read_bytes(), record["name"])
        elif kind == "status":
            client.set_terminated(run_id, record["status"])
    return sent


def short_reason(error: BaseException) -> str:
    """The cause in a few words: MLflow wraps a refused connection in a paragraph of urllib3's."""
    text = str(error)
    found = re.search(r"\[Errno -?\d+\][^'\"()]*|Read timed out|Connection aborted", text)
    lines = text.strip().splitlines()
    return (found.group(0).strip() if found else lines[0] if lines else type(error).__name__)[:200]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m recmem.tracking.outbox mlflow-undelivered-<run id>.jsonl "
                 "(to the store it was meant for, or MLFLOW_TRACKING_URI)")
    print(f"delivered {deliver_saved(sys.argv[1])} metric values to MLflow")
