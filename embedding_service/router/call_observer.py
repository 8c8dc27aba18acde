"""What the router records of each EmbedService call: its metrics and its span.

One context manager around a call, from its arrival (before admission, so
refused calls count too) to its last byte (a call Serve's proxy merged from several counts as
those several in the requests counted): the final gRPC code comes from the
one error mapping (wire/status.code_name), the model label from the router once it
has resolved the name (until then NO_MODEL: never the caller's raw text).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from embedding_service.observability import tracing
from embedding_service.observability.metrics import NO_MODEL, RouterMetrics
from embedding_service.observability.tracing import Tracer
from embedding_service.wire import status
from embedding_service.wire.messages import MERGED_KEY


@dataclass
class ObservedCall:
    method: str
    metrics: RouterMetrics
    started: float = field(default_factory=time.perf_counter)
    model: str = NO_MODEL
    inputs: int = 0
    tokens: int = 0
    first_shard_s: float | None = None
    span: Any = None
    callers: int = 1  # the calls Serve's proxy merged into this one (proxy/merging.py)

    def tags(self) -> dict[str, str]:
        return {"method": self.method, "model": self.model}

    def planned(self, shards: int) -> None:
        self.metrics.request_shards.observe(shards, tags={"model": self.model})

    def shard_done(self) -> None:
        if self.first_shard_s is None:
            self.first_shard_s = time.perf_counter() - self.started
            self.metrics.first_shard_seconds.observe(self.first_shard_s, tags=self.tags())

    def embedded(self, inputs: int, tokens: int) -> None:
        """Vectors handed to the caller (a whole response, or one stream chunk)."""
        self.inputs += inputs
        self.tokens += tokens
        self.metrics.inputs.inc(inputs, tags={"model": self.model})
        if tokens:
            self.metrics.tokens.inc(tokens, tags={"model": self.model})


# More callers than one proxy ever merges into one call: a value past it did not come from a proxy.
MAX_MERGED_CALLS = 1 << 20


def _merged_calls(metadata: Iterable[tuple[str, str]] | None) -> int:
    """The callers a call carries, as the proxy wrote it (it drops a caller's own): 1 for anything else."""
    for key, value in metadata or ():
        if key == MERGED_KEY:
            if isinstance(value, str) and value.isdigit() and len(value) <= 7 and 0 < int(value) <= MAX_MERGED_CALLS:
                return int(value)
            return 1
    return 1


class CallObserver:
    def __init__(self, metrics: RouterMetrics, tracer: Tracer) -> None:
        self.metrics = metrics
        self.tracer = tracer

    @contextlib.contextmanager
    def observe(self, method: str, metadata: Iterable[tuple[str, str]] | None) -> Iterator[ObservedCall]:
        """Counts the call and spans it (a child of the caller's `traceparent`, when it sent one)."""
        call = ObservedCall(method, self.metrics, callers=_merged_calls(metadata))
        code = "OK"
        with self.tracer.span(f"EmbedService/{method}", kind="SERVER", parent=metadata,
                              attributes={"rpc.system": "grpc", "rpc.service": "embedding_service.v1.EmbedService",
                                          "rpc.method": method}) as span:
            call.span = span
            try:
                yield call
            except BaseException as exc:
                code = status.code_name(exc)
                raise
            finally:
                self._finish(call, code)

    def _finish(self, call: ObservedCall, code: str) -> None:
        m = self.metrics
        tags = call.tags()
        m.requests.inc(call.callers, tags={**tags, "code": code})
        m.request_seconds.observe(time.perf_counter() - call.started, tags=tags)
        if code == "OK" and call.inputs:
            m.request_inputs.observe(call.inputs, tags=tags)
            m.request_tokens.observe(call.tokens, tags=tags)
        tracing.set_attributes(call.span, **{"embedding.model": call.model, "embedding.inputs": call.inputs,
                                             "embedding.tokens": call.tokens})
        tracing.set_error(call.span, code)
