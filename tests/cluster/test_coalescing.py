"""Coalescing in the router against the session's service: concurrent small calls leave merged and each caller gets
what a call of its own gets; a rejected input fails only its own caller. The Coalescer on its own:
tests/unit/test_coalescing.py."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from embedding_client.v1 import embedding_pb2 as pb
from tests.helpers.models import MINILM
from tests.helpers.observe import settled, total
from tests.helpers.texts import text_inputs, vectors_of


def test_concurrent_small_calls_are_coalesced_and_equal_separate_calls(service, reference_models):
    """64 callers at once against the real service: each gets exactly what it gets alone."""
    stub = service.stub
    texts = [[f"caller {k} sentence {j} " + "word " * ((k * 7 + j) % 13) for j in range(1 + k % 3)] for k in range(64)]
    alone = [stub.Embed(pb.EmbedRequest(model=MINILM, inputs=text_inputs(t)), timeout=60) for t in texts]
    before = settled("ray_embedding_coalesced_callers_count", 1.0, model=MINILM)

    def call(t):
        return stub.Embed(pb.EmbedRequest(model=MINILM, inputs=text_inputs(t)), timeout=60)

    with ThreadPoolExecutor(64) as pool:
        together = list(pool.map(call, texts))
    for t, a, b in zip(texts, alone, together):
        assert np.abs(vectors_of(a) - vectors_of(b)).max() < 1e-6
        expected = reference_models[MINILM].encode(t, normalize_embeddings=True)
        assert np.abs(vectors_of(b) - expected).max() < 1e-5
        assert [e.tokens for e in a.embeddings] == [e.tokens for e in b.embeddings]
        assert a.usage.total_tokens == b.usage.total_tokens
    after = settled("ray_embedding_coalesced_callers_count", 1.0, model=MINILM)

    def delta(name: str) -> float:
        return total(name, after, model=MINILM) - total(name, before, model=MINILM)

    merged_calls = delta("ray_embedding_coalesced_callers_count")
    print(f"64 concurrent calls left the router as {merged_calls:.0f} handle calls")
    assert merged_calls < len(texts)  # some went together


def test_a_rejected_input_among_concurrent_calls_fails_only_its_caller(service):
    stub = service.stub
    long_text = " ".join(["token"] * 400)  # past MiniLM's 256

    def call(k: int):
        inputs = [f"call {k} fine"] + ([long_text] if k == 5 else [])
        request = pb.EmbedRequest(model=MINILM, inputs=text_inputs(inputs), truncation=pb.TRUNCATION_POLICY_REJECT)
        try:
            return stub.Embed(request, timeout=60)
        except grpc.RpcError as err:
            return err.code()

    with ThreadPoolExecutor(32) as pool:
        outcomes = list(pool.map(call, range(32)))
    assert outcomes[5] == grpc.StatusCode.INVALID_ARGUMENT
    assert all(isinstance(o, pb.EmbedResponse) and len(o.embeddings) == 1 for k, o in enumerate(outcomes) if k != 5)
