"""Latency of the model server over loopback: p50/p99 of 1-row and 256-row requests at low load
(one client, one request at a time) and requests/s at saturation (several clients, keep-alive).

Servers measured: the embedded ``recmem serve`` (standard-library HTTP), its peers Starlette on
uvicorn and aiohttp (``serving_stacks.py``, for the choice of stack), and the Ray Serve deployment
(``deploy/serve/``, one replica on a local Ray). Each runs in its own processes; the load generator
is this process (``http.client``, one persistent connection per client thread), bounded in requests
and in seconds per phase. Rows are the first validation rows of the configured data, as a client
would send them (dense raw, IDs as stored).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from recmem.bench import free_port

ROOT = Path(__file__).resolve().parents[2]
SERVERS = ("embedded", "starlette", "aiohttp", "ray_serve")


def sample_rows(data_root: Path, schema: Any, count: int) -> list[dict[str, Any]]:
    """The first ``count`` validation rows as raw JSON rows (the Parquet's log(1 + x) undone)."""
    import pyarrow.parquet as pq

    part = sorted((data_root / "valid").glob("*.parquet"))[0]
    table = pq.read_table(part, columns=[*schema.dense, *schema.sparse]).slice(0, count).to_pylist()
    return [{k: (float(np.expm1(v)) if k in schema.dense and v is not None else v) for k, v in r.items()}
            for r in table]


def load(port: int, body: bytes, clients: int, max_requests: int, max_seconds: float) -> dict[str, float]:
    """Send ``body`` to ``/predict`` from ``clients`` threads until ``max_requests`` or ``max_seconds``.

    Returns:
        ``{"requests", "failed", "p50_ms", "p99_ms", "rps"}``.
    """
    latencies: list[float] = []
    failed = [0]
    lock, left = threading.Lock(), [max_requests]
    deadline = time.perf_counter() + max_seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        while time.perf_counter() < deadline:
            with lock:
                if left[0] <= 0:
                    break
                left[0] -= 1
            start = time.perf_counter()
            conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            mine.append(time.perf_counter() - start)
            if response.status != 200:
                with lock:
                    failed[0] += 1
        conn.close()
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1e3
    return {"requests": len(ms), "failed": failed[0], "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "rps": len(ms) / elapsed}


def measure(port: int, rows: list[dict[str, Any]], seconds: float, clients: int) -> dict[str, Any]:
    """The three figures of one server: 1-row and 256-row at low load, 1-row at saturation."""
    one, many = (json.dumps({"rows": rows[:n]}).encode() for n in (1, 256))
    load(port, one, 1, 200, seconds)  # warm-up: first calls compile and allocate
    load(port, many, 1, 20, seconds)
    return {"1_row": load(port, one, 1, 5000, seconds), "256_rows": load(port, many, 1, 1000, seconds),
            "saturation_1_row": load(port, one, clients, 50000, seconds),
            "saturation_256_rows": load(port, many, clients, 5000, seconds)}


def _wait_healthy(port: int, proc: subprocess.Popen | None, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"no server answered on port {port} within {seconds:.0f} s")


@contextlib.contextmanager
def running(server: str, bundle: Path) -> Iterator[int]:
    """Start ``server`` on ``bundle`` in processes of its own; yields its port and stops it after."""
    if server == "ray_serve":
        yield from _ray_serve(bundle)
        return
    port = free_port()
    if server == "embedded":
        cmd = [sys.executable, "-m", "recmem.cli", "serve", "--bundle", str(bundle), "--port", str(port)]
    else:
        cmd = [sys.executable, "-m", "recmem.bench.serving_stacks", "--stack", server, "--bundle", str(bundle),
               "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_healthy(port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _ray_serve(bundle: Path) -> Iterator[int]:
    import ray
    from ray import serve

    sys.path.insert(0, str(ROOT / "deploy" / "serve"))
    import recmem_deployment

    port = free_port()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(recmem_deployment.build({"bundle": str(bundle), "num_cpus": 0}), name="recmem", route_prefix="/")
        _wait_healthy(port, None)
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


def run_latency_bench(bundle: Path, data_root: Path, schema: Any, servers: tuple[str, ...] = SERVERS,
                      seconds: float = 10.0, clients: int = 8) -> dict[str, Any]:
    """Measure each server on ``bundle`` with rows from ``data_root``; figures per server."""
    rows = sample_rows(data_root, schema, 256)
    out: dict[str, Any] = {"bundle": str(bundle), "cpu": torch.backends.cpu.get_cpu_capability(),
                           "cores": os.cpu_count(), "torch": torch.__version__, "clients": clients,
                           "seconds_per_phase": seconds, "servers": {}}
    for server in servers:
        with running(server, bundle) as port:
            out["servers"][server] = measure(port, rows, seconds, clients)
    return out


def report(result: dict[str, Any]) -> str:
    """A markdown table of :func:`run_latency_bench`'s figures."""
    lines = [f"CPU capability {result['cpu']}, {result['cores']} cores, torch {result['torch']}; "
             f"saturation: {result['clients']} clients; at most {result['seconds_per_phase']:.0f} s per phase",
             "",
             "| server | 1 row p50 / p99 ms | 256 rows p50 / p99 ms | saturation 1 row: req/s (p99 ms) "
             "| saturation 256 rows: req/s (p99 ms) | failed |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in result["servers"].items():
        failed = sum(p["failed"] for p in r.values())
        lines.append(f"| {name} | {r['1_row']['p50_ms']:.2f} / {r['1_row']['p99_ms']:.2f} | "
                     f"{r['256_rows']['p50_ms']:.2f} / {r['256_rows']['p99_ms']:.2f} | "
                     f"{r['saturation_1_row']['rps']:,.0f} ({r['saturation_1_row']['p99_ms']:.1f}) | "
                     f"{r['saturation_256_rows']['rps']:,.0f} ({r['saturation_256_rows']['p99_ms']:.1f}) | {failed} |")
    return "\n".join(lines)
