"""What a run prints: library chatter off unless ``tracking.verbose``, recmem's progress drawn by the
process that owns the console, and a worker's error still shown.

The quickstart-sized check of a whole Ray run's output (short, with its summary) rides on the
``ray job submit`` test, which already pays for that run.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from recmem.config import load_config
from recmem.tracking.logger import ProgressView, RunLogger, quiet_libraries
from tests.conftest import small_schema


@pytest.fixture
def restored_logging(monkeypatch):
    """Undo ``quiet_libraries``' process-wide changes after the test."""
    monkeypatch.setenv("MLFLOW_CONFIGURE_LOGGING", os.environ.get("MLFLOW_CONFIGURE_LOGGING", "true"))
    root = logging.getLogger()
    names = ("mlflow", "fbgemm_gpu", "torchrec", "ray._private.authentication")
    levels = {name: logging.getLogger(name).level for name in names}
    filters = {target: list(target.filters) for target in (root, *root.handlers)}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    for target, kept in filters.items():
        target.filters[:] = kept


def _record(path: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("root", level, path, 1, "message", None, None)


def test_quiet_libraries_drops_library_info_but_keeps_recmem_and_warnings(restored_logging):
    import fbgemm_gpu

    fbgemm_file = str(Path(fbgemm_gpu.__file__).parent / "split_table_batched_embeddings_ops_training.py")
    with warnings.catch_warnings():
        quiet_libraries()
        quiet_libraries()  # idempotent: one filter
        root = logging.getLogger()
        assert sum(type(f).__name__ == "_LibraryInfoFilter" for f in root.filters) == 1
        assert not root.filter(_record(fbgemm_file))  # fbgemm's logging.info: "Successfully loaded ..."
        assert root.filter(_record(fbgemm_file, logging.WARNING))
        assert root.filter(_record(__file__))  # a print routed through the root logger (Ray Train)
        assert logging.getLogger("mlflow").getEffectiveLevel() == logging.WARNING
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_libraries()  # re-adds its filters above "always"
            warnings.warn_explicit("library note", UserWarning, "x.py", 1, module="torchrec.distributed")
            warnings.warn("recmem's own warning", UserWarning)
        assert [str(w.message) for w in caught] == ["recmem's own warning"]


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_off_a_terminal_is_a_few_lines_with_each_validation():
    out, clock = io.StringIO(), _Clock()
    view = ProgressView(out, line_every_s=30.0, clock=clock)
    metrics = {"train/loss": 0.5, "train/samples_per_second": 20_000.0}
    for second in range(1, 101):  # a step per second; a validation at step 50
        clock.now = float(second)
        if second == 50:
            metrics["valid/auc"] = 0.75
        view.update(second, metrics)
    view.close()
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["train: step 30", "train: step 50", "train: step 80",
                                                      "train: step 100"]
    assert lines[-1] == "train: step 100, loss 0.5000, 20,000 samples/s, valid AUC 0.7500 (01:40)"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_is_one_redrawn_bar():
    out = _Terminal()
    view = ProgressView(out)
    for step in (20, 40, 40):
        view.update(step, {"train/loss": 0.5, "valid/auc": 0.7})
    view.close()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.count("\r") >= 3
    assert text.rstrip().endswith("train: step 40 [00:00, loss 0.5000, valid AUC 0.7000]"), repr(text)


def test_the_driver_follows_what_rank_0_logs_into_the_run(tmp_path):
    cfg = load_config(None, [f"workdir={tmp_path}", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"])
    log, out = RunLogger(cfg), io.StringIO()
    try:
        with log.following(stream=out, poll_s=0.05, line_every_s=0.0):
            log.log_metrics({"train/loss": 0.5, "train/samples_per_second": 1000.0}, step=20)
            deadline = time.monotonic() + 30
            while "step 20" not in out.getvalue() and time.monotonic() < deadline:
                time.sleep(0.05)
            log.log_metrics({"valid/auc": 0.71}, step=24)
    finally:
        log.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("train: step 20, loss 0.5000, 1,000 samples/s (")
    assert lines[-1].startswith("train: step 24, loss 0.5000, 1,000 samples/s, valid AUC 0.7100 (")


@pytest.mark.slow
def test_an_error_inside_a_ray_worker_reaches_the_console(ray_cluster, tiny_root, tmp_path):
    """A config error only the worker finds (a table option) shows once, as one line, with nothing of
    fbgemm's or Ray Train's own lines around it (no traceback) and without a retry."""
    import ray

    schema = small_schema()
    command = [
        sys.executable, "-m", "recmem.cli", "train",
        f"workdir={tmp_path}", f"data.root={tiny_root}", "data.batch_size=256",
        f"data.schema.dense={schema.dense}", f"data.schema.sparse={schema.sparse}",
        "model.bottom_mlp=[32,8]", "model.top_mlp=[32,1]", "model.tables.0.embedding_dim=8",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        f"ray.address={ray.get_runtime_context().gcs_address}", "ray.max_failures=2",
        "model.tables.0.options={bogus: 1}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-4000:]
    assert output.count("model.tables.0.options.bogus: unknown key") == 1, output[-4000:]
    assert "recmem train: error: model.tables.0.options.bogus: unknown key" in output, output[-4000:]
    for chatter in ("Successfully loaded", "[TBE=", "Reporting training result", "Started training worker group",
                    "Traceback", "restarting the workers"):
        assert chatter not in output, output[-4000:]


@pytest.mark.parametrize("verbose", [False, True])
def test_an_embedded_ray_quiets_every_process_it_starts(monkeypatch, tmp_path, verbose):
    """Ray Train's controller and helper actors log from processes recmem's code never runs in: the
    embedded instance gives each of them quiet_libraries as its setup hook (not when verbose), and
    starts without the dashboard."""
    import ray

    from recmem.train.distributed.launcher import _init_ray

    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    assert _init_ray(load_config(None, [f"workdir={tmp_path}", f"tracking.verbose={str(verbose).lower()}"]))
    (kwargs,) = calls
    hook = kwargs["runtime_env"].get("worker_process_setup_hook")
    assert kwargs["address"] == "local" and kwargs["include_dashboard"] is False
    assert hook is None if verbose else hook == "recmem.tracking.logger.quiet_libraries"
    module, _, name = "recmem.tracking.logger.quiet_libraries".rpartition(".")
    assert getattr(__import__(module, fromlist=[name]), name) is quiet_libraries
