"""Small Embed calls merged in Serve's proxy (proxy/merging.py), through the session's real proxy: each caller gets
what it gets alone (vectors, order, tokens, its own error)."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np

from embedding_client.errors import read_details
from embedding_client.v1 import embedding_pb2 as pb
from embedding_client.v1 import embedding_pb2_grpc
from embedding_service.wire.reasons import Reason
from tests.helpers.models import MINILM
from tests.helpers.observe import settled, total
from tests.helpers.texts import text_inputs


def _texts(k: int) -> list[str]:
    return [f"merged caller {k} input {j} " + "word " * ((k * 5 + j) % 11) for j in range(1 + k % 3)]


def _request(k: int) -> pb.EmbedRequest:
    request = pb.EmbedRequest(model=MINILM, inputs=text_inputs(_texts(k)))
    if k % 4 == 1:
        request.dimensions = 16  # another key: merged only with its like
    if k % 4 == 2:
        request.encoding = pb.VECTOR_ENCODING_FLOAT32_LE
    return request


def _vectors(response: pb.EmbedResponse) -> np.ndarray:
    return np.array([np.frombuffer(e.float32_le, "<f4") if e.float32_le else list(e.values)
                     for e in response.embeddings], dtype=np.float32)


def _concurrently(target: str, requests: list[pb.EmbedRequest]) -> list:
    async def main():
        async with grpc.aio.insecure_channel(target) as channel:
            stub = embedding_pb2_grpc.EmbedServiceStub(channel)

            async def one(request):
                try:
                    return await stub.Embed(request, timeout=60)
                except grpc.aio.AioRpcError as err:
                    return err

            return await asyncio.gather(*(one(r) for r in requests))

    return asyncio.run(main())


def test_merged_calls_give_each_caller_its_own_vectors_order_and_usage(service, reference_models):
    callers = 96
    requests = [_request(k) for k in range(callers)]
    alone = [service.stub.Embed(r, timeout=60) for r in requests[:8]]
    before = settled("ray_embedding_proxy_merged_callers_count", 1.0)
    replies = _concurrently(service.target, requests)
    settled("ray_embedding_proxy_merged_callers_count", 1.0)
    after = settled("ray_embedding_requests_total", 1.0, method="Embed", model=MINILM)

    reference = reference_models[MINILM]
    for k, (request, reply) in enumerate(zip(requests, replies)):
        assert isinstance(reply, pb.EmbedResponse), reply
        texts = _texts(k)
        expected = reference.encode(texts, normalize_embeddings=True)
        dims = 16 if k % 4 == 1 else expected.shape[1]
        if dims != expected.shape[1]:
            expected = expected[:, :dims] / np.linalg.norm(expected[:, :dims], axis=1, keepdims=True)
        assert reply.model == MINILM and reply.dimensions == dims
        assert [e.index for e in reply.embeddings] == list(range(len(texts)))
        assert np.abs(_vectors(reply) - expected).max() < 1e-5
        tokens = [len(reference.tokenizer(t)["input_ids"]) for t in texts]
        assert [e.tokens for e in reply.embeddings] == tokens
        assert reply.usage.prompt_tokens == reply.usage.total_tokens == sum(tokens)
        if k < len(alone):
            assert [e.tokens for e in reply.embeddings] == [e.tokens for e in alone[k].embeddings]
            assert np.abs(_vectors(reply) - _vectors(alone[k])).max() < 1e-6

    def delta(name: str) -> float:
        return total(name, after) - total(name, before)

    sent = delta("ray_embedding_proxy_merged_callers_count")
    print(f"{callers} concurrent calls left the proxy as {sent:.0f} calls to the router")
    assert 0 < sent < callers  # some of them together
    # The router counts the calls it was sent, merged or not, as the callers' calls.
    assert total("ray_embedding_requests_total", after, method="Embed", model=MINILM, code="OK") - \
        total("ray_embedding_requests_total", before, method="Embed", model=MINILM, code="OK") == callers


def test_an_input_refused_in_a_merged_call_fails_only_its_caller_with_its_own_index(service):
    requests = [pb.EmbedRequest(model=MINILM, inputs=text_inputs([f"fine {k}"])) for k in range(48)]
    bad = 7
    requests[bad].inputs.add().token_ids.ids.extend([101, 10**7, 102])  # its input 1: out of the vocabulary
    replies = _concurrently(service.target, requests)
    error = replies[bad]
    assert isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = read_details(error.trailing_metadata())
    assert details.reason == Reason.TOKEN_ID_OUT_OF_RANGE.name and details.metadata["index"] == "1"
    for k, reply in enumerate(replies):
        if k != bad:
            assert isinstance(reply, pb.EmbedResponse) and len(reply.embeddings) == 1, reply
