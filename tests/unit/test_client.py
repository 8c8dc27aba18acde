"""The client library's planning within the service's limits, and its retries after a RetryInfo hint, against an
in-process scripted gRPC peer."""

from __future__ import annotations

import grpc
import numpy as np

from embedding_client import EmbedClient, RetryPolicy
from embedding_client.planning import plan_calls
from embedding_service.wire.reasons import Reason, ServiceError
from tests.helpers.gateways import ScriptedPeer, scripted_grpc_peer
from tests.helpers.models import TINY_DIM


def test_calls_are_planned_within_the_limits():
    assert plan_calls([10] * 7, max_inputs=3, max_bytes=10_000) == [(0, 3), (3, 6), (6, 7)]
    runs = plan_calls([400] * 10, max_inputs=100, max_bytes=2000)
    assert all(sum(400 + 16 for _ in range(b - a)) + 1024 <= 2000 for a, b in runs)
    assert [i for a, b in runs for i in range(a, b)] == list(range(10))
    assert plan_calls([5000, 10], max_inputs=10, max_bytes=2000) == [(0, 1), (1, 2)]  # too big: alone




def test_retry_info_delay_is_honoured():
    failures = [ServiceError(Reason.MODEL_UNAVAILABLE, "scripted", retry_after_s=0.4),
                ServiceError(Reason.OVERLOADED, "scripted", retry_after_s=0.3)]
    assert failures[0].code == grpc.StatusCode.UNAVAILABLE and failures[1].code == grpc.StatusCode.RESOURCE_EXHAUSTED
    peer = ScriptedPeer(failures)
    delays = []
    with scripted_grpc_peer(peer, peer.health) as target:
        with EmbedClient(target, retry=RetryPolicy(max_retries=3, backoff_initial_s=0.001),
                         on_retry=lambda method, err, delay: delays.append((method, err.reason, delay))) as client:
            result = client.embed(["x"])
        assert result.vectors.shape == (1, TINY_DIM)
        assert delays == [("Embed", "MODEL_UNAVAILABLE", 0.4), ("Embed", "OVERLOADED", 0.3)]
        gaps = np.diff(peer.calls)
        assert gaps[0] >= 0.4 and gaps[1] >= 0.3  # waited as told, not the 1 ms backoff
        assert client.stats.retries == 2
