"""The node recycler: one replica on the head node that turns GPU failure reports into node recycling.

Replicas report faults (replica id, node id, reason) and heartbeat; the recycler quarantines the node at
once, lets `grace_cycles` ticks pass (replicas there fail their Serve health check, the routers stop
routing there), then acts on the node: Ray's own drain (default), a command, or nothing. An action
that fails (Ray rejects the drain, the call raises, the command exits non-zero or times out) is counted
as failed, shown in WatchNodes, and tried again `action_retries` times; after failed drains the command,
when one is configured, is tried next. Every step is logged with its reason. Callers long-poll
`wait_for_change`.

It is also where a shutdown starts: `begin_shutdown` puts it in the view every router follows (health
NOT_SERVING, new calls UNAVAILABLE), and the routers report their calls in flight until none is left
(ops/launcher.drain).
"""

from __future__ import annotations

import asyncio
import re
import shlex
import time
from collections import Counter
from collections.abc import Callable

import ray

from embedding_service.config import RecyclerSettings, command_words
from embedding_service.fleet import ray_internals
from embedding_service.fleet.node_state import NodeBook
from embedding_service.observability.logs import service_logger
from embedding_service.observability.metrics import FleetMetrics, keep_gauges_set
from embedding_service.wire.fleet import NodeState, NodeView, Snapshot
from embedding_service.wire.messages import FLEET_LONG_POLL_S

logger = service_logger(__name__)

# A router unheard for this long (stopped, replaced) is forgotten.
ROUTER_TTL_S = 3 * FLEET_LONG_POLL_S


def _alive_nodes() -> dict[str, str]:
    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}


def fault_kind(reason: str) -> str:
    """A fault's metric label: its reason up to the first colon ("CUDA error: ..." -> "CUDA error"),
    or "other" when that is not a short plain phrase (the rest of a reason is free text)."""
    head = reason.split(":", 1)[0].strip()
    return head if re.fullmatch(r"[A-Za-z0-9 _.\-]{1,48}", head) else "other"


