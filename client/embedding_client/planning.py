"""Cutting a job into calls within the service's published limits (ListModelsResponse.limits)."""

from __future__ import annotations

from collections.abc import Sequence

# Bytes a request adds around its inputs (model name, options) and per input (tags, lengths): kept
# well clear of max_request_bytes rather than computed to the byte.
REQUEST_OVERHEAD = 1024
INPUT_OVERHEAD = 16


def plan_calls(sizes: Sequence[int], max_inputs: int, max_bytes: int, overhead: int = REQUEST_OVERHEAD,
               counts: Sequence[int] | None = None, max_count: int = 0) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive inputs, each within max_inputs and max_bytes (an input larger than
    max_bytes alone goes alone: the service names it in its error). `overhead`: bytes of the request besides
    its inputs (a rerank call's query, say). `counts` and `max_count`: a second budget per call, the sum of
    the inputs' counts (a Detokenize call's token ids); 0 leaves it unbounded."""
    runs, start, used, counted = [], 0, overhead, 0
    for k, size in enumerate(sizes):
        cost = size + INPUT_OVERHEAD
        count = counts[k] if counts is not None else 0
        over_count = max_count > 0 and counted + count > max_count
        if k > start and (k - start >= max_inputs or used + cost > max_bytes or over_count):
            runs.append((start, k))
            start, used, counted = k, overhead, 0
        used += cost
        counted += count
    if start < len(sizes):
        runs.append((start, len(sizes)))
    return runs
