"""CPU time of the server's processes, read from /proc around a workload, by role.

A role is named from a process's command line (Ray names its workers `ray::<actor>`): Serve's proxy, the
router, the model replica, the gateway, and the rest of Ray (raylet, GCS, Serve's controller, the recycler).
Only processes below a root (this benchmark, or a peer's shell) count: the client's own CPU is not the server's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

TICK_S = 1 / os.sysconf("SC_CLK_TCK")

# (role, command-line prefix), first match wins.
SERVICE_ROLES = (
    ("proxy", "ray::ProxyActor"),
    ("router", "ray::ServeReplica:embedding:EmbedRouter"),
    ("replica", "ray::ServeReplica:embedding:model-"),
    ("gateway", "gateway"),
)


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of a live process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) * TICK_S


def cmdline(pid: int | str) -> str:
    """A process's command line, arguments joined by spaces; empty once it has gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def service_role(cmdline: str) -> str:
    if "-m gateway" in cmdline:
        return "gateway"
    for role, prefix in SERVICE_ROLES:
        if cmdline.startswith(prefix):
            return role
    return "rest"


def snapshot(root: int, role: Callable[[str], str] = service_role,
             include_root: bool = False) -> dict[int, tuple[str, float]]:
    """Every process below `root` (and `root` itself if `include_root`): pid -> (role, CPU seconds so far)."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (s := _stat(int(entry))) is not None:
            stats[int(entry)] = s
    below: set[int] = {root} if include_root and root in stats else set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, (ppid, _) in stats.items() if ppid in frontier and pid not in below}
        below |= frontier
    return {pid: (role(cmdline(pid)), stats[pid][1]) for pid in below}


def spent(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds by role between two snapshots (a process started between them counts from zero)."""
    out: dict[str, float] = {}
    for pid, (role, cpu) in after.items():
        out[role] = out.get(role, 0.0) + cpu - before.get(pid, (role, 0.0))[1]
    return out


class CpuMeter:
    """`with meter.measure() as m: ...` then m.by_role: CPU seconds by role over the block."""

    def __init__(self, root: int | None = None, role: Callable[[str], str] = service_role,
                 include_root: bool = False) -> None:
        """Processes below `root` (default: this one, whose CPU is the client's); `include_root`: the root's
        own too (a peer server started by exec)."""
        self.root = os.getpid() if root is None else root
        self.role = role
        self.include_root = include_root

    def measure(self) -> _Measured:
        return _Measured(self)


class _Measured:
    def __init__(self, meter: CpuMeter) -> None:
        self.meter = meter
        self.by_role: dict[str, float] = {}

    def __enter__(self) -> _Measured:
        self._before = snapshot(self.meter.root, self.meter.role, self.meter.include_root)
        return self

    def __exit__(self, *exc) -> None:
        self.by_role = spent(self._before, snapshot(self.meter.root, self.meter.role, self.meter.include_root))
