"""The one-writer lock: a second holder is refused with the first's name; a dead holder's lock is free."""

import os
import signal
import subprocess
import sys

import pytest

from recmem.lock import LOCK_NAME, LockedError, exclusive


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    with exclusive(tmp_path, "training"):
        child = subprocess.run(
            [sys.executable, "-c", "from recmem.lock import exclusive\n"
             f"with exclusive({str(tmp_path)!r}, 'training'): pass"], capture_output=True, text=True)
    assert child.returncode != 0
    assert f"pid {os.getpid()}" in child.stderr and "LockedError" in child.stderr
    with exclusive(tmp_path, "training"):  # released at the end of the block
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom recmem.lock import exclusive\n"
         f"with exclusive({str(tmp_path)!r}, 'prepare'):\n    print('held', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(LockedError, match=rf"prepare \(pid {holder.pid} "):
        with exclusive(tmp_path, "prepare"):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with exclusive(tmp_path, "prepare") as path:  # the file is still there; the lock is not
        assert path.name == LOCK_NAME
