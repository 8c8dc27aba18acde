"""The application builder: `serve-config.yaml` points its import_path here."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from embedding_service.config import AppArgs, ModelSettings, RecyclerSettings, ShutdownSettings, TracingSettings
from embedding_service.model_deployment import EmbeddingModel
from embedding_service.node_routing import HealthyNodeRequestRouter
from embedding_service.recycler import NodeRecycler
from embedding_service.router import EmbedRouter

# The recycler lives on the head node: it must outlive any worker it recycles.
HEAD_NODE = {"node:__internal_head__": 0.001}
RECYCLER = "NodeRecycler"


def model_deployment_name(name: str) -> str:
    return "model-" + name.replace("/", "_")


def _recycler_app(settings: RecyclerSettings) -> Application:
    return (
        serve.deployment(NodeRecycler)
        .options(
            name=RECYCLER,
            num_replicas=1,
            ray_actor_options={"num_cpus": 0, "resources": HEAD_NODE},
            # Every router long-polls it and every replica heartbeats.
            max_ongoing_requests=10_000,
        )
        .bind(settings)
    )


def _graceful(shutdown: ShutdownSettings) -> dict[str, float]:
    """When Serve stops a replica (scale-down, upgrade), it routes nothing new there and
    waits up to the grace for the replica's calls in flight, checking every half second."""
    return {"graceful_shutdown_timeout_s": shutdown.grace_s, "graceful_shutdown_wait_loop_s": 0.5}


def _model_app(settings: ModelSettings, recycler: Application, heartbeat_s: float,
               shutdown: ShutdownSettings, tracing: TracingSettings) -> Application:
    scaling: dict[str, Any] = (
        {"autoscaling_config": settings.autoscaling.model_dump()}
        if settings.autoscaling
        else {"num_replicas": settings.num_replicas}
    )
    return (
        serve.deployment(EmbeddingModel)
        .options(
            name=model_deployment_name(settings.name),
            ray_actor_options={
                "num_cpus": settings.num_cpus,
                "num_gpus": settings.num_gpus,
                "resources": settings.resources,
            },
            max_ongoing_requests=settings.max_ongoing_requests,
            max_queued_requests=settings.max_queued_requests,
            health_check_period_s=settings.health_check_period_s,
            # Callers skip replicas on quarantined nodes at once.
            request_router_config=RequestRouterConfig(request_router_class=HealthyNodeRequestRouter),
            **_graceful(shutdown),
            **scaling,
        )
        .bind(settings, recycler, heartbeat_s, tracing)
    )


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Validates `args` (see AppArgs) and wires the router to the recycler and one deployment per model."""
    parsed = AppArgs.parse(args)
    router = parsed.router
    recycler = _recycler_app(parsed.recycler)
    models = {m.name: _model_app(m, recycler, parsed.recycler.heartbeat_s, parsed.shutdown, parsed.tracing)
              for m in parsed.models}
    return (
        serve.deployment(EmbedRouter)
        .options(
            name="EmbedRouter",
            num_replicas=router.num_replicas,
            ray_actor_options={"num_cpus": router.num_cpus, "resources": router.resources},
            max_ongoing_requests=router.max_ongoing_requests,
            max_queued_requests=router.max_queued_requests,
            health_check_period_s=router.health_check_period_s,
            **_graceful(parsed.shutdown),
        )
        .bind(parsed, models, recycler)
    )
