"""``ray job submit`` of the quickstart config to the test run's local Ray (``ray_cluster``), and the
cluster manifests.

The job goes through Ray's job server as on a cluster: the CLI authenticates with the run's token
(``RAY_AUTH_TOKEN_PATH``, set by the fixture), the working directory is uploaded, and the entrypoint
``jobs/train.py`` connects to the cluster through the ``RAY_ADDRESS`` the job supervisor gives it.
"""

from __future__ import annotations

import subprocess
import time
import sys
from pathlib import Path

import pytest

from recmem.cli import main

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


@pytest.mark.slow
def test_ray_job_submit_runs_the_quickstart(ray_cluster, tmp_path):
    overrides = [f"data.root={tmp_path / 'data'}", f"workdir={tmp_path}", "data.synthetic.train_rows=4096",
                 "data.synthetic.valid_rows=1024", "data.batch_size=512", "ray.num_workers=2",
                 "train.progress=false"]
    assert main(["generate", "--config", str(REPO / "jobs/configs/quickstart.yaml"), *overrides]) == 0
    command = [RAY, "job", "submit", "--address", ray_cluster, "--working-dir", str(REPO), "--",
               "python", "jobs/train.py", "--config", "jobs/configs/quickstart.yaml", *overrides]
    deadline = time.monotonic() + 60
    while True:
        job = subprocess.run(command, capture_output=True, text=True, timeout=540, cwd=REPO)
        # A head started seconds ago may not have its job agent yet: Ray asks to try again later.
        if "No available agent to submit job" not in job.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert "No available agent to submit job" not in job.stderr, (
        "the test Ray's job agent did not come up in 60 s: another Ray with a dashboard on this host "
        "holds the agent's fixed port 52365 (ray.init cannot move it), e.g. a second test run at once")
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "succeeded" in job.stdout + job.stderr
    assert "valid AUC" in job.stdout and "MLflow: run" in job.stdout, job.stdout[-4000:]
    # What a user reads: recmem's summary, not the libraries' chatter (tracking.verbose=true brings it back).
    assert len(job.stdout.splitlines()) < 60, job.stdout[-4000:]
    for chatter in ("Successfully loaded", "[TBE=", "Reporting training result"):
        assert chatter not in job.stdout + job.stderr, chatter
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
