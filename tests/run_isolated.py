"""Run pytest as a new machine would, and fail if the suite leaves anything behind (``make test``).

    python tests/run_isolated.py -q -x          # any pytest arguments

A green suite must not rest on state someone left by hand: a Ray token in ``~/.ray``, an MLflow
store in the repository, a Ray cluster pointer in ``/tmp/ray``. So pytest runs with ``HOME``, the
``XDG_*`` folders and ``TMPDIR`` (where Ray keeps its sessions and its current-cluster pointer, and
pytest its ``tmp_path``) inside one fresh, empty folder made for this run, and without the variables
that point Ray or MLflow at a service (``RAY_ADDRESS``, ``MLFLOW_TRACKING_URI``, ...). Afterwards the
run fails if

- a process it started is still alive (found by the fresh ``HOME`` in its environment: a Ray
  raylet, worker or dashboard a test did not shut down); it is killed;
- the repository holds a file that was not there before (an ``mlflow.db``, ``runs/``, ``mlruns/``
  written into the working directory instead of a test's own folder);
- Ray's current-cluster pointer in the machine's own temp folder changed.

The fresh folder is removed at the end. pytest's own exit status is kept when it is not 0.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLEARED = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR",
           "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")
"""Variables that would point a test at a service or store outside the run."""
CACHES = ("__pycache__", ".pytest_cache", ".hypothesis")
"""What a run may leave in the repository: caches, never results."""
RAY_POINTER = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"


def isolated_env(folder: Path) -> dict[str, str]:
    """This process's environment with home, XDG folders and temp folder inside ``folder`` (created)."""
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    places = {"HOME": "home", "XDG_CONFIG_HOME": "home/.config", "XDG_CACHE_HOME": "home/.cache",
              "XDG_DATA_HOME": "home/.local/share", "XDG_STATE_HOME": "home/.local/state",
              "XDG_RUNTIME_DIR": "run", "TMPDIR": "tmp"}
    for name, sub in places.items():
        (folder / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        env[name] = str(folder / sub)
    return env


def repository_files() -> set[str]:
    """Untracked and ignored paths in the repository, except the venv and caches."""
    listed = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=normal"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines()
    paths = {line[3:] for line in listed if line[:2] in ("??", "!!")}
    return {p for p in paths if not p.startswith(".venv/") and not any(c in Path(p).parts for c in CACHES)}


def processes_with_home(home: str) -> list[tuple[int, str]]:
    """(pid, command line) of every other process whose environment has ``HOME=home``."""
    marker = f"HOME={home}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        pid = int(proc.name)
        if pid == os.getpid():
            continue
        try:
            if marker in proc.joinpath("environ").read_bytes().split(b"\0"):
                found.append((pid, proc.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]))
        except OSError:
            continue
    return found


def leftover_processes(home: str, grace: float = 20.0) -> list[tuple[int, str]]:
    """Processes of the run still alive ``grace`` seconds after pytest ended (Ray exits asynchronously)."""
    deadline = time.monotonic() + grace
    while (found := processes_with_home(home)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def pointer_state() -> tuple[float, str] | None:
    try:
        return RAY_POINTER.stat().st_mtime, RAY_POINTER.read_text()
    except OSError:
        return None


def main(args: list[str], grace: float = 20.0) -> int:
    """Run ``pytest args`` isolated; its exit status, or 1 if it passed but left something behind
    (a process still alive ``grace`` seconds after pytest ended, a file, a changed Ray pointer)."""
    folder = Path(tempfile.mkdtemp(prefix="recmem-test-"))
    try:
        env = isolated_env(folder)
        before, pointer = repository_files(), pointer_state()
        status = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=REPO, env=env).returncode
        problems = []
        for pid, command in leftover_processes(env["HOME"], grace):
            problems.append(f"process {pid} still running (killed): {command}")
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        problems += [f"new file in the repository: {p}" for p in sorted(repository_files() - before)]
        if pointer_state() != pointer:
            problems.append(f"{RAY_POINTER} changed: a test started Ray outside its temp folder")
        for problem in problems:
            print(f"run_isolated: {problem}", file=sys.stderr)
        return status or (1 if problems else 0)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
