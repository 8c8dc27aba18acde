"""The recycler's configurable action on a node: the shell-command template."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from embedding_service.config import RecyclerSettings
from embedding_service.node_state import NodeState, NodeView, ReplicaView
from embedding_service.recycler import NodeRecycler


def test_command_action_runs_the_template_with_the_node(tmp_path):
    out = tmp_path / "out.txt"
    settings = RecyclerSettings(action="command", command=f"echo {{node_id}} {{node_ip}} {{reason}} > {out}")
    node = NodeView("abc123", "10.1.2.3", NodeState.DRAINING, "CUDA error: it's broken", 0.0,
                    (ReplicaView("r1", "m", "abc123"),))

    async def scenario():
        recycler = NodeRecycler.__new__(NodeRecycler)
        await recycler.__init__(settings)  # Serve awaits an async __init__ the same way
        recycler._loop.cancel()
        await recycler._recycle(node)

    asyncio.run(scenario())
    assert out.read_text().strip() == "abc123 10.1.2.3 CUDA error: it's broken"


def test_command_action_needs_a_template():
    with pytest.raises(ValidationError):
        RecyclerSettings(action="command")
