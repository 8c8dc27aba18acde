"""POST /v1/embeddings served ahead of FastAPI's routing (gateway/embeddings.py): what FastAPI's stack gave the
route before still holds there: bounded bodies, OpenAI errors for what breaks, a caller that hangs up, the metrics,
and the same bytes as the FastAPI route of that path. Real uvicorn, real HTTP, a scripted gRPC peer."""

from __future__ import annotations

import json
import logging
import socket

import httpx
import numpy as np

from embedding_client.v1 import embedding_pb2 as pb
from tests.helpers.gateways import ScriptedEmbed, post, running_gateway, scripted_grpc_peer
from tests.helpers.observe import gateway_samples, total, wait_until

BODY_LIMIT = 64 * 1024


class ThreeDimensions(ScriptedEmbed):
    """Answers every input with the vector [0.1, -2.5, 3e-7] and 2 tokens."""

    def __init__(self, vector_bytes: bytes = np.array([0.1, -2.5, 3e-7], np.float32).tobytes()) -> None:
        super().__init__(failures=0, retry_delay_s=None)
        self.vector_bytes = vector_bytes

    def Embed(self, request, context):
        self.calls.append(0.0)
        response = pb.EmbedResponse(model=request.model, dimensions=3)
        for i, _ in enumerate(request.inputs):
            response.embeddings.add(index=i, float32_le=self.vector_bytes, tokens=2)
        response.usage.prompt_tokens = response.usage.total_tokens = 2 * len(request.inputs)
        return response


def test_replies_carry_every_float_exactly_and_the_fastapi_route_answers_the_same_bytes():
    body = {"model": "m", "input": ["a", "b"], "encoding_format": "float"}
    with scripted_grpc_peer(ThreeDimensions()) as target:
        with running_gateway(targets=[target]) as base:
            hot = post(base, body)
        # Behind a proxy that strips a prefix /gw, the path the app sees is /gw/v1/embeddings: FastAPI's route
        # serves it, not the hot path.
        with running_gateway(targets=[target], root_path="/gw") as base:
            routed = post(base, body)
    assert hot.status_code == routed.status_code == 200
    expected = {"object": "list", "data": [{"object": "embedding", "index": i,
                                            "embedding": np.array([0.1, -2.5, 3e-7], np.float32).tolist()}
                                           for i in range(2)],
                "model": "m", "usage": {"prompt_tokens": 4, "total_tokens": 4}}
    assert hot.content == routed.content
    assert json.loads(hot.content) == expected  # each float32 as the double it is, to the last bit
    assert b"3.000000106112566e-7" in hot.content  # orjson's exponent; json.dumps writes e-07, the same number
    assert hot.headers["content-type"] == "application/json"
    assert int(hot.headers["content-length"]) == len(hot.content)


def test_a_body_over_the_bound_without_content_length_is_413():
    def chunks():
        for _ in range(BODY_LIMIT // 1024 + 8):
            yield b" " * 1024

    with scripted_grpc_peer(ThreeDimensions()) as target, \
            running_gateway(targets=[target], max_body_bytes=BODY_LIMIT) as base:
        r = httpx.post(f"{base}/v1/embeddings", content=chunks(), timeout=60)  # chunked: no Content-Length
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "request_too_large"
        assert post(base, {"model": "m", "input": "after"}).status_code == 200


def test_a_reply_the_gateway_cannot_render_is_a_logged_500_and_it_serves_on(caplog):
    broken = ThreeDimensions(vector_bytes=b"\x00\x00\x80")  # 3 bytes: no whole float32
    caplog.set_level(logging.ERROR, logger="gateway")
    with scripted_grpc_peer(broken) as target, running_gateway(targets=[target]) as base:
        r = post(base, {"model": "m", "input": "x", "encoding_format": "float"})
        assert r.status_code == 500
        assert r.json() == {"error": {"message": "internal error in the gateway", "type": "api_error", "param": None,
                                      "code": None}}
        broken.vector_bytes = np.zeros(3, np.float32).tobytes()
        assert post(base, {"model": "m", "input": "x"}).status_code == 200
        samples = gateway_samples(base)
    assert any("POST /v1/embeddings failed" in rec.getMessage() and rec.exc_info for rec in caplog.records)
    route = {"route": "/v1/embeddings", "method": "POST"}
    assert total("embedding_gateway_http_requests_total", samples, status="500", **route) == 1
    assert total("embedding_gateway_http_requests_total", samples, status="200", **route) == 1


def test_a_caller_that_hangs_up_mid_body_costs_nothing_and_counts_as_499_on_every_route(caplog):
    """Not the gateway's 500: the rerank and sparse routes (FastAPI's) count it as the hot path does."""
    peer = ThreeDimensions()
    caplog.set_level(logging.ERROR, logger="gateway")
    paths = ("/v1/embeddings", "/v1/rerank", "/v1/embeddings/sparse")
    with scripted_grpc_peer(peer) as target, running_gateway(targets=[target]) as base:
        host, port = base.removeprefix("http://").split(":")
        for path in paths:
            with socket.create_connection((host, int(port))) as raw:
                raw.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            "Content-Length: 1000\r\n\r\n{\"model\": \"m\", \"inp".encode())
        r = post(base, {"model": "m", "input": "still here"})
        assert r.status_code == 200

        def gone() -> dict[str, float]:
            samples = gateway_samples(base)
            return {p: total("embedding_gateway_http_requests_total", samples, route=p, method="POST", status="499")
                    for p in paths}

        wait_until(lambda: all(gone().values()), 10, "the three hung-up requests counted")
        assert gone() == {p: 1 for p in paths}
        samples = gateway_samples(base)
    assert total("embedding_gateway_http_requests_total", samples, status="500") == 0
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(peer.calls) == 1  # the half-sent requests never reached the service
