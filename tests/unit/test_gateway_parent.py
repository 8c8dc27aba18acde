"""The gateway that `python -m embedding_service run` starts does not outlive it: killed outright (SIGKILL, the
OOM killer), the run command sends no signal on, and a gateway left alone would keep its port and serve nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from tests.helpers.observe import wait_until
from tests.helpers.ports import free_port

PARENT = """
import subprocess, sys, os, time
gateway = subprocess.Popen([sys.executable, "-m", "gateway", "--targets", "127.0.0.1:9", "--port", sys.argv[1],
                            "--drain-delay-s", "0.2", "--parent-pid", str(os.getpid())])
print(gateway.pid, flush=True)
time.sleep(600)
"""


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_gateway_whose_parent_is_killed_outright_stops_by_itself():
    port = free_port()
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(port)], stdout=subprocess.PIPE, text=True)
    gateway_pid = int(parent.stdout.readline())
    try:
        wait_until(lambda: _listening(port), 60, "the gateway listening")
        time.sleep(2)
        assert _alive(gateway_pid)  # it follows a live parent without stopping
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        wait_until(lambda: not _alive(gateway_pid), 30, "the gateway gone after its parent")
        assert not _listening(port)
    finally:
        if _alive(gateway_pid):
            os.kill(gateway_pid, signal.SIGKILL)
