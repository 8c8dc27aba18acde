"""The application builder: `serve-config.yaml` points its import_path here."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from embedding_service.config import AppArgs, ModelSettings
from embedding_service.model_deployment import EmbeddingModel
from embedding_service.router import EmbedRouter


def model_deployment_name(name: str) -> str:
    return "model-" + name.replace("/", "_")


def _model_app(settings: ModelSettings) -> Application:
    scaling: dict[str, Any] = (
        {"autoscaling_config": settings.autoscaling.model_dump()}
        if settings.autoscaling
        else {"num_replicas": settings.num_replicas}
    )
    return (
        serve.deployment(EmbeddingModel)
        .options(
            name=model_deployment_name(settings.name),
            ray_actor_options={"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
            max_ongoing_requests=settings.max_ongoing_requests,
            max_queued_requests=settings.max_queued_requests,
            **scaling,
        )
        .bind(settings)
    )


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Validates `args` (see AppArgs) and wires the router to one deployment per model."""
    parsed = AppArgs.parse(args)
    router = parsed.router
    return (
        serve.deployment(EmbedRouter)
        .options(
            name="EmbedRouter",
            num_replicas=router.num_replicas,
            ray_actor_options={"num_cpus": router.num_cpus},
            max_ongoing_requests=router.max_ongoing_requests,
            max_queued_requests=router.max_queued_requests,
        )
        .bind(parsed, {m.name: _model_app(m) for m in parsed.models})
    )
