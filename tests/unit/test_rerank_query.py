"""A rerank query's cost: bounded by max_query_tokens in the router (counted once per call, by the model's own
tokenizer, and refused INVALID_ARGUMENT INPUT_TOO_LONG before any replica scores a pair), and tokenized once per
shard in the replica (model/pairs.py), whose scores stay sentence-transformers' CrossEncoder's own. The real router
method and replica class, without Ray; the same through Serve's proxy is tests/cluster/test_rerank_sparse.py."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.config import AppArgs, Limits, ModelSettings
from embedding_service.model import pairs as pairs_module
from embedding_service.model.scoring import RerankModel
from embedding_service.model.watchdog import Placement
from embedding_service.router import catalog as catalog_module
from embedding_service.router.catalog import ModelCatalog
from embedding_service.router.convert import limits_message
from embedding_service.router.deployment import EmbedRouter
from embedding_service.router.methods import METHODS
from embedding_service.router.token_lengths import TokenLengths
from embedding_service.wire.deadline import Deadline
from embedding_service.wire.messages import ModelInfo, RerankOptions, ShardRequest
from embedding_service.wire.reasons import Reason, ServiceError
from tests.helpers.models import RERANK_MAX_SEQ, RERANKER
from tests.helpers.recycler import RecyclerHandle
from tests.helpers.scoring import raw_scores
from tests.helpers.texts import make_texts

QUERY = "how do cats spend the day"
# 100,000 characters of words: about 19,000 tokens (32 pairs of it took 1.27 s on a replica's event loop).
HUGE_QUERY = " ".join(make_texts(20_000, seed=1, max_words=12))[:100_000]


# ---- the router: the bound ----------------------------------------------


class _Describe:
    def __init__(self, info: ModelInfo) -> None:
        self.info = info

    def remote(self):
        async def reply():
            return self.info

        return reply()


def _router(cross_encoder, max_query_tokens: int) -> EmbedRouter:
    """The router's rerank preparation on its own: its catalog asks a stand-in replica for the reranker's
    description, with the reranker's tokenizer (as RerankModel sends it)."""
    info = ModelInfo(name=RERANKER, dimension=1, max_sequence_length=RERANK_MAX_SEQ, prompts={}, device="cpu",
                     backend="torch", vocab_size=int(cross_encoder.tokenizer.vocab_size), source="test",
                     tokenizer_json=cross_encoder.tokenizer.backend_tokenizer.to_str(), kind="rerank")
    router = EmbedRouter.__new__(EmbedRouter)  # Serve's replica context and the fleet are not needed here
    router.args = AppArgs(models=[ModelSettings(name="e"), ModelSettings(name=RERANKER, kind="rerank")],
                          limits=Limits(max_query_tokens=max_query_tokens))
    router.catalog = ModelCatalog({RERANKER: SimpleNamespace(describe=_Describe(info))})
    router.view = SimpleNamespace(refusal=lambda name: None)
    return router


def _rerank_job(router: EmbedRouter, query: str):
    request = pb.RerankRequest(model=RERANKER, query=query, documents=["a document"] * 32)
    admitted = SimpleNamespace(call=SimpleNamespace(model=None), deadline=Deadline.after(30))
    return asyncio.run(router._job(METHODS["Rerank"], request, admitted))


def _query_tokens(cross_encoder, query: str) -> int:
    return len(cross_encoder.tokenizer(query, add_special_tokens=False)["input_ids"])


def test_a_query_over_max_query_tokens_is_refused_with_its_count_and_one_at_the_bound_is_served(cross_encoder):
    words = "cats " * 40
    tokens = _query_tokens(cross_encoder, words)
    assert _rerank_job(_router(cross_encoder, tokens), words).options.query == words
    with pytest.raises(ServiceError) as caught:
        _rerank_job(_router(cross_encoder, tokens - 1), words)
    error = caught.value
    assert error.reason == Reason.INPUT_TOO_LONG and error.code.name == "INVALID_ARGUMENT"
    assert error.metadata == {"field": "query", "tokens": str(tokens), "max_tokens": str(tokens - 1)}
    assert f"query has {tokens} tokens; the limit is {tokens - 1}" in error.message


