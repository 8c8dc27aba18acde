"""ONNX Runtime and OpenVINO backends: vectors within the stated tolerance of torch.

Stated tolerance (README): max absolute difference 1e-5 per component, the
project's correctness bar, against sentence-transformers' own torch `encode`.
Measured here: about 1e-7.
"""

from __future__ import annotations

import logging
import random
import subprocess
import sys

import numpy as np
import pytest

from embedding_service.model.runtimes import OnnxRuntime, OpenVinoRuntime, TorchRuntime, load_runtime, resolve_backend
from embedding_service.model.tokenization import InputEncoder
from tests.helpers.cpu import CPU_HAS_BF16
from tests.helpers.models import MINILM, TINY
from tests.helpers.observe import serve_logs

TOLERANCE = 1e-5
WORDS = "semantic search ranks documents dense vectors transformer query product weather music ü 東京 🙂".split()


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    # 1 to 400 words: short, padded, and past the 256-token limit (truncated).
    return [" ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 3, 12, 40, 120, 400]))) for _ in range(n)]


def _embed(runtime, encoder: InputEncoder, texts: list[str], prompt: str | None, batch: int) -> np.ndarray:
    sequences = encoder.prepare(texts, "end", prompt).sequences
    out = [runtime.embed(encoder.features(sequences[i : i + batch], prompt)) for i in range(0, len(texts), batch)]
    return np.concatenate(out)


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
@pytest.mark.parametrize("model_name", [MINILM, TINY])
def test_backend_matches_torch_within_tolerance(backend, model_name, reference_models):
    model = reference_models[model_name]
    resolved, runtime = load_runtime(model, backend, "cpu", threads=1)
    assert resolved == backend
    assert isinstance(runtime, OnnxRuntime if backend == "onnx" else OpenVinoRuntime)
    encoder = InputEncoder(model)
    texts = _texts(40, seed=len(model_name))
    prompts = [None] + (["query: "] if model_name == TINY else [])
    for prompt in prompts:
        expected = model.encode([(prompt or "") + t for t in texts], batch_size=16)
        for batch in (1, 7, 32):  # padding differs with the batch: the graph's shapes are dynamic
            got = _embed(runtime, encoder, texts, prompt, batch)
            assert got.dtype == np.float32 and got.shape == expected.shape
            assert np.abs(got - expected).max() < TOLERANCE, (backend, model_name, prompt, batch)


def test_torch_runtime_is_the_model_itself(reference_models):
    model = reference_models[MINILM]
    _, runtime = load_runtime(model, "torch", "cpu", threads=None)
    assert isinstance(runtime, TorchRuntime)
    encoder = InputEncoder(model)
    texts = _texts(10, seed=3)
    np.testing.assert_allclose(_embed(runtime, encoder, texts, None, 4), model.encode(texts), atol=TOLERANCE)


def test_compiled_backends_refuse_what_they_cannot_run(reference_models):
    with pytest.raises(ValueError, match="openvino runs on cpu"):
        load_runtime(reference_models[TINY], "openvino", "cuda", threads=None)

    class NoTransformer(list):
        pass

    with pytest.raises(ValueError, match="first module is a sentence-transformers Transformer"):
        load_runtime(NoTransformer([object()]), "onnx", "cpu", threads=None)


def test_auto_is_openvino_on_cpu_torch_on_gpu_and_falls_back_to_torch(reference_models, caplog):
    assert resolve_backend("auto", "cpu") == "openvino" and resolve_backend("auto", "cuda") == "torch"
    assert resolve_backend("onnx", "cpu") == "onnx"
    resolved, runtime = load_runtime(reference_models[TINY], "auto", "cpu", threads=1)
    assert resolved == "openvino" and isinstance(runtime, OpenVinoRuntime)

    class NoTransformer(list):
        pass

    with serve_logs(caplog):
        resolved, runtime = load_runtime(NoTransformer([object()]), "auto", "cpu", threads=None)
    assert resolved == "torch" and isinstance(runtime, TorchRuntime)
    assert any(r.levelno == logging.WARNING and "running it with torch" in r.getMessage() for r in caplog.records)


def test_openvino_pins_its_threads_to_cores_only_when_asked(reference_models):
    """Off by default (the node's cores are shared with Serve's proxy and the router; docs/benchmarks.md)."""
    from embedding_service.config import ModelSettings

    for asked in (False, True):
        _, runtime = load_runtime(reference_models[TINY], "openvino", "cpu", threads=1, cpu_pinning=asked)
        assert runtime.compiled.get_property("ENABLE_CPU_PINNING") is asked
    _, runtime = load_runtime(reference_models[TINY], "openvino", "cpu", threads=1)
    assert runtime.compiled.get_property("ENABLE_CPU_PINNING") is False
    assert ModelSettings(name="m", path="p").cpu_pinning is False
    for refused in ({"backend": "torch"}, {"backend": "onnx"}, {"kind": "rerank"}):
        with pytest.raises(ValueError, match="cpu_pinning applies to backend openvino"):
            ModelSettings(name="m", path="p", cpu_pinning=True, **refused)
    assert ModelSettings(name="m", path="p", cpu_pinning=True, backend="auto").cpu_pinning


def test_a_tokenizer_without_token_types_feeds_zeros_as_torch_does(reference_models):
    model = reference_models[MINILM]
    _, runtime = load_runtime(model, "onnx", "cpu", threads=1)
    encoder = InputEncoder(model)
    texts = ["a short one", "and a somewhat longer sentence than that"]
    features = encoder.features(encoder.prepare(texts, "end").sequences)
    del features["token_type_ids"]  # as a RoBERTa-style tokenizer would give
    assert np.abs(runtime.embed(features) - model.encode(texts)).max() < TOLERANCE


def test_openvino_is_imported_without_its_usage_telemetry():
    # A fresh interpreter: importing openvino posts telemetry from a forked process
    # unless the service imports it its own way (and a server must not phone home).
    script = """
import multiprocessing, sys
from embedding_service.model.runtimes import import_openvino
ov = import_openvino()
from openvino.tools.ovc import telemetry_utils
print(telemetry_utils.tm.__name__, "openvino_telemetry" in sys.modules, len(multiprocessing.active_children()))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["openvino.tools.ovc.telemetry_stub", "False", "0"], out.stderr[-2000:]


def test_a_setting_the_replica_runs_without_is_named_for_its_metric():
    """Each name is counted in embedding_settings_not_applied as the replica starts (model/deployment.py)."""
    from embedding_service.config import ModelSettings
    from embedding_service.model.forward import not_applied

    pinned = ModelSettings(name="m", path="p", cpu_pinning=True, backend="auto")
    assert not_applied(pinned, "cpu", "openvino") == ()
    assert not_applied(pinned, "cuda", "torch") == ("cpu_pinning",)  # auto is torch on a GPU: pinning is moot
    assert not_applied(pinned, "cpu", "torch") == ("cpu_pinning", "backend")  # OpenVINO could not compile it
    plain = ModelSettings(name="m", path="p")
    assert not_applied(plain, "cpu", "torch") == ("backend",)
    assert not_applied(plain, "cuda", "torch") == ()
    assert not_applied(ModelSettings(name="m", path="p", backend="torch"), "cpu", "torch") == ()
    # bf16 on torch runs everywhere, but on a CPU without bf16 units (the kernel's flags) slower than fp32.
    bf16 = ModelSettings(name="m", path="p", backend="torch", precision="bf16")
    assert not_applied(bf16, "cpu", "torch") == (() if CPU_HAS_BF16 else ("precision",))
    assert not_applied(bf16, "cuda", "torch") == ()


def test_a_replica_image_without_openvino_falls_back_to_torch_and_names_what_it_runs_without(
        tiny_model_dir, reference_models, monkeypatch, caplog):
    """backend auto with cpu_pinning on a CPU, where the openvino package is missing (an image built without it):
    the model loads with torch, within 1e-5 of sentence-transformers', and the replica is told which settings it
    runs without (counted in embedding_settings_not_applied as it starts), each logged at WARNING with its cause."""
    from embedding_service.config import ModelSettings
    from embedding_service.model.forward import load_model

    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    with serve_logs(caplog):
        loaded = load_model(ModelSettings(name="tiny", path=str(tiny_model_dir), backend="auto", cpu_pinning=True,
                                          threads=1))
    assert loaded.backend == "torch" and isinstance(loaded.runtime, TorchRuntime)
    assert loaded.not_applied == ("cpu_pinning", "backend") and loaded.verification.refused is None
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("openvino could not compile" in m and "needs the openvino" in m for m in messages), messages
    assert any("cpu_pinning applies to OpenVINO only: backend torch on cpu" in m for m in messages), messages
    texts = _texts(16, seed=5)
    served = _embed(loaded.runtime, loaded.encoder, texts, None, batch=8)
    assert np.abs(served - reference_models[TINY].encode(texts)).max() < TOLERANCE
