"""The one-writer lock: a second holder is refused with the first's name; a dead holder's lock is free."""

import os
import subprocess
import sys

import pytest

from recmem.lock import LOCK_NAME, LockedError, exclusive
from tests.holders import held_by_another_process


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
    with held_by_another_process(tmp_path, "prepare") as pid:  # SIGKILLed at the end of the block
        with pytest.raises(LockedError, match=rf"prepare \(pid {pid} "):
            with exclusive(tmp_path, "prepare"):
                pass
    with exclusive(tmp_path, "prepare") as path:  # the file is still there; the lock is not
        assert path.name == LOCK_NAME
