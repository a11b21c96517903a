"""The prediction server: over HTTP it answers as the trainer for every kind, counts what it does,
applies deltas atomically, swaps versions (a delta, a moved alias) without failing a request, and
refuses bad input by name. (Malformed-input fuzzing: ``test_serve_fuzz.py``; Ray Serve, Ray-trained
models and the registry flow: ``test_serve_deploy.py``.)"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from recmem.serve.http import ModelHTTPServer
from recmem.serve.limits import Limits
from recmem.serve.service import ModelService, Served
from recmem.serve.source import AliasWatcher
from recmem.serving import load_bundle
from tests.test_serving_bundle import _raw_rows, _valid_batch, trained  # noqa: F401 (the fixture)


@contextlib.contextmanager
def serving(service: ModelService) -> Iterator[int]:
    """``service`` behind the embedded HTTP server on a free loopback port; yields the port."""
    server = ModelHTTPServer(("127.0.0.1", 0), service)
    thread = server.start()
    try:
        yield server.port
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def call(port: int, method: str, path: str, body: Any = None, raw: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One request on a new connection: (status, the JSON answer, or text for /metrics)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, data, headers or {})
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    return response.status, (text if path == "/metrics" else json.loads(text))


def _delta_for(bundle, feature: str, ids: list[int], value: float, version: str) -> dict:
    """A delta setting ``feature``'s rows of ``ids`` to ``value``: raw IDs for a keyed table, else their
    stored rows (id mod n), at the stored row width."""
    f = bundle.feature_names.index(feature)
    table, rows = bundle.manifest["tables"][f], bundle._lookups[f].rows
    if table["lookup"] != "keyed":
        ids = sorted({i % len(rows) for i in ids})
    return {"base_version": bundle.version, "version": version,
            "tables": {feature: {"ids": ids, "rows": [[value] * rows.width for _ in ids]}}}


def _once(cfg) -> None:
    """Kind-independent tests run on the ``full`` model only."""
    if cfg.model.tables[0].kind != "full" or cfg.model.tables[0].options:
        pytest.skip("kind-independent: runs on the full model only")


def test_http_answers_as_the_trainer(trained):
    cfg, model, folder = trained
    batch = _valid_batch(cfg, 300)
    with torch.no_grad():
        expected = torch.sigmoid(model(batch)).numpy()
    with serving(ModelService("ctr", Served(load_bundle(folder)))) as port:
        status, answer = call(port, "POST", "/predict", {"rows": _raw_rows(batch, cfg)})
    assert status == 200, answer
    assert answer["model"] == "ctr" and answer["version"] == folder.name and "registry_version" not in answer
    assert np.abs(np.array(answer["probabilities"]) - expected).max() <= 1e-5


def test_health_metrics_and_routes(trained):
    cfg, _, folder = trained
    _once(cfg)
    service = ModelService("ctr", Served(load_bundle(folder), "3"))
    rows = _raw_rows(_valid_batch(cfg, 5), cfg)
    with serving(service) as port:
        assert call(port, "GET", "/health") == (200, {"status": "ok", "model": "ctr", "version": folder.name,
                                                      "registry_version": "3"})
        assert call(port, "POST", "/predict", {"rows": rows})[0] == 200
        assert call(port, "POST", "/predict", {"rows": rows[:2]})[0] == 200
        assert call(port, "POST", "/predict", {"rows": [{"nope": 1}]})[0] == 400
        assert call(port, "GET", "/predict")[0] == 405 and call(port, "GET", "/nothing")[0] == 404
        assert call(port, "POST", "/health", {})[0] == 405
        status, text = call(port, "GET", "/metrics")
    assert status == 200
    assert 'recmem_serve_requests_total{endpoint="predict",status="200"} 2.0' in text
    assert 'recmem_serve_errors_total{endpoint="predict",status="400"} 1.0' in text
    assert 'recmem_serve_latency_seconds_count{endpoint="predict"} 3.0' in text
    assert "recmem_serve_rows_per_request_sum 7.0" in text and "recmem_serve_rows_per_request_count 2.0" in text
    assert f'recmem_serve_model_info{{model="ctr",registry_version="3",version="{folder.name}"}} 1.0' in text


def test_delta_applies_atomically_and_a_stale_base_is_409(trained):
    cfg, _, folder = trained
    bundle = load_bundle(folder)
    feature = cfg.data.schema.sparse[0]
    rows = _raw_rows(_valid_batch(cfg, 8), cfg)
    service = ModelService("ctr", Served(bundle))
    with serving(service) as port:
        before = call(port, "POST", "/predict", {"rows": rows})[1]["probabilities"]
        delta = _delta_for(bundle, feature, [rows[0][feature]], 3.0, "v2")
        assert call(port, "POST", "/delta", delta) == (200, {"model": "ctr", "version": "v2", "base_version": folder.name})
        after = call(port, "POST", "/predict", {"rows": rows})[1]
        assert after["version"] == "v2"
        if bundle.manifest["tables"][0]["lookup"] in ("keyed", "modulo"):  # row 0's own row changed
            assert after["probabilities"][0] != pytest.approx(before[0], abs=1e-6)
        assert after["probabilities"] == pytest.approx(bundle.apply_delta(delta).predict(rows), abs=0)
        status, answer = call(port, "POST", "/delta", delta)  # its base is gone now
        assert status == 409 and folder.name in answer["error"] and "v2" in answer["error"]
        bad = {**_delta_for(service.served.bundle, feature, [1], 0.0, "v3"), "tables": {"nope": {}}}
        assert call(port, "POST", "/delta", bad)[0] == 400
        assert call(port, "POST", "/predict", {"rows": rows})[1] == after  # refused deltas changed nothing


def test_swaps_under_load_fail_no_request(trained):
    """A client sends requests throughout while the model is swapped back and forth (a registry move)
    and deltas land: every request answers 200, from one version or the other."""
    cfg, _, folder = trained
    _once(cfg)
    old = load_bundle(folder)
    new = old.apply_delta(_delta_for(old, cfg.data.schema.sparse[1], [1, 2, 3], 0.5, "new"))
    rows = _raw_rows(_valid_batch(cfg, 16), cfg)
    service = ModelService("ctr", Served(old, "1"))
    seen, failures, stop = set(), [], threading.Event()
    expected = {"old": old.predict(rows), "new": new.predict(rows)}

    def client(port: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while not stop.is_set():
            conn.request("POST", "/predict", json.dumps({"rows": rows}).encode())
            response = conn.getresponse()
            answer = json.loads(response.read())
            if response.status != 200:
                failures.append(answer)
                continue
            key = "old" if answer["registry_version"] == "1" else "new"
            seen.add(key)
            if answer["probabilities"] != expected[key]:
                failures.append(("mixed answer", answer["version"]))

    with serving(service) as port:
        threads = [threading.Thread(target=client, args=(port,)) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            service.swap(Served(new, "2"))
            time.sleep(0.05)
            service.swap(Served(old, "1"))
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join()
    assert not failures and seen == {"old", "new"}


def test_alias_watcher_swaps_to_the_version_the_alias_names(trained, tmp_path):
    cfg, _, folder = trained
    _once(cfg)
    other = load_bundle(folder).apply_delta({"base_version": folder.name, "version": "other"})
    registry = {"alias": "1"}
    folders = {"1": folder, "2": folder}

    def alias_version(name, alias, uri):
        if registry["alias"] == "down":
            raise ConnectionError("tracking server down")
        return registry["alias"]

    def fetch(name, alias, dest, uri):
        return registry["alias"], folders[registry["alias"]]

    service = ModelService("ctr", Served(other, "1"))
    watcher = AliasWatcher(service, "ctr", "champion", tmp_path, None, 0.05, alias_version, fetch)
    assert not watcher.check() and service.served.bundle is other
    registry["alias"] = "2"
    assert watcher.check() and service.served.registry_version == "2"
    assert service.served.bundle.version == folder.name
    registry["alias"] = "down"  # the poller keeps serving through registry errors
    watcher.start()
    time.sleep(0.3)
    registry["alias"] = "1"
    deadline = time.monotonic() + 10
    while service.served.registry_version != "1" and time.monotonic() < deadline:
        time.sleep(0.05)
    watcher.stop()
    assert service.served.registry_version == "1"


def test_limits_are_configurable(trained):
    cfg, _, folder = trained
    _once(cfg)
    rows = _raw_rows(_valid_batch(cfg, 5), cfg)
    service = ModelService("ctr", Served(load_bundle(folder)), Limits(max_body_bytes=2000, max_rows=3, max_bag=2))
    with serving(service) as port:
        status, answer = call(port, "POST", "/predict", {"rows": rows[:4]})
        assert status == 413 and "'rows'" in answer["error"] and "limit of 3" in answer["error"]
        status, answer = call(port, "POST", "/predict", raw=b"{" + b" " * 3000 + b"}")
        assert status == 413 and "limit of 2,000" in answer["error"]
        bag = {**rows[0], cfg.data.schema.sparse[2]: [1, 2, 3]}
        status, answer = call(port, "POST", "/predict", {"rows": [bag]})
        assert status == 400 and cfg.data.schema.sparse[2] in answer["error"] and "row 0" in answer["error"]
        assert call(port, "POST", "/predict", {"rows": rows[:3]})[0] == 200


def test_recmem_serve_command(trained, tmp_path):
    """``recmem serve --bundle`` in its own process: it listens, answers, and stops on SIGTERM."""
    import subprocess
    import sys

    cfg, _, folder = trained
    _once(cfg)
    proc = subprocess.Popen([sys.executable, "-m", "recmem.cli", "serve", "--bundle", str(folder), "--port", "0",
                             "--name", "ctr", f"workdir={tmp_path}"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "on http://127.0.0.1:" in line, line + proc.stderr.read()
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        status, answer = call(port, "POST", "/predict", {"rows": _raw_rows(_valid_batch(cfg, 2), cfg)})
        assert status == 200 and len(answer["probabilities"]) == 2 and answer["model"] == "ctr"
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
