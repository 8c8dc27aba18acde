"""Observing the service: its metrics as Prometheus reads them (Ray's per-node endpoints and the gateway's /metrics,
over HTTP), its logs, and waiting on conditions."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

import httpx
from prometheus_client.parser import text_string_to_metric_families

from embedding_service.ops.launcher import metrics_endpoints


@contextlib.contextmanager
def serve_logs(caplog) -> Iterator[None]:
    """pytest's caplog sees the service's records within the block: they go to Serve's logger, which Ray's logging
    setup stops from propagating."""
    logger = logging.getLogger("ray.serve")
    logger.addHandler(caplog.handler)
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)


def scrape(prefix: str = "ray_embedding_") -> list:
    """Every sample of the metrics named `prefix`... on every live node's endpoint (prometheus_client's parser; the
    rest of each page, Ray's own metrics, skipped unparsed: "" parses it all)."""
    samples = []
    for url in metrics_endpoints():
        text = httpx.get(url, timeout=10).text
        if prefix:
            text = "\n".join(line for line in text.splitlines()
                             if line.startswith(prefix) or line.startswith((f"# HELP {prefix}", f"# TYPE {prefix}")))
        for family in text_string_to_metric_families(text):
            samples.extend(family.samples)
    return samples


def gateway_samples(base: str) -> list:
    """Every sample of a gateway's own GET /metrics."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def total(name: str, samples: list | None = None, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    return sum(s.value for s in (scrape() if samples is None else samples)
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for: {what}")
        time.sleep(0.2)


def settled(name: str, period_s: float, **labels: str) -> list:
    """A scrape taken once a metric stopped changing over `period_s` (Ray reports metrics periodically)."""
    samples = [scrape()]

    def still() -> bool:
        time.sleep(period_s)
        samples.append(scrape())
        return total(name, samples[-1], **labels) == total(name, samples[-2], **labels)

    wait_until(still, 60, f"{name} settled")
    return samples[-1]
