"""The recycler's actions on a node as the session's cluster counts them: failed and started actions reach the
cluster's metrics endpoint. The actions themselves: tests/unit/test_recycler_actions.py."""

from __future__ import annotations

import asyncio
import time

from embedding_service.config import RecyclerSettings
from embedding_service.fleet.ray_internals import DrainAnswer
from embedding_service.wire.fleet import NodeState
from tests.helpers.observe import settled, total, wait_until
from tests.helpers.recycler import ScriptedDrains, node_view, quarantine, started_recycler
from tests.helpers.session import METRICS_REPORT_MS


def test_failed_and_started_actions_reach_the_clusters_metrics(service):
    """In the session's driver, a Ray worker: the recycler's counters are exported as Ray exports the service's."""
    settings = RecyclerSettings(grace_cycles=0, action="drain", action_retries=1, action_retry_s=0.05)
    drains = ScriptedDrains(DrainAnswer(False, "no"), DrainAnswer(True, ""))
    # The counts as exported once the earlier tests' own (this process's, reported every interval) have landed.
    samples = settled("ray_embedding_node_drains_failed_total", 3 * METRICS_REPORT_MS / 1000)
    before_failed = total("ray_embedding_node_drains_failed_total", samples, action="drain", reason="rejected")
    before_started = total("ray_embedding_node_drains_started_total", samples, action="drain")

    async def scenario():
        recycler = await started_recycler(settings, drains)
        await quarantine(recycler)
        await recycler.cycle()
        await asyncio.sleep(0.06)
        await recycler.cycle()
        return node_view(recycler)

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
