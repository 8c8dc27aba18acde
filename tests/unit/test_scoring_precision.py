"""bf16 for rerank and sparse models: each replica measures its kind's accuracy gate against the same weights in
fp32 at start-up, serves when it passes and refuses when it misses (the real replica classes, without Ray)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from embedding_service.config import ModelSettings
from embedding_service.model.scoring import RerankModel, SparseModel
from embedding_service.model.scoring_accuracy import PASSAGES, QUERIES, SPARSE_SENTENCES, rerank_accuracy
from embedding_service.model.watchdog import Placement
from embedding_service.wire.messages import ReplicaRefused, RerankOptions, ShardRequest, SparseOptions
from tests.helpers.cpu import CPU_HAS_BF16
from tests.helpers.models import RERANKER, SPLADE
from tests.helpers.observe import serve_logs
from tests.helpers.recycler import RecyclerHandle

DOCUMENTS = ["cats sleep most of the day", "the stock market fell", "kittens chase string", "rain in spain"]


def _settings(tmp_path, scoring_model_dirs, kind: str, **gate) -> ModelSettings:
    name = RERANKER if kind == "rerank" else SPLADE
    return ModelSettings(name=name, kind=kind, path=str(scoring_model_dirs[name]), device="cpu", precision="bf16",
                         accuracy_gate=gate, gpu_check="embedding_service.fleet.gpu_checks:fault_file_check",
                         gpu_check_args={"directory": str(tmp_path)})


def _serve(settings: ModelSettings, call):
    async def main():
        cls = RerankModel if settings.kind == "rerank" else SparseModel
        replica = cls(settings, RecyclerHandle(), heartbeat_s=3600, placement=Placement("node-1", "replica-1"))
        try:
            return replica, await call(replica)
        finally:
            await replica.close()

    return asyncio.run(main())


def test_a_bf16_reranker_serves_near_fp32_within_its_gate_and_refuses_past_it(tmp_path, scoring_model_dirs,
                                                                               caplog):
    from sentence_transformers import CrossEncoder

    # The tiny random model's scores lie close together, so bf16 reorders its top 10 (a trained reranker's far
    # less): a gate it misses refuses, one it meets serves.
    strict = _settings(tmp_path, scoring_model_dirs, "rerank", min_recall_at_10=1.0)

    async def refused(replica):
        with pytest.raises(ReplicaRefused):
            await replica.compute(ShardRequest(DOCUMENTS, RerankOptions("cats")))

    replica, _ = _serve(strict, refused)
    measured = replica.info.verification.accuracy.recall_at_10
    assert measured < 1.0 and replica.refused.startswith("bf16 on torch: accuracy gate missed on 10 sentences")
    settings = _settings(tmp_path, scoring_model_dirs, "rerank", min_recall_at_10=measured)
    with serve_logs(caplog):
        replica, result = _serve(settings, lambda r: r.compute(ShardRequest(DOCUMENTS, RerankOptions("cats"))))
    # On a CPU without bf16 units it serves, said once at WARNING (and counted: settings_not_applied{precision}).
    emulated = [r.getMessage() for r in caplog.records if "torch emulates it" in r.getMessage()]
    assert len(emulated) == (0 if CPU_HAS_BF16 else 1), emulated
    assert replica.scorer.loaded.not_applied == (() if CPU_HAS_BF16 else ("precision",))
    v = replica.info.verification
    assert v.refused is None and v.precision == "bf16" and v.accuracy.sentences == QUERIES
    assert v.accuracy.recall_at_10 == measured  # the same weights, the same figure
    fp32 = CrossEncoder(str(scoring_model_dirs[RERANKER]), device="cpu")
    expected = fp32.predict([["cats", d] for d in DOCUMENTS], activation_fn=torch.nn.Identity())
    assert np.abs(result.vectors - expected).max() < 0.05 * max(1.0, np.abs(expected).max())  # bf16, not fp32
    assert np.abs(result.vectors - expected).max() > 0  # it did compute in bf16


def test_rerank_accuracy_is_the_share_of_each_querys_top_10_kept():
    reference = np.tile(np.arange(PASSAGES, dtype=np.float32), QUERIES)
    assert rerank_accuracy(reference, reference, PASSAGES).recall_at_10 == 1.0
    swapped = reference.reshape(QUERIES, PASSAGES).copy()
    swapped[:, [PASSAGES - 1, 0]] = swapped[:, [0, PASSAGES - 1]]  # each query's best passage now its worst
    assert rerank_accuracy(swapped.reshape(-1), reference, PASSAGES).recall_at_10 == pytest.approx(0.9)


def test_a_bf16_sparse_model_below_its_gate_refuses_to_serve(tmp_path, scoring_model_dirs):
    settings = _settings(tmp_path, scoring_model_dirs, "sparse", min_mean_cosine=1.0, min_recall_at_10=0.0)

    async def call(replica):
        with pytest.raises(ReplicaRefused):
            await replica.compute(ShardRequest(["rain"], SparseOptions(top_k=8)))

    replica, _ = _serve(settings, call)
    v = replica.info.verification
    assert v.accuracy.sentences == SPARSE_SENTENCES and 0.9 < v.accuracy.mean_cosine < 1.0
    assert v.refused.startswith("bf16 on torch: accuracy gate missed") and replica.refused == v.refused
    served = _settings(tmp_path, scoring_model_dirs, "sparse", min_mean_cosine=0.9, min_recall_at_10=0.0)
    replica, result = _serve(served, lambda r: r.compute(ShardRequest(["rain"], SparseOptions(top_k=8))))
    assert replica.refused is None and len(result.sparse[0].indices) == 8
