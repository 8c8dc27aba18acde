"""Cutting a job into calls within the service's published limits (ListModelsResponse.limits)."""

from __future__ import annotations

from collections.abc import Sequence

# Bytes a request adds around its inputs (model name, options) and per input (tags, lengths): kept
# well clear of max_request_bytes rather than computed to the byte.
REQUEST_OVERHEAD = 1024
INPUT_OVERHEAD = 16


def plan_calls(sizes: Sequence[int], max_inputs: int, max_bytes: int, overhead: int = REQUEST_OVERHEAD
               ) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive inputs, each within max_inputs and max_bytes (an input larger than
    max_bytes alone goes alone: the service names it in its error). `overhead`: bytes of the request besides
    its inputs (a rerank call's query, say)."""
    runs, start, used = [], 0, overhead
    for k, size in enumerate(sizes):
        cost = size + INPUT_OVERHEAD
        if k > start and (k - start >= max_inputs or used + cost > max_bytes):
            runs.append((start, k))
            start, used = k, overhead
        used += cost
    if start < len(sizes):
        runs.append((start, len(sizes)))
    return runs
