"""The recycler's actions on a node, built through its constructor as Serve builds it: the command template (run
without a shell, each value one literal argument), and what happens when an action fails (Ray rejects or cannot take
the drain, the command fails): counted as failed, never as started, shown in WatchNodes' view, tried again,
escalated, then given up on.

Ray's drain is the one thing replaced (it cannot be made to refuse here); the node list is given."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys

import pytest
from pydantic import ValidationError

from embedding_service.config import RecyclerSettings
from embedding_service.fleet.ray_internals import DrainAnswer
from embedding_service.router.fleet_view import ServiceView
from embedding_service.wire.fleet import NodeState, NodeView, ReplicaView
from tests.helpers.observe import serve_logs
from tests.helpers.recycler import IP, NODE, ScriptedDrains, node_view, quarantine, started_recycler


def _argv_recorder(tmp_path):
    """A command that writes the arguments it was given, as JSON, to a file: what the recycler really ran."""
    script, out = tmp_path / "record.py", tmp_path / "argv.json"
    script.write_text(f"import json, sys\nopen({str(out)!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}", out


def _run_command(settings, node) -> None:
    """The command action on `node`; raises ActionFailed where the command failed."""
    async def scenario():
        recycler = await started_recycler(settings)
        await recycler._command(node)

    asyncio.run(scenario())


def test_command_action_runs_the_template_with_the_node(tmp_path):
    recorder, out = _argv_recorder(tmp_path)
    settings = RecyclerSettings(action="command", command=f"{recorder} {{node_id}} --ip={{node_ip}} '{{reason}}' "
                                "\"why: {reason}\" {{literal}}")
    node = NodeView(NODE, IP, NodeState.DRAINING, "CUDA error: it's broken", 0.0, (ReplicaView("r1", "m", NODE),))
    _run_command(settings, node)
    assert json.loads(out.read_text()) == [NODE, f"--ip={IP}", "CUDA error: it's broken",
                                           "why: CUDA error: it's broken", "{literal}"]


@pytest.mark.parametrize("reason", ["x'; touch {marker}; echo '", "$(touch {marker})", "`touch {marker}`",
                                    "x\"; touch {marker}; echo \"", "a b\nc; touch {marker} &"])
def test_hostile_values_reach_the_command_as_single_literal_arguments(tmp_path, monkeypatch, reason):
    """A fault's reason is free text from a replica, and a node's address comes from Ray: neither may become another
    argument or run anything, whether its placeholder stands bare, in single quotes or in double quotes."""
    monkeypatch.chdir(tmp_path)  # where a shell would leave what it made of them (files named by the pieces)
    marker = tmp_path / "pwned"
    reason = reason.format(marker=marker)
    node_ip = f"10.0.0.1; touch {marker}"
    recorder, out = _argv_recorder(tmp_path)
    settings = RecyclerSettings(action="command", command=f"{recorder} {{node_ip}} {{reason}} '{{reason}}' "
                                "\"{reason}\" at={node_id}")
    node = NodeView(f"$(touch {marker})", node_ip, NodeState.DRAINING, reason, 0.0, ())
    _run_command(settings, node)
    assert json.loads(out.read_text()) == [node_ip, reason, reason, reason, f"at=$(touch {marker})"]
    assert not marker.exists()


@pytest.mark.parametrize("command", ["ssh {node_ip} 'unclosed", "ssh {host}", "echo {0}", "echo {node_ip.__class__}",
                                     "echo }", "   "])
def test_a_command_that_does_not_split_or_names_an_unknown_placeholder_is_refused_at_validation(command):
    with pytest.raises(ValidationError):
        RecyclerSettings(action="command", command=command)


def test_command_action_needs_a_template():
    with pytest.raises(ValidationError):
        RecyclerSettings(action="command")


def test_a_failed_drain_is_counted_shown_retried_and_escalated_to_the_command(tmp_path):
    recorder, out = _argv_recorder(tmp_path)
    settings = RecyclerSettings(grace_cycles=0, action="drain", action_retries=1, action_retry_s=0.05,
                                command=f"{recorder} {{node_id}}")
    # A Ray that rejects the drain, then one whose call changed shape (the fence's import check passed).
    drains = ScriptedDrains(DrainAnswer(False, "the node is busy"),
                     TypeError("drain_node() takes 4 positional arguments but 5 were given"))
    views: list = []

    async def scenario():
        recycler = await started_recycler(settings, drains)
        await quarantine(recycler)
        await recycler.cycle()  # past the grace: the first drain, rejected
        first = node_view(recycler)
        view = ServiceView([], "head")
        await view.update(recycler.book.snapshot())
        views.append(view.nodes_message())
        await recycler.cycle()  # the retry is not due yet: nothing happens
        assert len(drains.calls) == 1
        await asyncio.sleep(0.06)
        await recycler.cycle()  # the second drain raises
        second = node_view(recycler)
        await asyncio.sleep(0.06)
        await recycler.cycle()  # drains spent: the command
        return first, second, node_view(recycler)

    first, second, escalated = asyncio.run(scenario())
    assert [c[0] for c in drains.calls] == [NODE, NODE]
    # Never reported as draining while it is not: back to quarantined, with why and what comes next.
    assert first.state == NodeState.QUARANTINED and first.failed_actions == 1
    assert "Ray rejected the drain: the node is busy" in first.action_error
    assert "drain again in 0.05 s" in first.action_error
    assert "CUDA error: it's broken" in first.reason  # the fault itself is kept
    (node,) = views[0].nodes
    assert node.action_error == first.action_error and node.failed_actions == 1  # as WatchNodes shows it
    assert second.failed_actions == 2 and "TypeError" in second.action_error and "command again" in second.action_error
    assert escalated.state == NodeState.DRAINING and escalated.failed_actions == 2
    assert json.loads(out.read_text()) == [NODE]


def test_a_command_that_keeps_failing_is_given_up_on_with_the_node_left_quarantined(caplog):
    settings = RecyclerSettings(grace_cycles=0, action="command", command="sh -c 'echo no >&2; exit 3'",
                                action_retries=1, action_retry_s=0.05)

    async def scenario():
        recycler = await started_recycler(settings)
        await quarantine(recycler)
        for _ in range(3):
            await recycler.cycle()
            await asyncio.sleep(0.06)
        return node_view(recycler)

    with serve_logs(caplog):
        node = asyncio.run(scenario())
    assert node.state == NodeState.QUARANTINED and node.failed_actions == 2
    assert "exited 3: no" in node.action_error
    assert "no attempts left: the node is left to the operator" in node.action_error
    assert any(r.levelname == "ERROR" and "no attempts left" in r.getMessage() for r in caplog.records)
