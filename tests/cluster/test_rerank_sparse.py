"""Rerank and sparse models served beside the embedding models, through Serve's real gRPC proxy: the scores and
sparse vectors equal sentence-transformers' own CrossEncoder and SparseEncoder on the same inputs, in order,
with their limits and errors."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.wire.reasons import Reason
from tests.helpers.grpc_errors import error_info
from tests.helpers.models import MINILM, RERANK_MAX_SEQ, RERANKER, SPLADE
from tests.helpers.scoring import raw_scores, sparse_reference
from tests.helpers.session import MAX_DOCUMENTS_PER_RERANK, MAX_SPARSE_TERMS
from tests.helpers.texts import make_texts

QUERY = "how do cats spend the day"


def _expect(code: grpc.StatusCode, reason: Reason, call, *args, **kwargs) -> dict:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, timeout=60, **kwargs)
    err = caught.value
    assert err.code() == code, (err.code(), err.details())
    info = error_info(err)
    assert info.reason == reason.name, (info.reason, err.details())
    return dict(info.metadata)


def test_rerank_equals_cross_encoder_scores_and_order(service, cross_encoder):
    documents = make_texts(80, seed=23, max_words=12)  # more than one shard of 32
    reply = service.stub.Rerank(pb.RerankRequest(model=RERANKER, query=QUERY, documents=documents,
                                                 return_documents=True), timeout=60)
    raw = raw_scores(cross_encoder, QUERY, documents)
    assert reply.model == RERANKER and len(reply.results) == len(documents)
    got = {r.index: r.score for r in reply.results}
    assert sorted(got) == list(range(len(documents)))
    assert np.abs(np.array([got[i] for i in range(len(documents))]) - raw).max() < 1e-5
    # CrossEncoder.rank's order, but where two documents' scores are within the 1e-5 of their computation.
    ranked = [r["corpus_id"] for r in cross_encoder.rank(QUERY, documents, activation_fn=torch.nn.Identity())]
    ours = [r.index for r in reply.results]
    assert np.all(np.diff(raw[ours]) <= 1e-5), "ranked highest first"
    assert all(a == b or abs(raw[a] - raw[b]) <= 1e-5 for a, b in zip(ours, ranked)), (ours, ranked)
    assert all(r.document == documents[r.index] for r in reply.results)
    pair_tokens = [len(ids) for ids in cross_encoder.tokenizer([QUERY] * len(documents), documents,
                                                                truncation=True, max_length=RERANK_MAX_SEQ)["input_ids"]]
    assert [r.tokens for r in sorted(reply.results, key=lambda r: r.index)] == pair_tokens
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == sum(pair_tokens)


def test_rerank_top_n_and_activation(service, cross_encoder):
    documents = ["cats sleep most of the day", "the stock market fell", "kittens chase string", "rain in spain"]
    reply = service.stub.Rerank(pb.RerankRequest(query=QUERY, documents=documents, top_n=2, activation=True),
                                timeout=60)  # no model named: the first rerank model
    assert reply.model == RERANKER
    expected = cross_encoder.predict([[QUERY, d] for d in documents])  # its default activation: sigmoid
    order = list(np.argsort(-expected, kind="stable")[:2])
    assert [r.index for r in reply.results] == order
    assert np.abs(np.array([r.score for r in reply.results]) - expected[order]).max() < 1e-5
    assert not any(r.HasField("document") for r in reply.results)
    # Usage counts every pair scored, not only the top_n returned.
    full = service.stub.Rerank(pb.RerankRequest(query=QUERY, documents=documents), timeout=60)
    assert reply.usage.prompt_tokens == full.usage.prompt_tokens == sum(r.tokens for r in full.results)


def test_rerank_stream_returns_every_document_once_with_its_score(service, cross_encoder):
    documents = make_texts(100, seed=5, max_words=10)
    chunks = list(service.stub.RerankStream(pb.RerankStreamRequest(model=RERANKER, query=QUERY, documents=documents),
                                            timeout=60))
    assert len(chunks) > 1
    scores = {r.index: r.score for c in chunks for r in c.results}
    assert sorted(scores) == list(range(len(documents))) and sum(len(c.results) for c in chunks) == len(documents)
    raw = raw_scores(cross_encoder, QUERY, documents)
    assert np.abs(np.array([scores[i] for i in range(len(documents))]) - raw).max() < 1e-5


def test_sparse_vectors_equal_sparse_encoder(service, sparse_encoder):
    texts = make_texts(45, seed=9, max_words=15)
    reply = service.stub.EmbedSparse(pb.EmbedSparseRequest(model=SPLADE, inputs=texts, top_k=64, return_tokens=True),
                                     timeout=60)
    # The reference's dimension once it has encoded: sentence-transformers (6.3) reports the transformer's hidden size
    # for a SPLADE encoder that has run no forward pass yet, and the vocabulary's size after.
    reference = sparse_reference(sparse_encoder, texts, 64)
    assert reply.model == SPLADE and reply.dimensions == sparse_encoder.get_embedding_dimension()
    assert [e.index for e in reply.embeddings] == list(range(len(texts)))
    for e, (indices, values) in zip(reply.embeddings, reference):
        assert list(e.indices) == indices.tolist()
        assert np.abs(np.array(e.values, dtype=np.float32) - values).max() < 1e-5
        assert list(e.terms) == sparse_encoder.tokenizer.convert_ids_to_tokens(indices.tolist())
        assert e.active_terms >= len(e.indices) == 64
    tokens = [len(ids) for ids in sparse_encoder.tokenizer(texts, truncation=True,
                                                           max_length=sparse_encoder.max_seq_length)["input_ids"]]
    assert [e.tokens for e in reply.embeddings] == tokens and reply.usage.prompt_tokens == sum(tokens)


def test_sparse_vectors_without_top_k_keep_up_to_the_limit(service, sparse_encoder):
    texts = ["a short sentence", "another one about cats and dogs"]
    reply = service.stub.EmbedSparse(pb.EmbedSparseRequest(inputs=texts), timeout=60)  # the first sparse model
    assert reply.model == SPLADE
    dense = sparse_encoder.encode(texts, convert_to_tensor=True, convert_to_sparse_tensor=False).numpy()
    for e, (indices, values), row in zip(reply.embeddings, sparse_reference(sparse_encoder, texts, MAX_SPARSE_TERMS),
                                         dense):
        assert e.active_terms == int(np.count_nonzero(row))  # the random model's vectors are far from sparse
        assert list(e.indices) == indices.tolist() and len(e.indices) == min(e.active_terms, MAX_SPARSE_TERMS)
        assert np.abs(np.array(e.values, dtype=np.float32) - values).max() < 1e-5
        assert not e.terms


def test_models_report_their_kind_limits_and_health(service):
    listing = service.stub.ListModels(pb.ListModelsRequest(), timeout=60)
    kinds = {m.name: m.kind for m in listing.models}
    assert kinds[MINILM] == pb.MODEL_KIND_EMBEDDING
    assert kinds[RERANKER] == pb.MODEL_KIND_RERANK and kinds[SPLADE] == pb.MODEL_KIND_SPARSE
    assert listing.limits.max_sparse_terms == MAX_SPARSE_TERMS
    assert listing.limits.max_documents_per_rerank > 0 and listing.limits.max_documents_per_rerank_stream > 0
    model = service.stub.GetModel(pb.GetModelRequest(name=RERANKER), timeout=60).model
    assert model.kind == pb.MODEL_KIND_RERANK and model.dimension == 1
    assert model.max_sequence_length == RERANK_MAX_SEQ and not model.HasField("quantization")
    health = health_pb2_grpc.HealthStub(service.channel)
    for name in (RERANKER, SPLADE):
        assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=30).status == \
            health_pb2.HealthCheckResponse.SERVING


INVALID = grpc.StatusCode.INVALID_ARGUMENT


def test_bad_rerank_and_sparse_calls_get_precise_codes_and_reasons(service):
    stub, docs = service.stub, ["one document", "another"]
    _expect(INVALID, Reason.EMPTY_QUERY, stub.Rerank, pb.RerankRequest(model=RERANKER, documents=docs))
    assert _expect(INVALID, Reason.NO_INPUTS, stub.Rerank, pb.RerankRequest(model=RERANKER, query="q"))["field"] == \
        "documents"
    limits = service.config.args.limits
    many = ["d"] * (limits.max_documents_per_rerank + 1)
    assert _expect(INVALID, Reason.TOO_MANY_INPUTS, stub.Rerank,
                   pb.RerankRequest(model=RERANKER, query="q", documents=many))["field"] == "documents"
    big = ["fine", "x" * (limits.max_chars_per_input + 1)]
    assert _expect(INVALID, Reason.INPUT_TOO_LARGE, stub.Rerank,
                   pb.RerankRequest(model=RERANKER, query="q", documents=big))["index"] == "1"
    assert _expect(INVALID, Reason.EMPTY_INPUT, stub.Rerank,
                   pb.RerankRequest(model=RERANKER, query="q", documents=["a", "", "b"]))["index"] == "1"
    for top in (0, 3, -1):
        meta = _expect(INVALID, Reason.INVALID_TOP, stub.Rerank,
                       pb.RerankRequest(model=RERANKER, query="q", documents=docs, top_n=top))
        assert meta["field"] == "top_n" and meta["max"] == "2"
    long_doc = "word " * (RERANK_MAX_SEQ * 2)
    meta = _expect(INVALID, Reason.INPUT_TOO_LONG, stub.Rerank,
                   pb.RerankRequest(model=RERANKER, query="q", documents=["short", long_doc],
                                    truncation=pb.TRUNCATION_POLICY_REJECT))
    assert meta["index"] == "1" and meta["max_tokens"] == str(RERANK_MAX_SEQ)
    for policy in (pb.TRUNCATION_POLICY_START, pb.TRUNCATION_POLICY_WINDOWS, 99):
        _expect(INVALID, Reason.INVALID_TRUNCATION, stub.Rerank,
                pb.RerankRequest(model=RERANKER, query="q", documents=docs, truncation=policy))
    for top in (0, MAX_SPARSE_TERMS + 1):
        assert _expect(INVALID, Reason.INVALID_TOP, stub.EmbedSparse,
                       pb.EmbedSparseRequest(model=SPLADE, inputs=["a"], top_k=top))["field"] == "top_k"
    _expect(INVALID, Reason.NO_INPUTS, stub.EmbedSparse, pb.EmbedSparseRequest(model=SPLADE))
    # The wrong method for the model's kind.
    failed = grpc.StatusCode.FAILED_PRECONDITION
    meta = _expect(failed, Reason.WRONG_MODEL_KIND, stub.Embed,
                   pb.EmbedRequest(model=RERANKER, inputs=[pb.EmbedInput(text="x")]))
    assert meta == {"model": RERANKER, "kind": "rerank", "needed": "embedding"}
    _expect(failed, Reason.WRONG_MODEL_KIND, stub.EmbedSparse, pb.EmbedSparseRequest(model=RERANKER, inputs=["x"]))
    _expect(failed, Reason.WRONG_MODEL_KIND, stub.Rerank, pb.RerankRequest(model=SPLADE, query="q", documents=docs))
    _expect(failed, Reason.WRONG_MODEL_KIND, stub.Rerank, pb.RerankRequest(model=MINILM, query="q", documents=docs))
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.RerankStream(pb.RerankStreamRequest(model=MINILM, query="q", documents=docs), timeout=60))
    assert caught.value.code() == failed and caught.value.details().startswith("WRONG_MODEL_KIND: ")
    _expect(grpc.StatusCode.NOT_FOUND, Reason.MODEL_NOT_FOUND, stub.Rerank,
            pb.RerankRequest(model="no-such-model", query="q", documents=docs))
    # Nothing lost: the service answers right after.
    assert len(stub.Rerank(pb.RerankRequest(query="q", documents=docs), timeout=60).results) == 2


def test_the_client_splits_a_big_rerank_and_ranks_it_whole(service, cross_encoder):
    from embedding_client import AsyncEmbedClient, EmbedClient

    documents = make_texts(450, seed=31, max_words=8)  # over MAX_DOCUMENTS_PER_RERANK: three calls
    assert len(documents) > MAX_DOCUMENTS_PER_RERANK * 2
    raw = raw_scores(cross_encoder, QUERY, documents)
    with EmbedClient(service.target) as client:
        calls = client.stats.calls
        result = client.rerank(QUERY, documents, top_n=25, return_documents=True)
        assert client.stats.calls - calls >= 3
        sparse = client.embed_sparse(["rain", "cats and dogs"], top_k=8, return_tokens=True)
    assert result.model == RERANKER and len(result.results) == 25
    ours = [r.index for r in result.results]
    # Ranked over all 450, not per call: the 25 highest scores of the whole list, highest first.
    assert np.all(np.diff(raw[ours]) <= 1e-5)
    assert np.abs(raw[ours] - np.sort(raw)[::-1][:25]).max() < 1e-5
    assert all(abs(r.score - raw[r.index]) < 1e-5 and r.document == documents[r.index] for r in result.results)
    assert len(sparse.vectors) == 2 and all(len(v.indices) == 8 and len(v.terms) == 8 for v in sparse.vectors)

    async def asyncio_client():
        async with AsyncEmbedClient(service.target) as client:
            return await client.rerank(QUERY, documents[:10], activation=True)

    import asyncio

    ranked = asyncio.run(asyncio_client())
    expected = cross_encoder.predict([[QUERY, d] for d in documents[:10]])
    assert np.abs(np.array([r.score for r in ranked.results]) - expected[[r.index for r in ranked.results]]).max() \
        < 1e-5


def test_cli_sparse_and_rerank_write_jsonl_and_parquet(service, cross_encoder, sparse_encoder, tmp_path):
    import json
    import subprocess
    import sys

    import pyarrow.parquet as pq

    texts = make_texts(30, seed=37, max_words=10)
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    base = [sys.executable, "-m", "embedding_client"]
    common = ["--target", service.target, "--field", "body", "--no-progress"]
    for output in (tmp_path / "sparse.jsonl", tmp_path / "sparse.parquet"):
        done = subprocess.run(base + ["sparse", str(source), str(output), "--top-k", "16", "--chunk", "7", *common],
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        rows = ([json.loads(line) for line in output.read_text().splitlines()] if output.suffix == ".jsonl"
                else pq.read_table(output).to_pylist())
        assert [r["index"] for r in rows] == list(range(len(texts)))
        for row, (indices, values) in zip(rows, sparse_reference(sparse_encoder, texts, 16)):
            assert list(row["indices"]) == indices.tolist()
            assert np.abs(np.array(row["values"], dtype=np.float32) - values).max() < 1e-5
    assert not list(tmp_path.glob("sparse.*.progress.json")) and not list(tmp_path.glob("*.partial.*"))
    raw = raw_scores(cross_encoder, QUERY, texts)
    for output in (tmp_path / "ranked.jsonl", tmp_path / "ranked.parquet"):
        done = subprocess.run(base + ["rerank", QUERY, str(source), str(output), "--top-n", "5", "--return-documents",
                                      *common], capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        rows = ([json.loads(line) for line in output.read_text().splitlines()] if output.suffix == ".jsonl"
                else pq.read_table(output).to_pylist())
        assert len(rows) == 5 and np.all(np.diff(raw[[r["index"] for r in rows]]) <= 1e-5)
        assert all(abs(r["score"] - raw[r["index"]]) < 1e-5 and r["document"] == texts[r["index"]] for r in rows)
    again = subprocess.run(base + ["rerank", QUERY, str(source), str(tmp_path / "ranked.jsonl"), *common],
                           capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode != 0 and "exists" in again.stderr


def test_a_reranker_replica_killed_mid_stream_is_retried(service, cross_encoder):
    import threading

    import ray

    from embedding_service.wire.messages import model_deployment_name
    from tests.helpers.replicas import replica_actors, wait_healthy

    deployment = model_deployment_name(RERANKER)
    (victim,) = replica_actors(deployment)
    documents = make_texts(20_000, seed=41, max_words=30)  # seconds of work for the tiny model, ~3 MB
    chunks: list = []
    outcome: dict = {}

    def call():
        try:
            for chunk in service.stub.RerankStream(pb.RerankStreamRequest(query=QUERY, documents=documents),
                                                   timeout=300):
                chunks.append(chunk)
        except Exception as exc:  # reported below
            outcome["error"] = exc

    from tests.helpers.observe import total, wait_until

    retries = total("ray_embedding_shard_retries_total", model=RERANKER)
    caller = threading.Thread(target=call)
    caller.start()

    wait_until(lambda: len(chunks) >= 2 or not caller.is_alive(), 120, "the first chunks")
    assert caller.is_alive() and len(chunks) < len(documents) // 32, "the stream ended before the kill"
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    caller.join(timeout=300)
    assert "error" not in outcome, outcome.get("error")
    scores = {r.index: r.score for c in chunks for r in c.results}
    assert sorted(scores) == list(range(len(documents))) and sum(len(c.results) for c in chunks) == len(documents)
    raw = raw_scores(cross_encoder, QUERY, documents)
    assert np.abs(np.array([scores[i] for i in range(len(documents))]) - raw).max() < 1e-5
    # The router sent the dead replica's shards again (counted), and Serve replaced the replica.
    wait_until(lambda: total("ray_embedding_shard_retries_total", model=RERANKER) > retries, 30, "retries counted")
    wait_healthy()
    assert {a["name"] for a in replica_actors(deployment)} != {victim["name"]}