def test_a_huge_query_is_counted_once_in_a_thread_and_refused_fast(cross_encoder, monkeypatch):
    counted: list[tuple[str, bool]] = []
    count = TokenLengths.count

    def counting(self, text):
        counted.append((text, _in_event_loop()))
        return count(self, text)

    monkeypatch.setattr(TokenLengths, "count", counting)
    router = _router(cross_encoder, 512)
    started = time.perf_counter()
    with pytest.raises(ServiceError) as caught:
        _rerank_job(router, HUGE_QUERY)
    elapsed = time.perf_counter() - started
    assert caught.value.reason == Reason.INPUT_TOO_LONG and int(caught.value.metadata["tokens"]) > 10_000
    assert counted == [(HUGE_QUERY, False)]  # once for the call's 32 documents, off the event loop
    assert elapsed < 1.0, elapsed  # one count (about 30 ms), not 32 pairs (1.27 s) nor their scoring
    assert len(HUGE_QUERY) > catalog_module.INLINE_CHARS


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def test_the_bound_is_published_in_the_limits():
    assert Limits().max_query_tokens == 512
    assert limits_message(Limits(max_query_tokens=77)).max_query_tokens == 77
    with pytest.raises(ValueError):
        Limits(max_query_tokens=0)


# ---- the replica: the query tokenized once, the scores CrossEncoder's ------------------------


class _CountingTokenizer:
    """The pair encoder's content tokenizer, recording every text it tokenizes."""

    def __init__(self, inner) -> None:
        self.inner, self.texts = inner, []

    def encode(self, text, **kwargs):
        self.texts.append(text)
        return self.inner.encode(text, **kwargs)

    def encode_batch(self, texts, **kwargs):
        self.texts.extend(texts)
        return self.inner.encode_batch(texts, **kwargs)


def _rerank(tmp_path, scoring_model_dirs, calls, counting: bool = False):
    """A fp32 rerank replica built as Serve builds it; `calls(replica)` runs against it."""
    settings = ModelSettings(name=RERANKER, kind="rerank", path=str(scoring_model_dirs[RERANKER]), device="cpu",
                             gpu_check="embedding_service.fleet.gpu_checks:fault_file_check",
                             gpu_check_args={"directory": str(tmp_path)})

    async def main():
        replica = RerankModel(settings, RecyclerHandle(), heartbeat_s=3600, placement=Placement("node-1", "r-1"))
        if counting:
            replica._pairs._content = _CountingTokenizer(replica._pairs._content)
        try:
            return replica, await calls(replica)
        finally:
            await replica.close()

    return asyncio.run(main())


def _pair_tokens(cross_encoder, query: str, documents: list[str]) -> list[int]:
    encoded = cross_encoder.tokenizer([query] * len(documents), documents, truncation=True, max_length=RERANK_MAX_SEQ)
    return [len(ids) for ids in encoded["input_ids"]]


def test_a_shard_of_32_pairs_tokenizes_its_query_once_and_scores_as_cross_encoder(tmp_path, scoring_model_dirs,
                                                                                    cross_encoder):
    documents = make_texts(32, seed=7, max_words=40)  # some longer than the model's 48 tokens with the query
    replica, result = _rerank(tmp_path, scoring_model_dirs,
                              lambda r: r.compute(ShardRequest(documents, RerankOptions(QUERY))), counting=True)
    texts = replica._pairs._content.texts
    assert texts.count(QUERY) == 1 and sorted(t for t in texts if t != QUERY) == sorted(documents)
    assert replica._pairs.from_ids  # BERT's pairs join from token ids exactly (checked at start-up)
    assert np.abs(result.vectors - raw_scores(cross_encoder, QUERY, documents)).max() < 1e-5
    assert result.token_counts.tolist() == _pair_tokens(cross_encoder, QUERY, documents)


