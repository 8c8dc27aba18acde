"""The OpenAI gateway against scripted gRPC upstreams: refusals retried after their hint, then 429; an unavailable
service 503; auth off only on loopback."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest

from tests.helpers.gateways import ScriptedEmbed, post, running_gateway, scripted_grpc_peer
from tests.helpers.models import MINILM
from tests.helpers.ports import free_port

KEY = "test-key"
BODY_LIMIT = 1024 * 1024






def test_saturated_service_is_429_after_retries_that_honour_the_hint():
    peer = ScriptedEmbed(failures=10, retry_delay_s=0.2)
    with scripted_grpc_peer(peer) as target, running_gateway(targets=[target], max_retries=2) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError) as caught:
            client.embeddings.create(model="m", input="x")
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"]
    assert len(peer.calls) == 3  # one call and two retries
    gaps = np.diff(peer.calls)
    assert (gaps >= 0.19).all(), gaps  # the server's RetryInfo delay, not the 0.1 s default


def test_retries_recover_from_transient_saturation():
    peer = ScriptedEmbed(failures=2, retry_delay_s=None)
    with scripted_grpc_peer(peer) as target, running_gateway(targets=[target], max_retries=3) as base:
        r = post(base, {"model": "m", "input": ["a", "b"], "encoding_format": "float"})
    assert r.status_code == 200 and [d["embedding"] for d in r.json()["data"]] == [[1.0, 0.0], [1.0, 0.0]]
    assert len(peer.calls) == 3


def test_unavailable_service_is_503_with_retry_after():
    dead = f"127.0.0.1:{free_port()}"
    with running_gateway(targets=[dead], max_retries=1, retry_after_s=2) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            client.embeddings.create(model=MINILM, input="x")
        assert httpx.get(f"{base}/readyz").status_code == 503
        assert httpx.get(f"{base}/healthz").status_code == 200
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"] == "2"


def test_auth_may_be_off_on_loopback_only():
    from pydantic import ValidationError

    from gateway.main import parse_args
    from gateway.settings import GatewaySettings

    assert GatewaySettings(host="127.0.0.1").api_keys == []
    with pytest.raises(ValidationError):
        GatewaySettings(host="0.0.0.0")
    assert GatewaySettings(host="0.0.0.0", api_keys=["k"]).api_keys == ["k"]
    assert GatewaySettings(host="0.0.0.0", allow_unauthenticated=True).allow_unauthenticated
    parsed = parse_args(["--targets", "a:1", "b:2", "--port", "9999", "--api-keys", "k1", "--call-timeout-s", "3"])
    assert parsed.targets == ["a:1", "b:2"] and parsed.port == 9999 and parsed.api_keys == ["k1"]
    assert parsed.call_timeout_s == 3
    assert GatewaySettings().keep_alive_s == 75  # past a load balancer's usual 60 s idle timeout
    with pytest.raises(ValidationError):
        GatewaySettings(coalesce_max_inputs=4096)  # a merged call over the per-request bound
