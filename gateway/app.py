"""The FastAPI application: OpenAI's embeddings REST schema over the gRPC Embed API.

The app's state holds what the routes use: the settings, the service's client (upstream.py), the Embed
coalescing (coalescing.py), the metrics, the draining flag and the budget of request bodies held (body_budget.py).
"""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI

from embedding_service.observability.tracing import Tracer, env_tracer
from gateway import batch_routes, embeddings, guards, routes, scoring_routes
from gateway.body_budget import BodyBudget
from gateway.classify_routes import classify as classify_routes
from gateway.coalescing import EmbedCoalescing
from gateway.cohere_embed import router as cohere_embed_routes
from gateway.label_counts import LabelCounts
from gateway.metrics import GatewayMetrics, ObserveRequests
from gateway.model_prompts import ModelPrompts
from gateway.settings import GatewaySettings
from gateway.tokenize_routes import tokenizer as tokenize_routes
from gateway.upstream import loop_deadline, upstream_client


class GatewayApp(FastAPI):
    """FastAPI, with POST /v1/embeddings served ahead of its routing and middleware (embeddings.py) through the
    gateway's own pure-ASGI layers: metrics and span outermost, then the API key and body bound."""

    hot_path = None  # set by create_app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] == embeddings.PATH and scope["method"] == "POST":
            scope["app"] = self
            await self.hot_path(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: GatewaySettings, draining: threading.Event | None = None,
               tracer: Tracer | None = None) -> GatewayApp:
    """The gateway; `draining` set (by main.DrainingServer on SIGTERM) turns /readyz to 503.

    `tracer`: where its spans go; by default from the standard OTEL_* variables (off unless an OTLP endpoint
    is set).
    """
    metrics = GatewayMetrics()
    tracer = tracer or env_tracer("gateway")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client = app.state.client = upstream_client(settings, metrics, tracer)
        app.state.embedding = EmbedCoalescing(
            lambda request, deadline: client.call("Embed", request, deadline=loop_deadline(deadline)),
            settings.coalesce_max_inputs,
            settings.coalesce_max_in_flight, on_send=metrics.coalesced_callers.observe,
            max_queued=settings.coalesce_max_queued)
        try:
            yield
        finally:
            await client.close()
            tracer.shutdown()

    app = GatewayApp(title="embedding-service OpenAI gateway", version="1", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.draining = draining or threading.Event()
    app.state.bodies = BodyBudget(settings.max_body_bytes_in_flight)  # one budget for the hot path and the routes
    app.state.label_counts = LabelCounts()  # vLLM's /v1/classify returns every label's score
    app.state.model_prompts = ModelPrompts(settings.model_prompts_ttl_s)  # Cohere's input_type -> prompt_name
    app.state.batches = batch_routes.BatchDesk(settings)  # OpenAI's Files and Batches (off without a storage root)
    guards.install(app, settings)
    app.include_router(routes.openai)
    app.include_router(scoring_routes.scoring)
    app.include_router(cohere_embed_routes)
    app.include_router(classify_routes)
    app.include_router(tokenize_routes)
    app.include_router(batch_routes.batches)
    app.include_router(routes.operations)
    # Added last, so outermost of the app's middleware: it sees every response, refusals included.
    app.add_middleware(ObserveRequests, metrics=metrics, tracer=tracer)
    app.hot_path = ObserveRequests(guards.Guard(embeddings.EmbeddingsEndpoint(app.state), settings, app.state.bodies),
                                   metrics, tracer, route=embeddings.PATH)
    return app
