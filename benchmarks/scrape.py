"""What the model replicas ran, read from the service's own metrics on Ray's Prometheus endpoints."""

from __future__ import annotations

import time
from collections.abc import Callable


class BatchMetrics:
    """What the model replicas ran, read from the service's own metrics on Ray's Prometheus endpoints.

    Each call returns the batches run since the previous call: how many, their
    sizes (histogram buckets), mean size, mean queue and forward time, padding share. Told how many inputs
    the replicas ran since the previous call, it reads until the metrics count them all, then once more a
    report later (a batch's counters are reported together within one interval).
    """

    def __init__(self, endpoints: Callable[[], list[str]], model: str, report_s: float = 1.0) -> None:
        self.endpoints = endpoints
        self.model = model
        self.report_s = report_s  # at least two of Ray's report intervals
        self._last = self._settled()

    def _read(self) -> dict[tuple[str, str], float]:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        values: dict[tuple[str, str], float] = {}
        for url in self.endpoints():
            # Only the service's lines are parsed: Ray's own make up most of each endpoint's text.
            ours = "\n".join(line for line in httpx.get(url, timeout=10).text.splitlines()
                              if line.startswith(("ray_embedding_", "# HELP ray_embedding_", "# TYPE ray_embedding_")))
            for family in text_string_to_metric_families(ours + "\n"):
                for s in family.samples:
                    if s.name.startswith("ray_embedding_") and s.labels.get("model") == self.model:
                        k = (s.name, s.labels.get("le", s.labels.get("stage", "")))
                        values[k] = values.get(k, 0.0) + s.value
        return values

    def _settled(self) -> dict[tuple[str, str], float]:
        last = self._read()
        for _ in range(30):
            time.sleep(self.report_s)
            now = self._read()
            if now == last:
                break
            last = now
        return last

    def _counted(self, inputs: int) -> dict[tuple[str, str], float]:
        def forwarded(now: dict) -> float:
            key = ("ray_embedding_sequences_forwarded_total", "")
            return now.get(key, 0.0) - self._last.get(key, 0.0)

        for _ in range(60):
            now = self._read()
            if forwarded(now) >= inputs:
                time.sleep(self.report_s)
                return self._read()
            time.sleep(self.report_s / 2)
        raise TimeoutError(f"the replicas' metrics counted {forwarded(now):g} of {inputs} inputs forwarded after "
                           f"{30 * self.report_s:g} s")

    def __call__(self, inputs: int) -> dict:
        now = self._counted(inputs)

        def d(name: str, label: str = "") -> float:  # label: a bucket's le or a stage
            return now.get((name, label), 0.0) - self._last.get((name, label), 0.0)

        batches = d("ray_embedding_batch_size_count")

        def per_batch(name: str, **kind: str) -> float:  # exact counters over the histogram's exact count
            return d(name, *kind.values()) / batches if batches else 0.0

        bounds = sorted((k[1] for k in now if k[0] == "ray_embedding_batch_size_bucket"), key=float)
        sizes, below = {}, 0.0
        for le in bounds:
            cumulative = d("ray_embedding_batch_size_bucket", le)
            if cumulative - below:
                sizes[f"<={float(le):g}"] = int(cumulative - below)
            below = cumulative
        slots = d("ray_embedding_token_slots_total")
        queued = d("ray_embedding_queue_seconds_count")  # one per shard
        out = {"batches": int(batches), "mean_size": per_batch("ray_embedding_sequences_forwarded_total"),
               "sizes": sizes,
               "mean_queue_ms": d("ray_embedding_stage_seconds_total", "queue") / queued * 1e3 if queued else 0.0,
               "mean_forward_ms": per_batch("ray_embedding_stage_seconds_total", stage="forward") * 1e3,
               "padding_share": d("ray_embedding_padding_tokens_total") / slots if slots else 0.0}
        self._last = now
        return out
