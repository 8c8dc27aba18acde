"""The recycler's actions on a node as the session's cluster counts them: failed and started actions reach the
cluster's metrics endpoint. The actions themselves: tests/unit/test_recycler_actions.py."""

from __future__ import annotations

import asyncio
import time

from embedding_service.config import RecyclerSettings
from embedding_service.fleet.ray_internals import DrainAnswer
from embedding_service.fleet.recycler import NodeRecycler
from embedding_service.wire.fleet import NodeState
from tests.helpers.observe import settled, total, wait_until
from tests.helpers.session import METRICS_REPORT_MS

NODE, IP = "abc123", "10.1.2.3"


async def _recycler(settings: RecyclerSettings, drain=None) -> NodeRecycler:
    recycler = NodeRecycler.__new__(NodeRecycler)
    kwargs = {"drain": drain} if drain else {}
    await recycler.__init__(settings, alive_nodes=lambda: {NODE: IP}, **kwargs)  # Serve awaits it the same way
    recycler._loop.cancel()  # the test drives the ticks
    return recycler


async def _quarantine(recycler: NodeRecycler) -> None:
    await recycler.cycle()  # the node is tracked
    await recycler.report_failure("r1", NODE, "CUDA error: it's broken")


def _node(recycler: NodeRecycler):
    return next(n for n in recycler.book.snapshot().nodes if n.node_id == NODE)


class _Drains:
    """Ray's drain as a script: each call answers (or raises) the next of `answers`."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, str, float]] = []

    def __call__(self, node_id: str, message: str, deadline_s: float) -> DrainAnswer:
        self.calls.append((node_id, message, deadline_s))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_failed_and_started_actions_reach_the_clusters_metrics(service):
    """In the session's driver, a Ray worker: the recycler's counters are exported as Ray exports the service's."""
    settings = RecyclerSettings(grace_cycles=0, action="drain", action_retries=1, action_retry_s=0.05)
    drains = _Drains(DrainAnswer(False, "no"), DrainAnswer(True, ""))
    # The counts as exported once the earlier tests' own (this process's, reported every interval) have landed.
    samples = settled("ray_embedding_node_drains_failed_total", 3 * METRICS_REPORT_MS / 1000)
    before_failed = total("ray_embedding_node_drains_failed_total", samples, action="drain", reason="rejected")
    before_started = total("ray_embedding_node_drains_started_total", samples, action="drain")

    async def scenario():
        recycler = await _recycler(settings, drains)
        await _quarantine(recycler)
        await recycler.cycle()
        await asyncio.sleep(0.06)
        await recycler.cycle()
        return _node(recycler)

    assert asyncio.run(scenario()).state == NodeState.DRAINING

    def counted() -> tuple[float, float]:
        return (total("ray_embedding_node_drains_failed_total", action="drain", reason="rejected") - before_failed,
                total("ray_embedding_node_drains_started_total", action="drain") - before_started)

    seen: list = []
    try:
        wait_until(lambda: seen.append(counted()) or seen[-1] == (1, 1), 30, "one failed drain and one started")
    except TimeoutError as exc:
        raise AssertionError(f"counted (failed, started) since the test began: {seen[-3:]}") from exc
    time.sleep(1.5)  # three report intervals: a count past the value would show now
    assert counted() == (1, 1)
