"""The unit tier starts no Ray and leaves the process's environment as it found it: after each module, neither this
process's Ray nor any Ray daemon among its descendants (a test that did start one would make the tier slow and
order-dependent, and belongs in tests/cluster/), and no environment variable changed (the cluster tier's Ray, started
later in the same session, takes its nodes' settings from this process's environment)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from benchmarks.proc_cpu import cmdline

RAY_DAEMONS = ("gcs_server", "raylet")
# What the libraries set in the environment as they are first imported (ray, torch): not a test's doing.
SET_ON_IMPORT = frozenset({"PYTEST_CURRENT_TEST", "RAY_CLIENT_MODE", "KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK",
                           "TORCHINDUCTOR_CACHE_DIR"})


def descendants(pid: int) -> list[int]:
    """Every live process whose parent chain reaches `pid`."""
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            # The parent is the field after the (parenthesised, possibly spaced) command name.
            parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


@pytest.fixture(scope="module", autouse=True)
def no_ray_started_nor_environment_changed():
    environment = dict(os.environ)
    yield
    changed = sorted(k for k in set(environment) | set(os.environ)
                     if environment.get(k) != os.environ.get(k) and k not in SET_ON_IMPORT)
    assert not changed, f"a unit test left the environment changed: {changed}"
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized(), "a unit test connected to Ray: it belongs in tests/cluster/"
    daemons = [cmdline(p) for p in descendants(os.getpid()) if any(d in cmdline(p) for d in RAY_DAEMONS)]
    assert not daemons, f"a unit test started Ray: it belongs in tests/cluster/: {daemons}"
