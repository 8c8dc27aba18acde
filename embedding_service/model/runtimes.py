"""Inference backends for a loaded sentence-transformers model: torch, ONNX Runtime, OpenVINO.

The ONNX and OpenVINO backends compile only the transformer (the model's first
module) and keep sentence-transformers' own pooling and normalization modules,
so prompts, pooling options and Matryoshka behave exactly as with torch.

Why not sentence-transformers' `backend="onnx"/"openvino"`: it goes through
optimum, whose ONNX exporter (optimum-onnx) requires transformers < 4.58 while
sentence-transformers 6 requires transformers >= 5, and whose OpenVINO package
(optimum-intel) pins transformers < 5.6 and drags in a torchvision that does not
load beside CPU builds of torch. Exporting the transformer with torch and
running the graph with the runtime's own API needs neither.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, Protocol, TypeVar

import numpy as np

from embedding_service.observability.logs import service_logger

logger = service_logger(__name__)
T = TypeVar("T")

# Inputs a BERT-like transformer may take, in the order the graph declares them.
_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


class Runtime(Protocol):
    def embed(self, features: dict) -> np.ndarray:
        """Tokenized features (torch tensors on the model's device) -> float32 [batch, dim]."""


Precision = Literal["fp32", "bf16", "int8"]


class TorchRuntime:
    def __init__(self, model, precision: Precision = "fp32") -> None:
        if precision == "int8":
            raise ValueError("precision int8 runs on backend openvino (NNCF quantization); torch takes fp32 or bf16")
        if precision == "bf16":
            import copy

            import torch

            # A copy: the fp32 model stays for the tokenizer, pooling and reference vectors.
            model = copy.deepcopy(model).to(torch.bfloat16)
        self.model = model

    def embed(self, features: dict) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(features)["sentence_embedding"].float().cpu().numpy()


class _CompiledTransformer:
    """The transformer runs in a compiled graph; the remaining modules run in torch."""

    def __init__(self, model) -> None:
        first = model[0]
        auto_model = getattr(first, "auto_model", None)
        if auto_model is None:
            raise ValueError(
                f"the {type(self).__name__} backend needs a model whose first module is a "
                f"sentence-transformers Transformer; this one starts with {type(first).__name__}"
            )
        accepted = inspect.signature(auto_model.forward).parameters
        self.input_names = [n for n in _INPUT_NAMES if n in accepted]
        self.tail = list(model)[1:]
        self.auto_model = auto_model
        self.model = model

    def _graph_module(self):
        import torch

        auto_model, names = self.auto_model, self.input_names

        class LastHiddenState(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = auto_model

            def forward(self, *inputs):
                return self.inner(**dict(zip(names, inputs)), return_dict=True).last_hidden_state

        return LastHiddenState().eval()

    def _example(self):
        import torch

        from embedding_service.model.tokenization import InputEncoder

        # Two rows of different lengths as the replica feeds them: ids the model's vocabulary holds (a small or
        # non-BERT one has no id 2023), padded on its tokenizer's side (a decoder's left), so traced shapes stay
        # dynamic and the padded mask is what is traced.
        encoder = InputEncoder(self.model)
        features = encoder.features(encoder.prepare(["an example sentence to trace", "short"], "end").sequences)
        ids = features["input_ids"]
        values = {"input_ids": ids, "attention_mask": features["attention_mask"],
                  "token_type_ids": features.get("token_type_ids", torch.zeros_like(ids))}
        return tuple(values[n] for n in self.input_names)

    def _from_onnx(self, load: Callable[[str], T]) -> T:
        """`load(path)` of the transformer exported as an ONNX graph (inputs in input_names order,
        dynamic batch and length) into a temporary folder."""
        import torch

        dynamic = {n: {0: "batch", 1: "sequence"} for n in [*self.input_names, "last_hidden_state"]}
        # The TorchScript exporter: the torch.export one needs onnxscript and
        # gains nothing for a plain encoder. Its tracer warnings are about
        # shapes the tolerance test covers (batch sizes, lengths, padding).
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = str(Path(tmp) / "transformer.onnx")
            torch.onnx.export(self._graph_module().cpu(), self._example(), path, input_names=self.input_names,
                              output_names=["last_hidden_state"], dynamic_axes=dynamic, dynamo=False)
            return load(path)

    def _run_graph(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def graph_inputs(self, features: dict) -> dict[str, np.ndarray]:
        ids = features["input_ids"].cpu().numpy().astype(np.int64, copy=False)
        # A tokenizer without token types (RoBERTa's) feeds a model that takes them: zeros, as torch defaults.
        return {n: features[n].cpu().numpy().astype(np.int64, copy=False) if n in features else np.zeros_like(ids)
                for n in self.input_names}

    def embed(self, features: dict) -> np.ndarray:
        import torch

        inputs = self.graph_inputs(features)
        features = dict(features)
        features["token_embeddings"] = torch.from_numpy(np.ascontiguousarray(self._run_graph(inputs), dtype=np.float32))
        with torch.inference_mode():
            for module in self.tail:
                features = module(features)
        return features["sentence_embedding"].float().numpy()


class OnnxRuntime(_CompiledTransformer):
    def __init__(self, model, device: str, threads: int | None, precision: Precision = "fp32",
                 samples: Sequence[dict] = ()) -> None:
        if precision != "fp32":
            raise ValueError(f"precision {precision} runs on backend openvino (or bf16 on torch); onnx takes fp32")
        super().__init__(model)
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ValueError("backend onnx on cuda needs onnxruntime-gpu (CUDAExecutionProvider is missing)")
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = self._from_onnx(lambda path: ort.InferenceSession(path, options, providers=providers))

    def _run_graph(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(["last_hidden_state"], inputs)[0]


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 units (AMX or AVX512-BF16), as OpenVINO reports them: OpenVINO's bf16 needs them,
    and without them torch computes bf16 by conversions, several times slower than fp32 (docs/precision.md)."""
    return "BF16" in import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def bf16_emulated(precision: str, device: str, backend: str) -> bool:
    """torch's bf16 on a CPU without bf16 units: it runs, slower than fp32 would."""
    return precision == "bf16" and backend == "torch" and device == "cpu" and not cpu_has_bf16()


def import_openvino():
    """`openvino`, without its usage telemetry.

    Importing openvino posts an event to Google Analytics from a forked process
    (openvino-telemetry, a dependency of the wheel), and so does
    `ov.convert_model`: a server must not phone home, and where there is no
    network the fork hangs the interpreter's exit. With `openvino_telemetry`
    unimportable during the import, openvino binds its own no-op stub.
    """
    if "openvino" not in sys.modules:
        saved = sys.modules.get("openvino_telemetry")
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]
        try:
            import openvino  # noqa: F401
        finally:
            if saved is None:
                del sys.modules["openvino_telemetry"]
            else:
                sys.modules["openvino_telemetry"] = saved
    import openvino as ov

    return ov


# int8 keeps each layer's feed-forward output projection in floating point: quantizing it
# (large activation outliers after GELU) cost all-MiniLM-L6-v2 recall@10 0.940 -> 0.954 kept.
# The name is a BERT's: other shapes (a Qwen3 decoder, ModernBERT) have no such node and quantize every layer,
# behind the same gate.
INT8_FLOAT_OPS = r".*layer\.\d+/output/dense/MatMul"


class OpenVinoRuntime(_CompiledTransformer):
    """fp32; bf16 (AMX / AVX512-BF16 CPUs); int8: NNCF post-training quantization calibrated on `samples`
    (features of real sentences), SmoothQuant on, the rest of the graph in bf16 where the CPU has it."""

    def __init__(self, model, device: str, threads: int | None, precision: Precision = "fp32",
                 samples: Sequence[dict] = (), cpu_pinning: bool = False) -> None:
        super().__init__(model)
        if device != "cpu":
            raise ValueError("backend openvino runs on cpu here; use backend torch or onnx on cuda")
        ov = import_openvino()
        core = ov.Core()
        has_bf16 = cpu_has_bf16()
        if precision == "bf16" and not has_bf16:
            raise ValueError("precision bf16 needs a CPU with bf16 (AMX or AVX512-BF16); this one has none")
        if precision == "int8" and not samples:
            raise ValueError("precision int8 needs calibration samples")
        # fp32 says so: OpenVINO defaults to bf16 on CPUs that have it (about 1e-3 off).
        config = {"INFERENCE_PRECISION_HINT": "bf16" if precision != "fp32" and has_bf16 else "f32",
                  "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": cpu_pinning}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads

        def compile_(path: str):
            graph = core.read_model(path)
            if precision == "int8":
                graph = self._quantized(graph, samples)
            return core.compile_model(graph, "CPU", config)

        # OpenVINO reads the ONNX graph itself: one export path for both backends.
        self.compiled = self._from_onnx(compile_)
        self._request = self.compiled.create_infer_request()

    def _quantized(self, graph, samples: Sequence[dict]):
        try:
            import nncf
        except ImportError as exc:
            raise ValueError("precision int8 needs the nncf package (the int8 extra)") from exc
        logging.getLogger("nncf").setLevel(logging.WARNING)
        data = [self.graph_inputs(features) for features in samples]
        return nncf.quantize(graph, nncf.Dataset(data), model_type=nncf.ModelType.TRANSFORMER,
                             subset_size=len(data),
                             ignored_scope=nncf.IgnoredScope(patterns=[INT8_FLOAT_OPS], validate=False))

    def _run_graph(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        # One request object, reused: batches run one at a time (one forward thread).
        # The graph's inputs are in input_names order.
        return self._request.infer([inputs[n] for n in self.input_names])[0].copy()


_RUNTIMES = {"onnx": (OnnxRuntime, "onnxruntime"), "openvino": (OpenVinoRuntime, "openvino and onnx")}


def resolve_backend(backend: str, device: str) -> str:
    """"auto": OpenVINO on CPU (about 2x torch here, within 1e-6 of it), torch on GPU."""
    if backend != "auto":
        return backend
    return "openvino" if device == "cpu" else "torch"


def falls_back_to_torch(requested: str, precision: str) -> bool:
    """Whether a compiled backend that cannot serve (it fails to compile, or fails the start-up check in
    forward.load_model) is replaced by torch: for backend auto, except int8, which torch does not run. An explicit
    backend fails instead."""
    return requested == "auto" and precision != "int8"


def load_runtime(model, backend: str, device: str, threads: int | None, precision: Precision = "fp32",
                 samples: Sequence[dict] = (), cpu_pinning: bool = False) -> tuple[str, Runtime]:
    """(the backend that runs, its runtime). "auto" falls back to torch where compiling fails (not for int8,
    which torch does not run). `samples`: features of real sentences, to calibrate int8. `cpu_pinning`: OpenVINO's
    threads pinned to cores (ModelSettings.cpu_pinning; config refuses it for torch and onnx; where the backend
    that runs is not OpenVINO, forward.load_model says so)."""
    resolved = resolve_backend(backend, device)
    if resolved == "torch":
        return resolved, TorchRuntime(model, precision)
    if resolved not in _RUNTIMES:
        raise ValueError(f"unknown backend {backend!r}")
    cls, package = _RUNTIMES[resolved]
    try:
        extra = {"cpu_pinning": cpu_pinning} if resolved == "openvino" else {}
        return resolved, cls(model, device, threads, precision, samples, **extra)
    except ImportError as exc:
        error: Exception = ValueError(f"backend {resolved} needs the {package} package: {exc}")
    except Exception as exc:
        error = exc
    if not falls_back_to_torch(backend, precision):
        raise error
    logger.warning("backend auto: %s could not compile this model (%s); running it with torch", resolved, error)
    return "torch", TorchRuntime(model, precision)
