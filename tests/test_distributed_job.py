"""``ray job submit`` of the quickstart config against a local head node (``ray start --head``).

The head runs with ``--block`` under this test and is stopped by terminating that process, which
stops exactly the processes it started. (``ray stop`` would stop every Ray on the machine, other
users' included.) Ports are picked free so a Ray already running here is left alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recmem.cli import main
from tests.ranks import free_port

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
PORT_OPTIONS = ["port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port"]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A local Ray head node: (job server address, environment for the ray CLI)."""
    # Ray's head enables token authentication; the CLI sends ~/.ray/auth_token in this mode.
    # The job's `python` entrypoint must be this environment's python, as for a user with the venv
    # activated; `make test` runs .venv/bin/python without putting .venv/bin on the PATH.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": path}
    ports = {name: free_port() for name in PORT_OPTIONS}
    log = tmp_path_factory.mktemp("head") / "head.log"
    process = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--num-cpus", "2", "--dashboard-host", "127.0.0.1",
         *[arg for name, port in ports.items() for arg in (f"--{name}", str(port))]],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    deadline = time.monotonic() + 180
    while subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode:
        if process.poll() is not None or time.monotonic() > deadline:
            process.terminate()
            pytest.fail(f"the Ray head did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(2)
    yield address, env
    process.terminate()
    process.wait(timeout=120)
    # `ray start` points later `ray.init()` calls at this head; `ray stop` would remove the pointer.
    pointer = Path("/tmp/ray/ray_current_cluster")
    if pointer.is_file() and pointer.read_text().strip().endswith(f":{ports['port']}"):
        pointer.unlink()


@pytest.mark.slow
def test_ray_job_submit_runs_the_quickstart(head, tmp_path):
    address, env = head
    overrides = [f"data.root={tmp_path / 'data'}", f"workdir={tmp_path}", "data.synthetic.train_rows=4096",
                 "data.synthetic.valid_rows=1024", "data.batch_size=512", "ray.num_workers=2",
                 "train.progress=false"]
    assert main(["generate", "--config", str(REPO / "jobs/configs/quickstart.yaml"), *overrides]) == 0
    job = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
         "python", "jobs/train.py", "--config", "jobs/configs/quickstart.yaml", *overrides],
        env=env, capture_output=True, text=True, timeout=540, cwd=REPO)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "succeeded" in job.stdout + job.stderr
    assert "valid AUC" in job.stdout, job.stdout[-4000:]
    assert list((tmp_path / "runs" / "quickstart" / "checkpoints" / "ray" / "recmem").glob("checkpoint_*/rank-00001.pt"))


def test_cluster_manifests_run_the_job_entrypoint():
    import yaml

    rayjob = yaml.safe_load((REPO / "deploy/cluster/rayjob.yaml").read_text())
    cluster = yaml.safe_load((REPO / "deploy/cluster/cluster.yaml").read_text())
    entrypoint = rayjob["spec"]["entrypoint"].split()
    assert rayjob["kind"] == "RayJob" and entrypoint[:2] == ["python", "jobs/train.py"]
    assert (REPO / entrypoint[entrypoint.index("--config") + 1]).is_file()
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == __import__("ray").__version__
    assert cluster["head_node_type"] in cluster["available_node_types"]
    assert "jobs/train.py" in (REPO / "deploy/cluster/cluster.yaml").read_text()
    from recmem.config import load_config

    load_config(REPO / entrypoint[entrypoint.index("--config") + 1], [a for a in entrypoint if "=" in a])
