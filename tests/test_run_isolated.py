"""``make test``'s runner: pytest under a fresh home and temp folder, failing on what a run leaves behind."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests import run_isolated


def test_the_environment_points_home_and_temp_into_the_fresh_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://somewhere:10001")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://somewhere:5000")
    env = run_isolated.isolated_env(tmp_path)
    assert "RAY_ADDRESS" not in env and "MLFLOW_TRACKING_URI" not in env
    for name in ("HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "TMPDIR"):
        assert Path(env[name]).is_dir() and Path(env[name]).is_relative_to(tmp_path), name
    assert not [p for p in Path(env["HOME"]).rglob("*") if not p.is_dir()], "the home folder holds no file"


def test_a_process_the_run_left_behind_is_found(tmp_path):
    home = str(tmp_path / "home")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env={**os.environ, "HOME": home})
    try:
        assert [pid for pid, _ in run_isolated.processes_with_home(home)] == [child.pid]
    finally:
        child.kill()
        child.wait()
    assert run_isolated.leftover_processes(home, grace=1) == []


def test_a_suite_that_leaves_a_process_fails_and_the_process_is_killed(tmp_path, capsys):
    """A green pytest run that leaves a process running makes the whole run fail."""
    pid_file = tmp_path / "pid"
    test = tmp_path / "test_leaves_a_process.py"
    test.write_text(textwrap.dedent(f"""
        import os, subprocess, sys
        from pathlib import Path

        def test_home_is_fresh_and_leaves_a_sleeper():
            assert os.environ["HOME"] != {str(Path.home())!r}
            assert os.environ["TMPDIR"].startswith(os.path.dirname(os.environ["HOME"]))
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
            Path({str(pid_file)!r}).write_text(str(child.pid))
    """))
    assert run_isolated.main(["-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(test)], grace=1) == 1
    pid = int(pid_file.read_text())
    assert f"process {pid} still running (killed)" in capsys.readouterr().err
    assert not _alive(pid), "the runner killed what the run left"


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a killed process not yet reaped by its new parent counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