def test_32_pairs_of_a_100000_character_query_cost_one_tokenization_of_it(tmp_path, scoring_model_dirs):
    """The replica's side of the same query (the router refuses it; a replica must not pay for it per pair): 32
    pairs took 0.8 s to count on the event loop and 2.4 s more to tokenize again inside CrossEncoder.predict."""
    documents = make_texts(32, seed=9, max_words=20)

    async def timed(replica):
        started = time.perf_counter()
        result = await replica.compute(ShardRequest(documents, RerankOptions(HUGE_QUERY)))
        return time.perf_counter() - started, result

    _, (elapsed, result) = _rerank(tmp_path, scoring_model_dirs, timed)
    assert len(result.vectors) == 32 and elapsed < 1.5, elapsed  # about 0.1 s here


@pytest.mark.parametrize("query", [
    "cats " * 30,  # longer than half the model's maximum: longest_first cuts it too
    "cats and kittens " * 40,  # longer than the model's maximum alone
    HUGE_QUERY,  # what the router refuses, scored as CrossEncoder would all the same (the query cut once)
], ids=["over-half", "over-the-maximum", "huge"])
def test_long_queries_are_cut_as_cross_encoder_cuts_them(tmp_path, scoring_model_dirs, cross_encoder, query):
    documents = make_texts(8, seed=11, max_words=60) + ["x", "a " * 200]
    _, result = _rerank(tmp_path, scoring_model_dirs, lambda r: r.compute(ShardRequest(documents, RerankOptions(query))))
    assert np.abs(result.vectors - raw_scores(cross_encoder, query, documents)).max() < 1e-5
    assert result.token_counts.tolist() == _pair_tokens(cross_encoder, query, documents)


def test_activation_and_reject_are_unchanged(tmp_path, scoring_model_dirs, cross_encoder):
    documents = ["cats sleep most of the day", "the stock market fell", "word " * 100]

    async def calls(replica):
        scored = await replica.compute(ShardRequest(documents[:2], RerankOptions(QUERY, activation=True)))
        rejected = await replica.compute(ShardRequest(documents, RerankOptions(QUERY, truncation="reject")))
        return scored, rejected

    _, (scored, rejected) = _rerank(tmp_path, scoring_model_dirs, calls)
    expected = cross_encoder.predict([[QUERY, d] for d in documents[:2]])  # its default activation: sigmoid
    assert np.abs(scored.vectors - expected).max() < 1e-5
    assert rejected.vectors is None and rejected.too_long == [2]
    untruncated = len(cross_encoder.tokenizer(QUERY, documents[2])["input_ids"])
    assert untruncated > RERANK_MAX_SEQ and rejected.token_counts[2] == untruncated  # the router's error says so


def test_a_model_whose_pairs_do_not_join_from_ids_is_scored_by_cross_encoder_itself(tmp_path, scoring_model_dirs,
                                                                                    cross_encoder, monkeypatch):
    monkeypatch.setattr(pairs_module, "_same", lambda reference, ours: False)
    documents = make_texts(5, seed=3, max_words=30)
    replica, result = _rerank(tmp_path, scoring_model_dirs,
                              lambda r: r.compute(ShardRequest(documents, RerankOptions(QUERY))))
    assert not replica._pairs.from_ids
    assert np.abs(result.vectors - raw_scores(cross_encoder, QUERY, documents)).max() < 1e-5
    assert result.token_counts.tolist() == _pair_tokens(cross_encoder, QUERY, documents)


def test_features_equal_cross_encoder_preprocess(cross_encoder):
    from embedding_service.model.pairs import PairEncoder

    encoder = PairEncoder(cross_encoder)
    documents = make_texts(12, seed=5, max_words=50) + ["[SEP] [CLS] text", "é"]
    reference = cross_encoder.preprocess([[QUERY * 3, d] for d in documents])
    ours = encoder.features(encoder.pairs(QUERY * 3, documents).rows)
    assert set(ours) == set(reference)
    for key, value in reference.items():
        assert torch.equal(value, ours[key]) if isinstance(value, torch.Tensor) else value == ours[key]
