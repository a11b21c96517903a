"""The server beyond one process: a model trained on two Ray workers answers over HTTP as the sharded
trainer did, from the embedded server and from the Ray Serve deployment (``deploy/serve/``) alike; and
the registry flow: train -> register -> alias champion -> ``recmem serve --model`` -> a second version
-> the alias moves -> the server answers from it, with no failed request from a client running
throughout."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from recmem.export.job import export_job
from recmem.serve.service import ModelService, Served
from recmem.serving import load_bundle
from tests.conftest import small_schema, tiny_config, tiny_overrides, write_learnable_root
from tests.ranks import free_port
from tests.test_serve import call, serving
from tests.test_serving_bundle import _config, _raw_rows, _valid_batch
from tests.test_serving_ray import COMMON

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ray_trained_model_over_http_and_ray_serve(ray_cluster, tmp_path):
    """One layout (``id``: every kind ID-sharded); the export's own check bounds the bundle against the
    sharded forward on the first 256 validation rows, and both servers answer exactly as the bundle."""
    from ray import serve

    from recmem.train.distributed import train_ray

    root = write_learnable_root(tmp_path / "data", small_schema(), rows=2048, valid=512)
    cfg = tiny_config(root, tmp_path, *COMMON, "ray.sharding=id")
    train_ray(cfg)
    folder = export_job(cfg, tmp_path / "bundles", "fp32")
    bundle = load_bundle(folder)
    assert bundle.manifest["export_check"]["rows"] == 256
    assert bundle.manifest["export_check"]["max_abs_logit_diff"] <= 1e-5
    rows = _raw_rows(_valid_batch(cfg, 256), cfg)  # the rows of the export's check
    expected = bundle.predict(rows)
    with serving(ModelService("ctr", Served(bundle))) as port:
        status, embedded = call(port, "POST", "/predict", {"rows": rows})
    assert status == 200 and embedded["probabilities"] == expected

    sys.path.insert(0, str(ROOT / "deploy" / "serve"))
    try:
        import recmem_deployment
    finally:
        sys.path.remove(str(ROOT / "deploy" / "serve"))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(recmem_deployment.build({"bundle": str(folder), "name": "ctr", "num_cpus": "0", "max_rows": "300"}),
                  name="recmem", route_prefix="/")
        status, answer = call(port, "POST", "/predict", {"rows": rows})
        assert status == 200 and answer == embedded
        assert call(port, "GET", "/health")[1]["version"] == folder.name
        assert call(port, "POST", "/predict", {"rows": rows + rows})[0] == 413
        status, answer = call(port, "POST", "/predict", raw=b'{"rows": [{"I1": NaN}]}')
        assert status == 400 and "NaN" in answer["error"]
        assert "recmem_serve_requests_total" in call(port, "GET", "/metrics")[1]
    finally:
        serve.shutdown()


def _recmem(*argv: str, uri: str, overrides: tuple[str, ...] = ()) -> str:
    """Run a ``recmem`` command in its own process (as a user would; MLflow's process-wide state stays
    out of this one); its stdout."""
    done = subprocess.run([sys.executable, "-m", "recmem.cli", *argv, *overrides, f"tracking.tracking_uri={uri}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=_user_env())
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _user_env() -> dict[str, str]:
    """This environment without ``MLFLOW_TRACKING_URI``: ``train_ray`` leaves the last Ray run's store
    there in the test process, and MLflow would resolve ``models:/`` against it."""
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


class _Client(threading.Thread):
    """Posts ``rows`` on one keep-alive connection until stopped; records every answer's version and any failure."""

    def __init__(self, port: int, rows: list[dict]) -> None:
        super().__init__(daemon=True)
        self.port, self.body = port, json.dumps({"rows": rows}).encode()
        self.answers: dict[str, list[float]] = {}
        self.requests, self.failures = 0, []
        self.stop = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while not self.stop.is_set():
            try:
                conn.request("POST", "/predict", self.body)
                response = conn.getresponse()
                answer = json.loads(response.read())
            except (OSError, http.client.HTTPException, ValueError) as e:
                self.failures.append(repr(e))
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                continue
            self.requests += 1
            if response.status != 200:
                self.failures.append(answer)
            else:
                self.answers.setdefault(answer["registry_version"], answer["probabilities"])


@pytest.mark.slow
def test_registry_flow_moves_the_served_version_with_no_failed_request(tiny_root, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = _config(tiny_root, tmp_path / "train", "full", "train.max_steps=6")
    from recmem.train.local import train_local

    train_local(cfg)
    first = export_job(cfg, tmp_path / "bundles", "fp32")
    data = tuple(tiny_overrides(tiny_root, tmp_path / "cli"))  # the example rows come from the config's data
    assert "registered ctr version 1" in _recmem("register", "--bundle", str(first), "--name", "ctr", uri=uri, overrides=data)
    _recmem("promote", "ctr", "1", "--alias", "champion", uri=uri)
    rows = _raw_rows(_valid_batch(cfg, 32), cfg)

    proc = subprocess.Popen([sys.executable, "-m", "recmem.cli", "serve", "--model", "ctr", "--alias", "champion",
                             "--poll-s", "0.5", "--port", "0", f"workdir={tmp_path / 'server'}",
                             f"tracking.tracking_uri={uri}"], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env=_user_env())
    log: list[str] = []
    try:
        line = proc.stderr.readline()
        log.append(line)
        threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
        assert "on http://127.0.0.1:" in line, line
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        client = _Client(port, rows)
        client.start()

        second_cfg = _config(tiny_root, tmp_path / "train", "full", "train.max_steps=18")  # resumes, trains on
        train_local(second_cfg)
        second = export_job(second_cfg, tmp_path / "bundles", "fp32")
        assert second.name != first.name
        assert "registered ctr version 2" in _recmem("register", "--bundle", str(second), "--name", "ctr", uri=uri, overrides=data)
        _recmem("promote", "ctr", "2", "--alias", "champion", uri=uri)
        deadline = time.monotonic() + 60
        while "2" not in client.answers and time.monotonic() < deadline and not client.failures:
            time.sleep(0.1)
        time.sleep(0.5)  # requests on the new version after the swap
        client.stop.set()
        client.join()
        status, health = call(port, "GET", "/health")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert not client.failures, (client.failures[:3], "".join(log)[-2000:])
    assert set(client.answers) == {"1", "2"} and client.requests > 10
    assert health == {"status": "ok", "model": "ctr", "version": second.name, "registry_version": "2"}
    assert np.allclose(client.answers["1"], load_bundle(first).predict(rows), rtol=0, atol=0)
    assert np.allclose(client.answers["2"], load_bundle(second).predict(rows), rtol=0, atol=0)
    assert any("now serving ctr version 2" in line for line in log)
