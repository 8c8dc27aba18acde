"""The gateway's rerank and sparse routes against the real service: the official cohere SDK at /v2/rerank,
Jina's shape at /v1/rerank, sparse vectors at /v1/embeddings/sparse, each equal to sentence-transformers'
own CrossEncoder and SparseEncoder, with the embeddings route's auth, errors and metrics."""

from __future__ import annotations

import cohere
import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.gateways import running_gateway
from tests.helpers.models import MINILM, RERANK_MAX_SEQ, RERANKER, SPLADE
from tests.helpers.scoring import sparse_reference

KEY = "gateway-key"
DOCUMENTS = ["cats sleep most of the day", "the stock market fell", "kittens chase string", "rain in spain",
             "a cat naps in the sun"]

QUERY = "how do cats spend the day"


@pytest.fixture(scope="module")
def gateway(service):
    with running_gateway(targets=[service.target], api_keys=[KEY]) as base:
        yield base


def _post(base: str, path: str, body: dict, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(base + path, json=body, headers=headers, timeout=60)


def test_the_cohere_sdk_reranks_as_cross_encoder_does(gateway, cross_encoder):
    client = cohere.ClientV2(api_key=KEY, base_url=gateway)
    reply = client.rerank(model=RERANKER, query=QUERY, documents=DOCUMENTS, top_n=3)
    expected = cross_encoder.predict([[QUERY, d] for d in DOCUMENTS])  # relevance: the model's activation
    order = list(np.argsort(-expected, kind="stable")[:3])
    assert [r.index for r in reply.results] == order
    assert np.abs(np.array([r.relevance_score for r in reply.results]) - expected[order]).max() < 1e-5
    assert reply.meta.billed_units.search_units == 1 and reply.id


def test_jina_shape_at_v1_rerank_with_documents_and_raw_scores(gateway, cross_encoder):
    documents = [{"text": d} for d in DOCUMENTS[:3]] + DOCUMENTS[3:]  # Jina and Cohere v1 send objects too
    reply = _post(gateway, "/v1/rerank", {"model": RERANKER, "query": QUERY, "documents": documents,
                                          "return_documents": True, "raw_scores": True})
    assert reply.status_code == 200, reply.text
    got = reply.json()
    raw = cross_encoder.predict([[QUERY, d] for d in DOCUMENTS], activation_fn=torch.nn.Identity())
    assert sorted(r["index"] for r in got["results"]) == list(range(len(DOCUMENTS)))
    for r in got["results"]:
        assert abs(r["relevance_score"] - raw[r["index"]]) < 1e-5 and r["document"]["text"] == DOCUMENTS[r["index"]]
    assert got["model"] == RERANKER and got["usage"]["total_tokens"] > 0


def test_rerank_errors_are_openai_error_objects(gateway):
    assert _post(gateway, "/v2/rerank", {"query": QUERY, "documents": DOCUMENTS}, key=None).status_code == 401
    cases = {
        "empty query": ({"model": RERANKER, "query": "", "documents": DOCUMENTS}, 400, "query", "empty_query"),
        "no documents": ({"model": RERANKER, "query": QUERY, "documents": []}, 400, "documents", "no_inputs"),
        "top_n past the list": ({"model": RERANKER, "query": QUERY, "documents": DOCUMENTS, "top_n": 9}, 400,
                                "top_n", "invalid_top"),
        "top_n of 0": ({"model": RERANKER, "query": QUERY, "documents": DOCUMENTS, "top_n": 0}, 400, "top_n", None),
        "an embedding model": ({"model": MINILM, "query": QUERY, "documents": DOCUMENTS}, 400, "model",
                               "wrong_model_kind"),
        "an unknown model": ({"model": "nope", "query": QUERY, "documents": DOCUMENTS}, 404, "model",
                             "model_not_found"),
        "an option not served": ({"model": RERANKER, "query": QUERY, "documents": DOCUMENTS,
                                  "max_tokens_per_doc": 10}, 400, None, None),
        "a pair over the maximum, refused": ({"model": RERANKER, "query": QUERY, "truncate": False,
                                              "documents": ["short", "word " * (2 * RERANK_MAX_SEQ)]}, 400,
                                             "documents", "input_too_long"),
    }
    for name, (body, status, param, code) in cases.items():
        reply = _post(gateway, "/v2/rerank", body)
        assert reply.status_code == status, (name, reply.text)
        error = reply.json()["error"]
        assert error["type"] == ("invalid_request_error"), (name, error)
        if param is not None:
            assert error["param"] == param, (name, error)
        if code is not None:
            assert error["code"] == code, (name, error)


def test_sparse_embeddings_equal_sparse_encoder(gateway, sparse_encoder):
    texts = ["a short sentence about cats", "the stock market fell sharply today", "rain"]
    reply = _post(gateway, "/v1/embeddings/sparse", {"model": SPLADE, "input": texts, "top_k": 20,
                                                     "return_tokens": True})
    assert reply.status_code == 200, reply.text
    got = reply.json()
    assert got["model"] == SPLADE and [d["index"] for d in got["data"]] == [0, 1, 2]
    for item, (indices, values) in zip(got["data"], sparse_reference(sparse_encoder, texts, 20)):
        assert item["indices"] == indices.tolist()
        assert np.abs(np.array(item["values"], dtype=np.float32) - values).max() < 1e-5
        assert item["terms"] == sparse_encoder.tokenizer.convert_ids_to_tokens(indices.tolist())
    assert got["usage"]["prompt_tokens"] == got["usage"]["total_tokens"] > 0
    one = _post(gateway, "/v1/embeddings/sparse", {"input": "rain", "top_k": 20}).json()  # the first sparse model
    assert one["data"][0]["indices"] == got["data"][2]["indices"] and "terms" not in one["data"][0]
    wrong = _post(gateway, "/v1/embeddings/sparse", {"model": RERANKER, "input": "x"})
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "wrong_model_kind"
    bad_top = _post(gateway, "/v1/embeddings/sparse", {"model": SPLADE, "input": "x", "top_k": 0})
    assert bad_top.status_code == 400 and bad_top.json()["error"]["param"] == "top_k"


def test_the_new_routes_are_counted_by_their_templates(gateway):
    _post(gateway, "/v2/rerank", {"query": QUERY, "documents": DOCUMENTS})
    _post(gateway, "/v1/embeddings/sparse", {"input": "x"})
    text = httpx.get(gateway + "/metrics", timeout=10).text
    routes = {(s.labels["route"], s.labels["status"]) for f in text_string_to_metric_families(text) for s in f.samples
              if s.name == "embedding_gateway_http_requests_total"}
    assert {("/v2/rerank", "200"), ("/v1/embeddings/sparse", "200")} <= routes
