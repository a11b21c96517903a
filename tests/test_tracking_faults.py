"""An MLflow tracking server that is not there, or dies mid-run, costs seconds, never the training.

Unreachable at start: ``recmem train`` fails in seconds with one line (single process and Ray). Killed
mid-run: training goes on, checkpoints are written, the run ends normally after a bounded wait, and
every metric value logged is either in the server's store or in the workdir's undelivered file, from
which it reaches the same run once the server is back; a resume continues that run. NaN metrics are
stored as NaN by the SQLite and the REST store.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from recmem.tracking.logger import RunLogger
from recmem.tracking.outbox import Item, Outbox, deliver_saved
from tests.conftest import small_schema, tiny_config
from tests.ranks import free_port

REPO = Path(__file__).resolve().parents[1]
NOWHERE = "http://127.0.0.1:9/"  # the discard port: nothing listens there


def _train_command(root: Path, workdir: Path, *overrides: str) -> list[str]:
    schema = small_schema()
    return [sys.executable, "-m", "recmem.cli", "train", f"workdir={workdir}", f"data.root={root}",
            "data.batch_size=256", f"data.schema.dense={schema.dense}", f"data.schema.sparse={schema.sparse}",
            "model.bottom_mlp=[32,8]", "model.top_mlp=[32,1]", "model.tables.0.embedding_dim=8",
            "train.progress=false", *overrides]


def _fails_fast_with_one_line(command: list[str], cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": NOWHERE}
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd, env=env)
    seconds = time.monotonic() - start
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 2, output[-3000:]
    assert seconds < 30, f"{seconds:.0f} s"
    assert output.splitlines() == [output], output[-3000:]
    assert output.startswith(f"recmem train: error: MLflow tracking server {NOWHERE} does not answer"), output
    assert not (cwd / "w" / "checkpoints").exists()


def test_an_unreachable_server_fails_a_single_process_run_in_seconds(tiny_root, tmp_path):
    _fails_fast_with_one_line(_train_command(tiny_root, tmp_path / "w", "ray.enabled=false"), tmp_path)


@pytest.mark.slow
def test_an_unreachable_server_fails_a_ray_run_before_ray_is_used(ray_cluster, tiny_root, tmp_path):
    import ray

    address = f"ray.address={ray.get_runtime_context().gcs_address}"
    _fails_fast_with_one_line(_train_command(tiny_root, tmp_path / "w", address), tmp_path)


class _Server:
    """``mlflow server`` on a free loopback port over a SQLite file in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.db = f"sqlite:///{folder / 'server.db'}"
        self.uri = f"http://127.0.0.1:{free_port()}"
        self.folder = folder
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        port = self.uri.rsplit(":", 1)[1]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.db, "--host", "127.0.0.1",
             "--port", port, "--workers", "1", "--artifacts-destination", str(self.folder / "artifacts")],
            cwd=self.folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1):
                    return
            except OSError:
                assert self.process.poll() is None, "mlflow server exited"
                time.sleep(0.2)
        raise TimeoutError(f"mlflow server at {self.uri} did not start")

    def kill(self) -> None:
        """SIGKILL the server and its workers, as a crash or a lost machine would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def mlflow_server(tmp_path):
    server = _Server(tmp_path / "server")
    server.folder.mkdir()
    server.start()
    yield server
    server.kill()


def _history(uri: str, run_id: str, key: str) -> dict[int, float]:
    import mlflow

    return {m.step: m.value for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key)}


@pytest.mark.slow
def test_a_server_killed_mid_run_costs_seconds_and_no_metric(mlflow_server, tiny_root, tmp_path, capfd):
    import mlflow

    from recmem.train.local import local_source
    from recmem.train.loop import train

    cfg = tiny_config(tiny_root, tmp_path / "w", "ray.enabled=false", "train.epochs=2", "train.log_every=5",
                      "train.eval_every=5", "train.checkpoint_every=10", f"tracking.tracking_uri={mlflow_server.uri}")
    batches, killed_at = local_source(cfg), []

    def source(split, epoch, start):
        for i, batch in enumerate(batches(split, epoch, start)):
            if split == "train" and epoch == 0 and i == 12 and not killed_at:
                # Steps 5 and 10 (a validation each, with a NaN metric) reached the server first.
                run_id = mlflow.active_run().info.run_id
                deadline = time.monotonic() + 20
                while 10 not in _history(mlflow_server.uri, run_id, "test/nan") and time.monotonic() < deadline:
                    time.sleep(0.05)
                mlflow_server.kill()
                killed_at.append(time.monotonic())
            yield batch

    result = train(cfg, source, extra_metrics=lambda: {"test/nan": math.nan})
    delay = time.monotonic() - killed_at[0]
    err = capfd.readouterr().err
    run_id = result.run.split()[1]
    spool = tmp_path / "w" / f"mlflow-undelivered-{run_id}.jsonl"

    assert result.step == 46 and result.metrics["valid/auc"] > 0.6  # training went on: 2 epochs of 23
    checkpoints = (Path(cfg.workdir) / cfg.train.checkpoint_dir).glob("step-*.pt")
    assert max(int(p.stem.split("-")[1]) for p in checkpoints) == 46
    assert delay < 30, f"the run ended {delay:.0f} s after the server died"
    assert f"did not reach MLflow at {mlflow_server.uri}; saved in {spool}" in err, err
    print(f"the run ended {delay:.1f} s after the server died")
    server_store = mlflow_server.db  # read directly: the server is dead
    assert _history(server_store, run_id, "test/nan") == {5: pytest.approx(math.nan, nan_ok=True),
                                                           10: pytest.approx(math.nan, nan_ok=True)}

    # Every value logged is in the server's store or in the undelivered file, which delivers it.
    mlflow_server.start()
    assert deliver_saved(spool) > 0
    logged = set(range(5, 47, 5)) | {46}  # train/loss every 5 steps; validation at 46 too
    assert set(_history(mlflow_server.uri, run_id, "valid/auc")) == logged
    assert set(_history(mlflow_server.uri, run_id, "train/loss")) == set(range(5, 46, 5))
    run = mlflow.MlflowClient(mlflow_server.uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in mlflow.MlflowClient(mlflow_server.uri).list_artifacts(run_id)}
    assert {"config.yaml", "training_curve.png"} <= artifacts

    # A resume, with the server back, continues the same MLflow run.
    more = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=3, max_steps=50))
    resumed = train(more, local_source(more))
    assert resumed.run == result.run and resumed.step == 50
    assert 50 in _history(mlflow_server.uri, run_id, "train/loss")


def test_nan_metrics_are_stored_as_nan(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path)
    log = RunLogger(cfg)
    log.log_metrics({"train/loss": math.nan, "train/samples_per_second": 10.0}, step=3)
    log.close()
    assert math.isnan(_history(log.tracking_uri, log.run_id, "train/loss")[3])


def test_a_failing_server_is_given_up_in_bounded_time_and_nothing_is_lost(tmp_path):
    """The outbox alone, against a server that refuses every call: steps never wait on it, it gives
    up after its retry budget, and what it held is in the undelivered file."""
    lines: list[str] = []

    def refuse() -> None:
        raise ConnectionError("refused")

    outbox = Outbox("http://127.0.0.1:9", "run1", tmp_path, retry_s=0.5, say=lines.append)
    start = time.monotonic()
    for step in range(100):
        outbox.put(Item(refuse, {"kind": "metrics", "step": step, "timestamp": 0, "metrics": {"a": 1.0}}))
    assert time.monotonic() - start < 0.5  # no step waits for the server
    deadline = time.monotonic() + 10
    while not any("gave no answer" in line for line in lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    outbox.put(Item(refuse, {"kind": "metrics", "step": 100, "timestamp": 0, "metrics": {"a": math.nan}}))
    outbox.flush(timeout_s=5)
    outbox.report()
    saved = (tmp_path / "mlflow-undelivered-run1.jsonl").read_text().splitlines()
    assert len(saved) == 101 and '"a": NaN' in saved[-1]
    assert "101 metric values (steps 0-100)" in lines[-1], lines
