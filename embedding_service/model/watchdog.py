"""A model replica's side of the fleet: it heartbeats to the recycler, runs its device check every
heartbeat and after inference errors, reports faults, and learns whether its node is quarantined.

The device check is the model's `gpu_check` (an import path; the fleet's checks are in
fleet/gpu_checks.py), loaded here by name.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from embedding_service.observability.logs import service_logger

logger = service_logger(__name__)

Check = Callable[..., "str | None"]


def load_check(import_path: str) -> Check:
    module, _, name = import_path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Placement:
    """Where a replica runs: its Ray node and Serve replica id."""

    node_id: str
    replica_id: str


def current_placement() -> Placement:
    import ray
    from ray import serve

    return Placement(ray.get_runtime_context().get_node_id(), serve.get_replica_context().replica_id.unique_id)


class ReplicaWatchdog:
    def __init__(self, fleet: Any, model: str, device: str, placement: Placement, check: Check,
                 check_args: dict[str, Any], refused: str | None) -> None:
        """`fleet`: the recycler's handle; `refused`: why this replica refuses to serve (None: it serves)."""
        self.fleet = fleet
        self.model = model
        self.device = device
        self.placement = placement
        self._check = check
        self._check_args = check_args
        self._refused = refused or ""
        self.quarantine_reason: str | None = None
        self._task: asyncio.Task | None = None

    def start(self, period_s: float) -> None:
        """Heartbeats now (the replica is known to the recycler at once), then every `period_s`."""
        self._task = asyncio.get_running_loop().create_task(self._watch(period_s))

    @property
    def stopped(self) -> bool:
        return self._task is None or self._task.done()

    async def device_fault(self) -> str | None:
        """The device check's verdict, now (a reason, or None while healthy); a fault is reported."""
        p = self.placement
        fault = await asyncio.to_thread(self._check, self.device, p.node_id, **self._check_args)
        if fault is not None:
            logger.error("replica %s on node %s: device fault: %s", p.replica_id, p.node_id, fault)
            await self.fleet.report_failure.remote(p.replica_id, p.node_id, fault)
        return fault

    async def _heartbeat(self) -> None:
        p = self.placement
        quarantined, reason = await self.fleet.heartbeat.remote(p.replica_id, self.model, p.node_id, self._refused)
        self.quarantine_reason = reason if quarantined else None

    async def _round(self, check_device: bool) -> None:
        try:
            if check_device:
                await self.device_fault()
            await self._heartbeat()
        except Exception:
            logger.exception("replica %s: health round failed", self.placement.replica_id)

    async def _watch(self, period_s: float) -> None:
        await self._round(check_device=False)
        while True:
            await asyncio.sleep(period_s)
            await self._round(check_device=True)

    async def leave(self, timeout_s: float = 5.0) -> None:
        """Stops, and leaves the recycler's view at once (the model's health follows)."""
        if self._task is not None:
            self._task.cancel()
        try:
            await asyncio.wait_for(self.fleet.forget_replica.remote(self.placement.replica_id), timeout=timeout_s)
        except Exception:
            logger.warning("replica %s: could not tell the recycler it is leaving", self.placement.replica_id)
