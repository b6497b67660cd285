"""`posttrain server down` on a machine whose PID 1 does not reap (a container): a stopped service left as a zombie
counts as stopped, so `down` does not wait out its SIGTERM and SIGKILL grace periods."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from flows import services


def test_a_zombie_is_not_alive_and_a_running_process_is():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":  # exited, not yet reaped
        assert time.monotonic() < deadline
        time.sleep(0.05)
    try:
        assert not services._alive(child.pid)
    finally:
        child.wait()
    assert services._alive(os.getpid())
