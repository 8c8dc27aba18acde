"""Precision per model (fp32, bf16, int8): the packaged gate corpus, the gate's figures and reasons, the canary on the
packaged all-MiniLM-L6-v2 in-process, and which backends run which precision. Each precision's gate on the real
model's 5,000 sentences: tests/cluster/test_precision.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from sentence_transformers import SentenceTransformer

from embedding_service.config import ModelSettings
from embedding_service.model import calibration
from embedding_service.model.accuracy import corpus, gate_failure, measure
from embedding_service.model.forward import model_source, text_embedder
from embedding_service.model.runtimes import TorchRuntime
from embedding_service.model.tokenization import InputEncoder
from embedding_service.model.verification import check
from embedding_service.wire.messages import Accuracy
from tests.helpers.models import MINILM


@pytest.fixture(scope="module")
def minilm():
    return SentenceTransformer(model_source(ModelSettings(name="m").path), device="cpu")


def _embed_with(runtime, model, settings: ModelSettings):
    return text_embedder(runtime, InputEncoder(model), settings, "cpu", 384)


def test_the_packaged_corpus_is_real_sentences_split_without_overlap():
    c = corpus()
    assert len(c.canary) == 16 and len(c.gate) == 5000 and len(c.calibration) >= 150
    assert not set(c.gate) & set(c.calibration) and not set(c.canary) & (set(c.gate) | set(c.calibration))
    assert all(s[0].isupper() or s[0] == '"' for s in c.gate) and len(set(c.gate)) == len(c.gate)


def test_the_gate_figures_and_reasons():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(400, 32)).astype(np.float32)
    same = measure(reference, reference)
    assert same == Accuracy(400, pytest.approx(1.0), 1.0)
    noisy = measure(reference + rng.normal(scale=0.5, size=reference.shape).astype(np.float32), reference)
    assert noisy.mean_cosine < 0.95 and noisy.recall_at_10 < 0.9
    assert gate_failure(same, 0.99, 0.95) is None
    why = gate_failure(noisy, 0.99, 0.95)
    assert why.startswith("accuracy gate missed on 400 sentences: mean cosine 0.") and "recall@10 0." in why


def test_the_canary_fails_a_replica_whose_vectors_were_perturbed(minilm):
    settings = ModelSettings(name=MINILM, backend="torch")
    reference = calibration.calibration_for(minilm, "auto", gate=False)
    sound = check(_embed_with(TorchRuntime(minilm), minilm, settings), reference, settings)
    assert sound.refused is None and sound.canary_min_cosine > 0.99999
    perturbed = copy.deepcopy(minilm)
    with torch.no_grad():
        weight = perturbed[0].auto_model.encoder.layer[3].output.dense.weight
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.003)
    v = check(_embed_with(TorchRuntime(perturbed), minilm, settings), reference, settings)
    assert v.refused.startswith("fp32 on this backend: canary failed: a canary sentence's vector has cosine 0.")
    assert 0.9 < v.canary_min_cosine < 0.99999


def test_precisions_only_on_backends_that_run_them():
    for precision, backend in [("int8", "torch"), ("int8", "onnx"), ("bf16", "onnx")]:
        with pytest.raises(ValidationError, match=f"precision {precision} runs on backend"):
            ModelSettings(name="m", precision=precision, backend=backend)
    assert ModelSettings(name="m", precision="int8").canary_threshold == 0.98
    assert ModelSettings(name="m", canary_min_cosine=0.5).canary_threshold == 0.5