class ActionFailed(Exception):
    """An action on a node did not happen; `reason` is the metric's bounded label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # rejected, error, exit_status, timeout
        self.message = message


class NodeRecycler:
    async def __init__(self, settings: RecyclerSettings,
                       drain: Callable[..., ray_internals.DrainAnswer] = ray_internals.drain_node,
                       alive_nodes: Callable[[], dict[str, str]] = _alive_nodes) -> None:
        """Serve passes `settings`; `drain` and `alive_nodes` are Ray's, replaced only where Ray is not."""
        self.settings = settings
        self.book = NodeBook(settings.grace_cycles, settings.report_retention_s, settings.replica_ttl_s,
                             settings.action_retry_s)
        self._drain_node = drain
        # Split once, here: each run fills the node's values into these words and runs them without a shell.
        self._command_words = command_words(settings.command) if settings.command else None
        self._alive_nodes = alive_nodes
        self._changed = asyncio.Condition()
        self._routers: dict[str, float] = {}  # router replica -> last heard
        self._router_calls: dict[str, int] = {}  # router replica -> calls in flight, reported since the shutdown
        self.metrics = FleetMetrics()
        self._gauges = asyncio.create_task(keep_gauges_set(self._count_nodes))
        self._loop = asyncio.create_task(self._run())

    async def _notify(self, before: int) -> None:
        if self.book.version != before:
            async with self._changed:
                self._changed.notify_all()

    async def _run(self) -> None:
        while True:
            try:
                await self.cycle()
            except Exception:
                logger.exception("recycler cycle failed")
            await asyncio.sleep(self.settings.tick_s)

    async def cycle(self) -> None:
        """One tick: the alive nodes, then every node whose time to be acted on has come."""
        before = self.book.version
        alive = await asyncio.to_thread(self._alive_nodes)
        draining = {n.node_id for n in self.book.snapshot().nodes if n.state == NodeState.DRAINING}
        for node in self.book.tick(time.time(), alive):
            await self._act(node)
        after = self.book.snapshot()
        gone = [nid for nid in draining if after.state_of(nid) == NodeState.RECYCLED]
        if gone:
            self.metrics.drains_finished.inc(len(gone))
        self._count_nodes()  # at once; keep_gauges_set repeats it
        await self._notify(before)

    def _count_nodes(self) -> None:
        counts = Counter(n.state for n in self.book.snapshot().nodes)
        for state in NodeState:  # every state, zeros included, so a panel or alert always has a series
            self.metrics.nodes.set(counts[state], tags={"state": state.value})

    def _plan(self) -> list[str]:
        """The actions a node gets, in order, one per attempt: the configured one 1 + action_retries times;
        after drains, the command as many times when one is configured."""
        s = self.settings
        attempts = 1 + s.action_retries
        plan = [s.action] * attempts
        if s.action == "drain" and s.command:
            plan += ["command"] * attempts
        return plan

    async def _act(self, node: NodeView) -> None:
        plan = self._plan()
        action = plan[min(node.failed_actions, len(plan) - 1)]
        replicas = ", ".join(r.replica_id for r in node.replicas) or "none"
        logger.warning("recycler: %s node %s (%s), attempt %d: %s; replicas: %s", action, node.node_id,
                       node.node_ip, node.failed_actions + 1, node.reason, replicas)
        try:
            if action == "drain":
                await self._drain(node)
            elif action == "command":
                await self._command(node)
            else:
                logger.warning("recycler: action 'none': node %s is left to the operator", node.node_id)
        except ActionFailed as failed:
            self._failed(node, action, failed, plan)
            return
        except Exception as exc:  # whatever the action raised: counted and shown, never taken for done
            self._failed(node, action, ActionFailed("error", f"{type(exc).__name__}: {exc}"), plan)
            return
        self.metrics.drains_started.inc(tags={"action": action})

    def _failed(self, node: NodeView, action: str, failed: ActionFailed, plan: list[str]) -> None:
        attempt = node.failed_actions + 1
        again = attempt < len(plan)
        following = (f"{plan[attempt]} again in {self.settings.action_retry_s:g} s" if again
                     else "no attempts left: the node is left to the operator")
        error = f"{action} failed (attempt {attempt} of {len(plan)}): {failed.message}; {following}"
        self.metrics.drains_failed.inc(tags={"action": action, "reason": failed.reason})
        self.book.action_failed(node.node_id, error, time.time(), again)
        (logger.warning if again else logger.error)("recycler: node %s: %s", node.node_id, error)

    async def _drain(self, node: NodeView) -> None:
        answer = await asyncio.to_thread(self._drain_node, node.node_id, f"embedding-service recycler: {node.reason}",
                                         self.settings.drain_deadline_s)
        if not answer.accepted:
            raise ActionFailed("rejected", f"Ray rejected the drain: {answer.message or 'no reason given'}")
        logger.warning("recycler: Ray accepted the drain of node %s", node.node_id)

    def _command_argv(self, node: NodeView) -> list[str]:
        """The command's words with the node's values filled in: each value stays inside its word, taken literally
        (a reason or address holding quotes, `;` or `$(...)` is one argument, never more, never run)."""
        return [word.format(node_id=node.node_id, node_ip=node.node_ip, reason=node.reason)
                for word in self._command_words]

    async def _command(self, node: NodeView) -> None:
        if not self._command_words:
            raise ActionFailed("error", "no recycler.command is configured")
        argv = self._command_argv(node)
        command = shlex.join(argv)  # for the log and the node's action_error
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), timeout=self.settings.command_timeout_s)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()
            raise ActionFailed("timeout", f"`{command}` ran past {self.settings.command_timeout_s:g} s") from None
        tail = output.decode(errors="replace")[-2000:].strip()
        if process.returncode != 0:
            raise ActionFailed("exit_status", f"`{command}` exited {process.returncode}: {tail[-500:]}")
        logger.warning("recycler: `%s` exited 0: %s", command, tail)

    # ---- called by replicas and the router --------------------------------

    async def heartbeat(self, replica_id: str, model: str, node_id: str, refused: str = "") -> tuple[bool, str]:
        before = self.book.version
        verdict = self.book.heartbeat(replica_id, model, node_id, time.time(), refused)
        await self._notify(before)
        return verdict

    async def report_failure(self, replica_id: str, node_id: str, reason: str) -> None:
        before = self.book.version
        self.metrics.faults.inc(tags={"reason": fault_kind(reason)})
        if self.book.report(replica_id, node_id, reason, time.time()):
            logger.warning("recycler: quarantined node %s: %s (replica %s)", node_id, reason, replica_id)
        await self._notify(before)

    async def forget_replica(self, replica_id: str) -> None:
        """A model replica that Serve is stopping leaves the view at once (its model's health follows)."""
        before = self.book.version
        self.book.forget_replica(replica_id)
        await self._notify(before)

    async def is_quarantined(self, node_id: str) -> bool:
        return self.book.is_quarantined(node_id)

    async def wait_for_change(self, version: int, timeout_s: float, router_id: str | None = None) -> Snapshot:
        """The current snapshot once its version differs from `version`, or after `timeout_s`."""
        if router_id is not None:
            self._heard_from(router_id)
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.book.version != version), timeout_s)
            except asyncio.TimeoutError:
                pass
        return self.book.snapshot()

    # ---- the service's shutdown ---------------------------------------------

    async def begin_shutdown(self) -> None:
        before = self.book.version
        self.book.begin_shutdown()
        if self.book.version != before:
            logger.warning("recycler: the service is shutting down: health NOT_SERVING, new calls refused")
        await self._notify(before)

    def _heard_from(self, router_id: str) -> None:
        """Notes a live router; routers unheard for ROUTER_TTL_S (stopped, replaced) are forgotten."""
        now = time.monotonic()
        self._routers[router_id] = now
        for gone in [rid for rid, seen in self._routers.items() if now - seen > ROUTER_TTL_S]:
            del self._routers[gone]
            self._router_calls.pop(gone, None)

    async def report_calls(self, router_id: str, in_flight: int) -> None:
        """A router's calls in flight, sent once it has seen the shutdown and whenever the number changes."""
        self._heard_from(router_id)
        self._router_calls[router_id] = in_flight

    async def calls_in_flight(self) -> dict[str, int | None]:
        """Every router heard from lately, with its calls in flight (None: no report since the shutdown)."""
        now = time.monotonic()
        return {rid: self._router_calls.get(rid) for rid, seen in self._routers.items() if now - seen <= ROUTER_TTL_S}

    async def node_id(self) -> str:
        """Where this recycler runs (the head node)."""
        return ray.get_runtime_context().get_node_id()

    async def check_health(self) -> None:
        if self._loop.done():
            raise RuntimeError(f"recycler loop stopped: {self._loop.exception()!r}")
        if self._gauges.done():
            raise RuntimeError("the recycler's metrics reporter stopped")
