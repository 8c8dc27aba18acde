"""The running processes of the session's service: the router and the proxy hold no torch, the model replicas do
(/proc/<pid>/maps). The import rules themselves: tests/unit/test_layout.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks.proc_cpu import cmdline

# What each part may import of ours (besides itself and the client library).


def _processes(title: str) -> list[int]:
    """PIDs whose command line (Ray sets it to the actor's name) starts with `title`."""
    return [int(pid) for pid in filter(str.isdigit, os.listdir("/proc")) if cmdline(pid).startswith(title)]


def _maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc (Linux)")
def test_the_running_router_and_proxy_hold_no_torch_while_the_model_replicas_do(service):
    """The processes themselves, after serving calls: what they unpickled (a model's description, its replicas'
    errors) brought no torch either."""
    from embedding_client.v1 import embedding_pb2 as pb

    stub = service.stub
    stub.Embed(pb.EmbedRequest(inputs=[pb.EmbedInput(text="thin processes")]), timeout=60)
    stub.ListModels(pb.ListModelsRequest(), timeout=60)
    routers = _processes("ray::ServeReplica:embedding:EmbedRouter")
    proxies = _processes("ray::ProxyActor")
    fleet = _processes("ray::ServeReplica:embedding:NodeRecycler")
    models = _processes("ray::ServeReplica:embedding:model-")
    assert routers and proxies and fleet and models
    assert not any(_maps_torch(pid) for pid in routers + proxies + fleet)
    assert all(_maps_torch(pid) for pid in models)  # the check sees torch where it is
