"""The one object through which rank 0 talks to MLflow, the console and artifact files."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Metric, Param

from recmem.config import Config, to_dict


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


class RunLogger:
    """MLflow run for one training job; a no-op shell when tracking is disabled or on ranks > 0.

    An MLflow run that is already active (a notebook, a parent pipeline) is kept: this run nests under
    it instead of failing or hijacking it. ``run_id`` lets a resumed job continue the same run.

    Args:
        cfg: the resolved job config (logged as params and as a YAML artifact).
        enabled: False for a silent logger (ranks > 0, tests).
        run_id: an MLflow run to continue (from a checkpoint), or None for a new run.
    """

    def __init__(self, cfg: Config, enabled: bool = True, run_id: str | None = None) -> None:
        self.enabled = enabled and cfg.tracking.enabled
        self.run_id: str | None = None
        self.tracking_uri = ""
        if not self.enabled:
            return
        import mlflow

        self._mlflow = mlflow
        self.tracking_uri = cfg.tracking.tracking_uri or default_tracking_uri(cfg.workdir)
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
        self.run_id = run.info.run_id
        self._client = mlflow.MlflowClient(self.tracking_uri)
        if run_id is None:
            self._log_config(cfg)

    def _log_config(self, cfg: Config) -> None:
        params = flatten(to_dict(cfg))
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            self.log_params(dict(items[i : i + 100]))
        self.log_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), "config.yaml")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log numeric metrics at ``step`` (names ``split/name``)."""
        if self.enabled:
            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v == v]  # drop NaN
            self._client.log_batch(self.run_id, metrics=batch)

    def log_params(self, params: dict[str, Any]) -> None:
        """Log extra params (e.g. the sharding plan)."""
        if self.enabled:
            self._client.log_batch(self.run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])

    def log_text(self, text: str, name: str) -> None:
        """Write ``text`` as the artifact ``name``."""
        if self.enabled:
            self._client.log_text(self.run_id, text, name)

    def log_figure(self, figure: Any, name: str) -> None:
        """Save a matplotlib figure as the artifact ``name`` (PNG)."""
        if self.enabled:
            self._client.log_figure(self.run_id, figure, name)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        """Copy a local file into the run's artifacts."""
        if self.enabled:
            self._client.log_artifact(self.run_id, str(path), folder)

    def run_url(self) -> str:
        """Where to find the run: its id and tracking store."""
        return f"run {self.run_id} in {self.tracking_uri}" if self.enabled else "tracking disabled"

    def close(self, status: str = "FINISHED") -> None:
        """End the run this logger started (a parent run stays active)."""
        if self.enabled and self._mlflow.active_run() and self._mlflow.active_run().info.run_id == self.run_id:
            self._mlflow.end_run(status)
