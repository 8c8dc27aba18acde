"""The application builder: `serve-config.yaml` points its import_path here (embedding_service.app:build_app).

It validates `args` (config.AppArgs) and binds the three kinds of deployment: the router (the ingress),
one deployment per model (served by its kind's class, kinds.py), and the fleet's recycler that both follow.

The router and the recycler are placed on the head node by a resource only the head declares
(config.HEAD_RESOURCE: the run command's Ray, the Kubernetes head group, the cluster recipe). A Ray started
without it (`serve run serve-config.yaml` on one machine) would leave them pending forever: on a one-node Ray
they are placed without it (that node is the head), said once at WARNING; on a larger one the build fails at
once, saying what to run.
"""

from __future__ import annotations

import importlib
from typing import Any

import ray
from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from embedding_service.batch.manager import JobManager
from embedding_service.config import (
    HEAD_RESOURCE,
    ON_HEAD,
    AppArgs,
    ModelSettings,
    RecyclerSettings,
    RouterSettings,
    ShutdownSettings,
)
from embedding_service.fleet.recycler import NodeRecycler
from embedding_service.kinds import KINDS
from embedding_service.observability.logs import service_logger
from embedding_service.router.deployment import EmbedRouter
from embedding_service.router.replica_routing import HealthyNodeRequestRouter
from embedding_service.wire.messages import FLEET_DEPLOYMENT, JOBS_DEPLOYMENT, ROUTER_DEPLOYMENT, model_deployment_name

logger = service_logger(__name__)


class NoHeadNode(RuntimeError):
    """A Ray of several nodes where none declares the head's resource."""


def place_on_head(resources: dict[str, float]) -> dict[str, float]:
    """`resources` for a deployment pinned to the head, as this Ray can place them (see the module's doc)."""
    if HEAD_RESOURCE not in resources or not ray.is_initialized():
        return resources
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if any(HEAD_RESOURCE in n["Resources"] for n in nodes):
        return resources
    if len(nodes) == 1:
        logger.warning("no node of this one-node Ray declares the resource %r that places the router and the recycler "
                       "on the head: they run on its only node (start Ray with --resources='{\"%s\": 1}', or with "
                       "`python -m embedding_service run`, to place them on purpose)", HEAD_RESOURCE, HEAD_RESOURCE)
        return {k: v for k, v in resources.items() if k != HEAD_RESOURCE}
    raise NoHeadNode(
        f"none of this Ray's {len(nodes)} nodes declares the resource {HEAD_RESOURCE!r} that places the router and "
        f"the recycler on the head node, so they could never start: start the head with `ray start --head "
        f"--resources='{{\"{HEAD_RESOURCE}\": 1}}'` (docs/operations.md: a Ray cluster by hand), or run the "
        "service with `python -m embedding_service run`")


def replica_class(kind: str) -> type:
    """The class that serves a kind of model (kinds.py names it)."""
    module, _, name = KINDS[kind].replica.partition(":")
    return getattr(importlib.import_module(module), name)


def _graceful(shutdown: ShutdownSettings) -> dict[str, float]:
    """When Serve stops a replica (scale-down, upgrade), it routes nothing new there and waits up to the grace
    for the replica's calls in flight, checking every half second."""
    return {"graceful_shutdown_timeout_s": shutdown.grace_s, "graceful_shutdown_wait_loop_s": 0.5}


def _fleet_app(settings: RecyclerSettings) -> Application:
    return (
        serve.deployment(NodeRecycler)
        .options(
            name=FLEET_DEPLOYMENT,
            num_replicas=1,
            # On the head node: it must outlive any worker it recycles.
            ray_actor_options={"num_cpus": 0, "resources": place_on_head(settings.resources)},
            # Every router long-polls it and every replica heartbeats.
            max_ongoing_requests=10_000,
        )
        .bind(settings)
    )


def _model_app(settings: ModelSettings, fleet: Application, args: AppArgs) -> Application:
    scaling: dict[str, Any] = (
        {"autoscaling_config": settings.autoscaling.model_dump()}
        if settings.autoscaling
        else {"num_replicas": settings.num_replicas}
    )
    # Callers skip replicas on quarantined nodes (and refusing ones) at once; they learn of them from the fleet.
    routing = RequestRouterConfig(request_router_class=HealthyNodeRequestRouter,
                                  request_router_kwargs={"fleet_deployment": FLEET_DEPLOYMENT},
                                  max_backoff_s=args.router.handle_max_backoff_s)
    replica = replica_class(settings.kind)
    return (
        serve.deployment(replica)
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
            request_router_config=routing,
            **_graceful(args.shutdown),
            **scaling,
        )
        .bind(settings, fleet, args.recycler.heartbeat_s, args.tracing)
    )


def _router_options(router: RouterSettings, shutdown: ShutdownSettings) -> dict[str, Any]:
    return {
        "name": ROUTER_DEPLOYMENT,
        "num_replicas": router.num_replicas,
        "ray_actor_options": {"num_cpus": router.num_cpus, "resources": place_on_head(router.resources)},
        "max_ongoing_requests": router.max_ongoing_requests,
        "max_queued_requests": router.max_queued_requests,
        "health_check_period_s": router.health_check_period_s,
        # The proxies' handle routers: how soon a queued call is placed once a router frees a slot.
        "request_router_config": RequestRouterConfig(max_backoff_s=router.handle_max_backoff_s),
        **_graceful(shutdown),
    }


def _jobs_app(args: AppArgs) -> Application | None:
    """The batch jobs' manager (batch/manager.py), on the head: it must outlive the worker nodes its jobs use."""
    if args.jobs is None:
        return None
    return (
        serve.deployment(JobManager)
        .options(name=JOBS_DEPLOYMENT, num_replicas=1,
                 ray_actor_options={"num_cpus": 0, "resources": place_on_head(dict(ON_HEAD))})
        .bind(args.jobs, list(args.models), args.limits)
    )


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Validates `args` (see AppArgs) and wires the router to the recycler, one deployment per model and, with
    args.jobs, the batch jobs' manager."""
    parsed = AppArgs.parse(args)
    fleet = _fleet_app(parsed.recycler)
    models = {m.name: _model_app(m, fleet, parsed) for m in parsed.models}
    return serve.deployment(EmbedRouter).options(**_router_options(parsed.router, parsed.shutdown)).bind(
        parsed, models, fleet, _jobs_app(parsed))
