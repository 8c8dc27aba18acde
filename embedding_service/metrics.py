"""The service's own metrics, defined once, through Ray Serve's metrics API.

They appear on Ray's per-node metrics endpoint beside Serve's `ray_serve_*`
metrics (Ray adds the `ray_` prefix, and Serve the deployment, replica and
application tags). Every name starts with `embedding_`; tags stay bounded
(model, backend, reason), never request data.
"""

from __future__ import annotations

from ray.serve import metrics


class ModelMetrics:
    """A model replica's metrics."""

    def __init__(self, model: str, backend: str) -> None:
        tags = {"model": model, "backend": backend}
        self.sequences_forwarded = metrics.Counter(
            "embedding_sequences_forwarded",
            description="Inputs run through the model's forward pass.",
            tag_keys=("model", "backend"),
        )
        self.sequences_forwarded.set_default_tags(dict(tags))  # Serve adds its tags into the dict
        self.sequences_dropped = metrics.Counter(
            "embedding_sequences_dropped",
            description="Queued inputs dropped before tokenization or forward: their caller had left "
            "(reason=cancelled) or their deadline had passed (reason=deadline).",
            tag_keys=("model", "backend", "reason"),
        )
        self.sequences_dropped.set_default_tags(dict(tags))
