"""The reference: the model embedded in this process, with sentence-transformers (torch) and with the
service's compiled backend."""

from __future__ import annotations

import time

import numpy as np

from benchmarks.workloads import W1_TEXT, Work, pct


class InProcess:
    def __init__(self, model) -> None:
        self.model = model

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        return self.model.encode(texts, batch_size=batch_size)

    def rate(self, texts: list[str], batch_size: int, repeats: int = 2) -> float:
        self.encode(texts[:batch_size], batch_size)
        start = time.perf_counter()
        for _ in range(repeats):
            self.encode(texts, batch_size)
        return repeats * len(texts) / (time.perf_counter() - start)

    def latency(self, text: str, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            self.encode([text])
            out.append(time.perf_counter() - t)
        return out

    def profile(self, work: Work) -> tuple[dict[int, float], list[float]]:
        """(W2 sentences/s by batch size, one-sentence latencies)."""
        return {bs: self.rate(work.w2, bs) for bs in (16, 32, 64, 128)}, self.latency(W1_TEXT, work.sizes["w1_n"])


class InProcessBackend(InProcess):
    """The service's compiled backend (ONNX Runtime / OpenVINO) run in-process, the same way the replica runs it."""

    def __init__(self, model, runtime) -> None:
        super().__init__(model)
        self.runtime = runtime

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        return np.concatenate([self.runtime.embed(self.model.preprocess(texts[i : i + batch_size]))
                               for i in range(0, len(texts), batch_size)])


def measure_in_process(model, work: Work, backend: str, threads: int, precision: str = "fp32") -> dict:
    """In-process torch `encode` (the reference), and the service's backend and precision when they differ."""
    from embedding_service.model.forward import calibration_samples
    from embedding_service.model.runtimes import load_runtime
    from embedding_service.model.tokenization import InputEncoder

    inproc = InProcess(model)
    best, single = inproc.profile(work)
    limit_bs, limit = max(best.items(), key=lambda kv: kv[1])
    t = time.perf_counter()
    for p in work.w4:
        model.encode(p, batch_size=32)
    w4_rate = work.w4_inputs / (time.perf_counter() - t)
    t = time.perf_counter()
    model.encode(work.w6, batch_size=32)
    w6_rate = len(work.w6) / (time.perf_counter() - t)
    out = {"in_process": {"rate_by_batch_size": best, "limit": limit, "limit_batch_size": limit_bs,
                          "w1_p50_ms": pct(single, 50) * 1e3, "w1_p99_ms": pct(single, 99) * 1e3, "w4_rate": w4_rate,
                          "w6_rate": w6_rate,
                          "w5_rate_sample": inproc.rate(work.w5[:2000], limit_bs, repeats=1)}}
    # The ratios are to torch `encode` (the reference); these say how much
    # of the compiled backend's own in-process limit the service keeps.
    samples = calibration_samples(InputEncoder(model)) if precision == "int8" else []
    out["backend"], runtime = load_runtime(model, backend, "cpu", threads, precision, samples)
    out["precision"] = precision
    if out["backend"] != "torch" or precision != "fp32":
        same = InProcessBackend(model, runtime)
        same_best, same_single = same.profile(work)
        diff = float(np.abs(same.encode(work.w2[:64]) - model.encode(work.w2[:64])).max())
        out["in_process_backend"] = {"rate_by_batch_size": same_best, "limit": max(same_best.values()),
                                     "w1_p50_ms": pct(same_single, 50) * 1e3, "max_abs_diff_vs_torch": diff}
    return out
