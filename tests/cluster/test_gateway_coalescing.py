"""Coalescing in the gateway against the session's service: concurrent REST calls leave as merged gRPC calls and each
caller gets exactly what a call of its own returns; a refused input fails only its caller; past the queue bound, 429."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from embedding_client.v1 import embedding_pb2 as pb
from tests.helpers.gateways import running_gateway
from tests.helpers.models import MINILM
from tests.helpers.texts import make_texts, text_inputs, vectors_of


def _callers_histogram(base: str) -> tuple[float, float]:
    """(merged calls, callers they carried) from the gateway's own scrape."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return samples["embedding_gateway_coalesced_callers_count"], samples["embedding_gateway_coalesced_callers_sum"]


async def _post_all(base: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=httpx.Limits(max_connections=100)) as client:
        return await asyncio.gather(*(client.post("/v1/embeddings", json=b) for b in bodies))


def test_merged_calls_return_what_separate_calls_return(service):
    texts = make_texts(150, seed=77)
    bodies, k = [], 0
    for i in range(64):  # 1-3 inputs each; a quarter asks for 128 dimensions (merged apart from the rest)
        n = 1 + i % 3
        body = {"model": MINILM, "input": texts[k : k + n], "encoding_format": "float"}
        if i % 4 == 0:
            body["dimensions"] = 128
        bodies.append(body)
        k += n
    # One merged call out at a time: everything arriving meanwhile leaves together.
    with running_gateway(targets=[service.target], coalesce_max_in_flight=1) as base:
        replies = asyncio.run(_post_all(base, bodies))
        calls, callers = _callers_histogram(base)

    assert callers == len(bodies) and calls < len(bodies) / 4, (calls, callers)
    for body, reply in zip(bodies, replies):
        assert reply.status_code == 200, reply.text
        request = pb.EmbedRequest(model=MINILM, inputs=text_inputs(body["input"]))
        if "dimensions" in body:
            request.dimensions = body["dimensions"]
        alone = service.stub.Embed(request)
        got = reply.json()
        assert [d["index"] for d in got["data"]] == list(range(len(body["input"])))
        vectors = np.array([d["embedding"] for d in got["data"]], dtype=np.float32)
        assert np.abs(vectors - vectors_of(alone)).max() < 1e-6
        assert got["usage"]["prompt_tokens"] == got["usage"]["total_tokens"] == alone.usage.prompt_tokens


async def _post_behind_a_slow_call(base: str, slow: dict, bodies: list[dict]) -> list[httpx.Response]:
    """`bodies` posted at once while `slow` holds the one merged call allowed out, so they all queue and leave merged
    (posted alone, the first to arrive would leave alone; which one that is, is up to the connections)."""
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=httpx.Limits(max_connections=100)) as client:
        slow_reply = asyncio.create_task(client.post("/v1/embeddings", json=slow))
        for _ in range(3000):
            scrape = (await client.get("/metrics")).text
            if 'embedding_gateway_coalesced_callers_count 1.0' in scrape:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the slow call never left the gateway")
        replies = await asyncio.gather(*(client.post("/v1/embeddings", json=b) for b in bodies))
        assert (await slow_reply).status_code == 200
        return replies


def test_a_refused_input_fails_only_its_own_caller(service):
    texts = make_texts(31, seed=78)
    bodies = [{"model": MINILM, "input": [t], "encoding_format": "float"} for t in texts]
    bad = 13
    bodies.insert(bad, {"model": MINILM, "input": [[101, 2_000_000_000, 102]], "encoding_format": "float"})
    slow = {"model": MINILM, "input": ["long " * 300] * 32, "encoding_format": "float"}
    with running_gateway(targets=[service.target], coalesce_max_in_flight=1) as base:
        replies = asyncio.run(_post_behind_a_slow_call(base, slow, bodies))
        calls, callers = _callers_histogram(base)

    refused = replies[bad]
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "token_id_out_of_range"
    assert refused.json()["error"]["param"] == "input"
    others = [r for i, r in enumerate(replies) if i != bad]
    assert all(r.status_code == 200 for r in others), [r.text for r in others if r.status_code != 200][:2]
    vectors = np.array([r.json()["data"][0]["embedding"] for r in others], dtype=np.float32)
    expected = vectors_of(service.stub.Embed(pb.EmbedRequest(model=MINILM, inputs=text_inputs(texts))))
    assert np.abs(vectors - expected).max() < 1e-6
    # The callers merged with the refused one went again, each alone: more callers sent than came (the slow one and
    # the 32).
    assert callers > len(bodies) + 1 and calls < callers, (calls, callers)


def test_requests_past_the_queue_bound_get_429_and_the_rest_their_vectors(service):
    texts = make_texts(120, seed=5)
    bodies = [{"model": MINILM, "input": [t], "encoding_format": "float"} for t in texts]
    with running_gateway(targets=[service.target], coalesce_max_in_flight=1, coalesce_max_queued=8) as base:
        replies = asyncio.run(_post_all(base, bodies))
        scrape = httpx.get(f"{base}/metrics", timeout=10).text
    refused = [r for r in replies if r.status_code == 429]
    served = [(b, r) for b, r in zip(bodies, replies) if r.status_code == 200]
    assert refused and served and len(refused) + len(served) == len(bodies), [r.status_code for r in replies]
    for r in refused:
        assert r.headers["Retry-After"] == "1"
        error = r.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
        assert "8 requests waiting" in error["message"]
    samples = {s.name: s.value for f in text_string_to_metric_families(scrape) for s in f.samples}
    assert samples["embedding_gateway_coalescing_refused_total"] == len(refused)
    alone = service.stub.Embed(pb.EmbedRequest(model=MINILM, inputs=text_inputs([b["input"][0] for b, _ in served])))
    vectors = np.array([r.json()["data"][0]["embedding"] for _, r in served], dtype=np.float32)
    assert np.abs(vectors - vectors_of(alone)).max() < 1e-5
