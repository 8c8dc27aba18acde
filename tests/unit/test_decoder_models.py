"""A decoder embedding model shaped as Qwen3-Embedding (last-token pooling over the EOS its tokenizer appends, padding
on the left, an instruction prompt), loaded in-process as a replica loads it: its vectors equal sentence-transformers'
own to 1e-5 batched and one by one, batching by padded tokens holds with left padding, truncation WINDOWS keeps the
prompt in every window, and backend auto compiles it for OpenVINO (ONNX Runtime runs it too) or, where the compiled
graph does not compile or fails the start-up canary, falls back to torch, logged once and counted."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest

from embedding_service.config import LongInputSettings, ModelSettings
from embedding_service.model import runtimes
from embedding_service.model.accuracy import cosines
from embedding_service.model.forward import (
    calibration_samples,
    forward_sorted,
    load_model,
    plan_passes,
    text_embedder,
)
from embedding_service.model.runtimes import OnnxRuntime, OpenVinoRuntime, TorchRuntime, load_runtime
from embedding_service.model.tokenization import InputEncoder
from tests.helpers.models import DECODER, DECODER_MAX_SEQ, DECODER_QUERY_PROMPT
from tests.helpers.observe import serve_logs
from tests.helpers.windows import by_hand, prompt_tokens

TOLERANCE = 1e-5
WORDS = ["semantic", "search", "ranks", "documents", "dense", "vectors", "transformer", "query", "product", "weather",
         "music", "ü", "東京", "🙂"]


@pytest.fixture(scope="module")
def decoder(decoder_dir):
    """sentence-transformers' own model: the ground truth."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(decoder_dir), device="cpu")


