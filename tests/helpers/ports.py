"""Free ports for the servers the tests start.

A port is chosen, free, then bound by its server later: in between, Ray's processes start and bind ports of their
own (a port 0 from the kernel's ephemeral range, or Ray's random pick above one), and once took the port chosen for
Serve's gRPC proxy, which then failed to bind it and the session's start failed. The ports here come from below the
kernel's ephemeral range and above Ray's default worker ports (10002-19999), where neither Ray nor the kernel hands
out a port, and none is handed out twice in a session.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 20000  # above Ray's default worker ports
_given: set[int] = set()


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    top = max(_ephemeral_start(), LOWEST + 1000)
    for _ in range(1000):
        port = random.randrange(LOWEST, top)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))  # taken on any address, or by a listener on all of them
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port in {LOWEST}-{top - 1}")
