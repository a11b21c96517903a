"""Shared fixtures: tiny Parquet data roots that a model can learn from in seconds, and the test run's
one local Ray."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recmem.config import SchemaConfig, load_config

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def small_schema(n_dense: int = 3, n_sparse: int = 4) -> SchemaConfig:
    """A schema with few fields, for fast tests."""
    return SchemaConfig(dense=[f"I{i}" for i in range(1, n_dense + 1)],
                        sparse=[f"C{i}" for i in range(1, n_sparse + 1)])


def write_learnable_root(root: Path, schema: SchemaConfig, rows: int = 6000, valid: int = 2000,
                         vocab: int = 50, seed: int = 0) -> Path:
    """Write train/valid Parquet whose labels follow per-ID effects, plus feature statistics.

    IDs are random 64-bit values drawn from ``vocab`` per field with a skew, so a model that learns
    per-ID effects beats chance clearly; ``true_prob`` is the generating probability.
    """
    from recmem.data.stats import write_stats

    rng = np.random.default_rng(seed)
    ids = {f: rng.integers(-2**62, 2**62, size=vocab) for f in schema.sparse}
    effects = {f: rng.normal(0, 1.0, size=vocab) for f in schema.sparse}
    n = rows + valid
    cols: dict[str, np.ndarray] = {}
    logit = np.full(n, -1.0)
    for f in schema.sparse:
        pick = np.minimum(rng.zipf(1.3, size=n) - 1, vocab - 1)
        cols[f] = ids[f][pick]
        logit += effects[f][pick]
    for j, f in enumerate(schema.dense):
        x = rng.exponential(1.0, size=n).astype(np.float32)
        cols[f] = np.log1p(x).astype(np.float32)
        logit += 0.5 * (1 if j % 2 else -1) * cols[f]
    prob = 1 / (1 + np.exp(-logit))
    cols[schema.label] = (rng.random(n) < prob).astype(np.float32)
    cols["event_time"] = np.sort(rng.integers(0, 86_400 * 3, size=n)).astype(np.int64)
    cols["true_prob"] = prob.astype(np.float32)
    table = pa.table(cols)
    for split, part in (("train", table.slice(0, rows)), ("valid", table.slice(rows))):
        (root / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(part, root / split / "part-00000.parquet", row_group_size=1000)
    write_stats(root, schema)
    return root


def recmem_workers() -> list[int]:
    """PIDs of the live Ray workers of recmem's group (``ray::RecmemWorker``) among this process's
    descendants: this test's own Ray only, never another run's on the same host."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
        if fields[0] != "Z":
            children.setdefault(parent, []).append(int(stat.parent.name))
    found, stack = [], [os.getpid()]
    while stack:
        for child in children.get(stack.pop(), []):
            stack.append(child)
            try:
                if b"RecmemWorker" in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.append(child)
            except OSError:
                continue
    return found


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A learnable 4-sparse / 3-dense data root shared by the session (read-only by convention)."""
    return write_learnable_root(tmp_path_factory.mktemp("tiny"), small_schema())


def tiny_config(root: Path, workdir: Path, *overrides: str):
    """A small, fast config over ``tiny_root`` with tracking into ``workdir``."""
    return load_config(None, tiny_overrides(root, workdir, *overrides))


def tiny_overrides(root: Path, workdir: Path, *overrides: str) -> list[str]:
    """:func:`tiny_config` as ``recmem`` command-line overrides."""
    schema = small_schema()
    base = [
        f"workdir={workdir}", f"data.root={root}", "data.batch_size=256",
        f"data.schema.dense={schema.dense}", f"data.schema.sparse={schema.sparse}",
        "model.bottom_mlp=[32,8]", "model.top_mlp=[32,1]", "model.tables.0.embedding_dim=8",
        "train.progress=false", "train.learning_rate=0.05", "train.log_every=5",
        # fp32 whatever the CPU: train.precision=auto would take bf16 on some test machines and not
        # others, and the parity bounds of the tests are fp32's.
        "train.precision=fp32",
        f"tracking.tracking_uri=sqlite:///{workdir}/mlflow.db",
    ]
    return base + list(overrides)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory) -> str:
    """One local Ray for the whole test run, started on first use; yields its job server address.

    Shared because starting Ray costs seconds and every test that trains on Ray would otherwise start
    its own; ``train_ray`` and ``evaluate_ray`` find it running and leave it so. It authenticates
    with a token made for this run (``RAY_AUTH_TOKEN_PATH``): the Ray CLI and submitted jobs read it
    from there, and nothing is written to or read from ``~/.ray``. Its dashboard takes
    ``ray job submit``; a job's ``python`` is this environment's, as for a user with the venv
    activated (``make test`` runs ``.venv/bin/python`` without ``.venv/bin`` on the ``PATH``).
    """
    import ray

    from tests.ranks import free_port

    token = tmp_path_factory.mktemp("ray_auth") / "auth_token"
    token.write_text(secrets.token_hex(32))
    with pytest.MonkeyPatch.context() as env:
        # Token authentication is what a new local Ray turns on when no RAY_AUTH_MODE is set (and
        # turning it on there refreshes Ray's cached settings in this process, which setting the
        # variable here would not).
        env.delenv("RAY_AUTH_MODE", raising=False)
        env.setenv("RAY_AUTH_TOKEN_PATH", str(token))
        env.delenv("RAY_ADDRESS", raising=False)
        env.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        context = ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                           dashboard_port=free_port())
        try:
            yield f"http://{context.dashboard_url}"
        finally:
            ray.shutdown()