@pytest.fixture(scope="module")
def on_torch(decoder_dir):
    return load_model(ModelSettings(name=DECODER, path=str(decoder_dir), backend="torch"))


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    # 1 to 200 words: one token to past the 256-token maximum (truncated at the end), every batch padded.
    return [" ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 2, 5, 17, 60, 200]))) for _ in range(n)]


def _served(loaded, texts: list[str], prompt_name: str | None, max_sequences: int = 32,
            max_tokens: int = 4096) -> tuple[np.ndarray, int]:
    """(vectors, token slots) as a replica computes them for a call with this prompt (model/deployment.py)."""
    prompt = loaded.model.prompts.get(prompt_name) if prompt_name else None
    sequences = loaded.encoder.prepare(texts, "end", prompt).sequences
    return forward_sorted(loaded.runtime, loaded.encoder, sequences, prompt, max_sequences, max_tokens, loaded.device,
                          loaded.dimension)


def test_the_tiny_decoder_is_shaped_as_qwen3_embedding(decoder, on_torch):
    encoder = on_torch.encoder
    tokenizer = decoder.tokenizer
    assert tokenizer.padding_side == "left" and encoder.pad_left
    assert decoder[1].pooling_mode == "lasttoken" and decoder.prompts["query"] == DECODER_QUERY_PROMPT
    # No prefix, the EOS appended (the token last-token pooling reads), the pad id the EOS's as Qwen's is.
    sequence = encoder.prepare(["hello"], "end").sequences[0]
    assert sequence[-1] == tokenizer.eos_token_id == encoder.pad_id
    assert list(sequence[:-1]) == tokenizer("hello", add_special_tokens=False)["input_ids"]
    assert encoder.max_length == DECODER_MAX_SEQ and not encoder.uses_token_types


@pytest.mark.parametrize("prompt_name", [None, "query"])
def test_decoder_vectors_equal_sentence_transformers_batched_and_one_by_one(decoder, on_torch, prompt_name):
    texts = _texts(24, seed=1)
    expected = decoder.encode(texts, prompt_name=prompt_name, batch_size=8)
    batched, _ = _served(on_torch, texts, prompt_name)
    assert np.abs(batched - expected).max() < TOLERANCE
    for k in (0, 5, 11, 23):  # alone: no padding at all, and against sentence-transformers' vector of it alone
        alone, _ = _served(on_torch, texts[k : k + 1], prompt_name)
        assert np.abs(alone[0] - decoder.encode([texts[k]], prompt_name=prompt_name)[0]).max() < TOLERANCE
        assert np.abs(alone[0] - batched[k]).max() < TOLERANCE
    if prompt_name is None:  # what the start-up canary measures
        embed = text_embedder(on_torch.runtime, on_torch.encoder, ModelSettings(name=DECODER), "cpu",
                              on_torch.dimension)
        assert np.abs(embed(texts) - expected).max() < TOLERANCE


def test_batching_by_padded_tokens_holds_with_left_padding(decoder, on_torch):
    texts = _texts(20, seed=2)
    expected = decoder.encode(texts, prompt_name="query")
    lengths = [len(s) for s in on_torch.encoder.prepare(texts, "end", DECODER_QUERY_PROMPT).sequences]
    for max_sequences, max_tokens in [(3, 10_000), (32, 300), (4, 150)]:
        passes = plan_passes(lengths, max_sequences, max_tokens)
        assert len(passes) > 1
        vectors, slots = _served(on_torch, texts, "query", max_sequences, max_tokens)
        assert np.abs(vectors - expected).max() < TOLERANCE, (max_sequences, max_tokens)
        assert slots == sum(lengths[rows[0]] * len(rows) for rows in passes)
        assert slots == sum(max(lengths[k] for k in rows) * len(rows) for rows in passes)  # longest first


def test_a_pass_is_padded_on_the_left_so_every_row_ends_on_its_eos(on_torch):
    encoder = on_torch.encoder
    sequences = encoder.prepare(["a", "a somewhat longer input than that"], "end").sequences
    features = encoder.features(sequences)
    assert features["attention_mask"][:, -1].tolist() == [1, 1] and features["attention_mask"][0, 0] == 0
    assert features["input_ids"][:, -1].tolist() == [encoder.pad_id, encoder.pad_id]  # the EOS, which is the pad


def test_windows_on_the_decoder_keep_the_prompt_in_every_window(decoder, decoder_dir):
    """The prompt's trailing space merges into the text's first token in a byte-level BPE: the windows repeat the
    prompt's own tokens, not that token."""
    window, overlap = 64, 8
    encoder = InputEncoder(decoder, LongInputSettings(window_tokens=window, overlap_tokens=overlap))
    text = " ".join(WORDS * 12)
    ids = decoder.tokenizer(DECODER_QUERY_PROMPT + text, add_special_tokens=False)["input_ids"]
    prompt_ids = decoder.tokenizer(DECODER_QUERY_PROMPT, add_special_tokens=False)["input_ids"]
    assert prompt_tokens(ids, prompt_ids) == len(prompt_ids) - 1  # the merge this test is about
    prepared = encoder.prepare([text, "short"], "windows", DECODER_QUERY_PROMPT)
    assert prepared.windows[0] > 2 and prepared.windows[1] == 1 and not prepared.too_long
    head = ids[: len(prompt_ids) - 1]
    assert all(list(s[: len(head)]) == head for s in prepared.sequences[: prepared.windows[0]])
    _, runtime = load_runtime(decoder, "torch", "cpu", threads=None)
    vectors, _ = forward_sorted(runtime, encoder, prepared.sequences, DECODER_QUERY_PROMPT, 32, 4096, "cpu", 32)
    pooled = prepared.pool(vectors)
    expected, tokens = by_hand(decoder, text, window, overlap, DECODER_QUERY_PROMPT)
    assert prepared.token_counts[0] == tokens
    assert np.abs(pooled[0] / np.linalg.norm(pooled[0]) - expected / np.linalg.norm(expected)).max() < TOLERANCE
    assert np.abs(pooled[1] - decoder.encode(["short"], prompt_name="query")[0]).max() < TOLERANCE


def test_backend_auto_compiles_the_decoder_for_openvino_within_the_gate(decoder, decoder_dir):
    loaded = load_model(ModelSettings(name=DECODER, path=str(decoder_dir), backend="auto"))
    assert loaded.backend == "openvino" and isinstance(loaded.runtime, OpenVinoRuntime)
    assert loaded.not_applied == () and loaded.verification.refused is None
    assert loaded.verification.canary_min_cosine >= loaded.verification.canary_threshold
    texts = _texts(24, seed=3)
    for prompt_name in (None, "query"):
        served, _ = _served(loaded, texts, prompt_name, max_sequences=7)
        assert np.abs(served - decoder.encode(texts, prompt_name=prompt_name)).max() < TOLERANCE


def test_onnx_runtime_runs_the_decoder_within_tolerance(decoder):
    resolved, runtime = load_runtime(decoder, "onnx", "cpu", threads=None)
    assert resolved == "onnx" and isinstance(runtime, OnnxRuntime)
    encoder = InputEncoder(decoder)
    texts = _texts(16, seed=4)
    vectors, _ = forward_sorted(runtime, encoder, encoder.prepare(texts, "end", DECODER_QUERY_PROMPT).sequences,
                                DECODER_QUERY_PROMPT, 5, 4096, "cpu", 32)
    assert np.abs(vectors - decoder.encode(texts, prompt_name="query")).max() < TOLERANCE


def test_int8_quantizes_a_decoder_whose_layers_are_not_named_as_a_bert_s(decoder):
    """int8 keeps a BERT's feed-forward output projections in floating point, found by their names; a decoder has no
    such node and is quantized whole (its canary and gate then decide whether it serves) rather than failing to
    load."""
    encoder = InputEncoder(decoder)
    resolved, runtime = load_runtime(decoder, "openvino", "cpu", threads=None, precision="int8",
                                     samples=calibration_samples(encoder))
    assert resolved == "openvino"
    texts = _texts(8, seed=7)
    vectors, _ = forward_sorted(runtime, encoder, encoder.prepare(texts, "end").sequences, None, 32, 4096, "cpu", 32)
    assert np.isfinite(vectors).all() and cosines(vectors, decoder.encode(texts)).min() > 0.8


def _bert_example(self):
    """The example the export traced before it asked the model's tokenizer: BERT ids, past this vocabulary."""
    import torch

    ids = torch.tensor([[101, 2023, 2003, 102], [101, 2023, 102, 0]])
    values = {"input_ids": ids, "attention_mask": (ids != 0).long(), "token_type_ids": torch.zeros_like(ids)}
    return tuple(values[n] for n in self.input_names)


def _perturbed_graph(monkeypatch):
    """OpenVINO's graph computes other vectors than torch (a miscompiled kernel): the canary's cosine drops."""
    run = OpenVinoRuntime._run_graph
    noise = np.random.default_rng(0)

    def perturbed(self, inputs):
        out = run(self, inputs)
        return out + noise.normal(scale=0.5, size=out.shape).astype(out.dtype)

    monkeypatch.setattr(OpenVinoRuntime, "_run_graph", perturbed)


def _records(caplog, level: int) -> list[str]:
    """The service's records at `level`, each once: serve_logs's handler on Serve's logger sees it, and the root's
    too where Ray's logging setup has not stopped it propagating (the libraries' own records are left out)."""
    records = {id(r): r for r in caplog.records if r.name.startswith("ray.serve.embedding_service")}
    return [r.getMessage() for r in records.values() if r.levelno == level]


def test_backend_auto_falls_back_to_torch_where_openvino_cannot_compile_the_decoder(decoder, decoder_dir,
                                                                                     monkeypatch, caplog):
    monkeypatch.setattr(runtimes._CompiledTransformer, "_example", _bert_example)
    with serve_logs(caplog):
        loaded = load_model(ModelSettings(name=DECODER, path=str(decoder_dir), backend="auto"))
    assert loaded.backend == "torch" and isinstance(loaded.runtime, TorchRuntime)
    assert loaded.not_applied == ("backend",) and loaded.verification.refused is None
    (warning,) = _records(caplog, logging.WARNING)
    assert "backend auto: openvino could not compile this model (index out of range" in warning
    texts = _texts(8, seed=5)
    assert np.abs(_served(loaded, texts, "query")[0] - decoder.encode(texts, prompt_name="query")).max() < TOLERANCE


def test_backend_auto_falls_back_to_torch_where_the_compiled_decoder_fails_its_canary(decoder, decoder_dir,
                                                                                      monkeypatch, caplog):
    """Counted as a setting not applied (embedding_settings_not_applied{setting="backend"}), logged once at WARNING
    with the canary's reason, and no ERROR: the replica serves, with torch."""
    _perturbed_graph(monkeypatch)
    with serve_logs(caplog):
        loaded = load_model(ModelSettings(name=DECODER, path=str(decoder_dir), backend="auto", cpu_pinning=True))
    assert loaded.backend == "torch" and isinstance(loaded.runtime, TorchRuntime)
    assert loaded.not_applied == ("cpu_pinning", "backend") and loaded.verification.refused is None
    assert loaded.verification.canary_min_cosine > 0.99999
    fell_back = [m for m in _records(caplog, logging.WARNING) if m.startswith("backend auto:")]
    assert len(fell_back) == 1, fell_back
    assert "openvino failed its start-up check (fp32 on this backend: canary failed" in fell_back[0]
    assert not _records(caplog, logging.ERROR)
    texts = _texts(8, seed=6)
    assert np.abs(_served(loaded, texts, None)[0] - decoder.encode(texts)).max() < TOLERANCE


def test_an_explicit_openvino_backend_that_fails_its_canary_still_refuses(decoder_dir, monkeypatch, caplog):
    _perturbed_graph(monkeypatch)
    with serve_logs(caplog):
        loaded = load_model(ModelSettings(name=DECODER, path=str(decoder_dir), backend="openvino"))
    assert loaded.backend == "openvino" and loaded.not_applied == ()
    assert loaded.verification.refused.startswith("fp32 on this backend: canary failed")
    assert not _records(caplog, logging.WARNING)
    (error,) = _records(caplog, logging.ERROR)
    assert "refusing to serve: fp32 on this backend: canary failed" in error
