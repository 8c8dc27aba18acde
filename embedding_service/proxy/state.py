"""This proxy's one state, made on first use in the proxy (the modules are imported outside Ray too): its
settings, metrics, key check and node relay, and the calls it answers itself.

The caller's API key (or, with no keys configured, its being on loopback) is checked here. args.auth reaches
the proxy through the node's environment (wire/node_env.py); where it does not, the proxy serves callers on
loopback only, and says so once at WARNING and in `embedding_proxy_keys_checked`.

Every call answered here without a router's answer is counted (`embedding_proxy_refusals`), Serve's own
failures among them: they get the service's reasons (wire/serve_failures.py). When the proxy's gRPC server
does not run with the service's options (its node was started without the service's environment) it says so
once at WARNING and in `embedding_proxy_grpc_options_in_force`.
"""

from __future__ import annotations

import asyncio

from embedding_service.config import AuthSettings, ProxySettings
from embedding_service.observability.logs import service_logger
from embedding_service.observability.metrics import ProxyMetrics, keep_gauges_set
from embedding_service.proxy import serve_internals
from embedding_service.proxy.call_context import Detached
from embedding_service.proxy.merging import EmbedMerging, Outcome, Send
from embedding_service.proxy.nodes_relay import NodesRelay
from embedding_service.wire import node_env, serve_failures, status
from embedding_service.wire.auth import Authenticator
from embedding_service.wire.reasons import ServiceError

logger = service_logger(__name__)


class ProxyState:
    """This proxy's metrics, settings, key check and node relay, and its one report of the server options."""

    def __init__(self) -> None:
        self.metrics = ProxyMetrics()
        self.options_in_force = True
        self.settings = node_env.proxy_settings() or ProxySettings()
        auth = node_env.auth_settings()
        self.keys_checked = auth is not None
        if auth is None:
            logger.warning(
                "Serve's gRPC proxy has no args.auth in its node's environment (%s): it serves callers on loopback "
                "only. Start every Ray node with what `python -m embedding_service node-env` prints (the run "
                "command and the rendered Kubernetes manifests set it).", node_env.AUTH_SETTINGS_ENV)
        self.auth = Authenticator(auth or AuthSettings(), require_keys=False)
        self.nodes = NodesRelay(self.settings, on_count=self.metrics.node_watchers.set)
        self._gauges: asyncio.Task | None = None

    def merging(self, send: Send) -> EmbedMerging:
        m = self.metrics
        return EmbedMerging(self.settings, send, Detached, on_send=m.merged_callers.observe,
                            on_drop=lambda inputs, reason: m.inputs_dropped.inc(inputs, tags={"reason": reason}))

    def check_options(self) -> None:
        """Whether Serve built this proxy's server with the service's options; says so when it did not."""
        requested = node_env.requested_proxy_options()
        if requested is None:
            self.options_in_force = False
            logger.warning(
                "Serve's gRPC proxy runs with gRPC's default server options, not the service's (%s, "
                "proxy_max_streams_per_connection): a burst of more than 1,000 calls waiting for the proxy gets "
                "CANCELLED. This node was started without the service's environment (%s, %s): start every Ray "
                "node with what `python -m embedding_service node-env` prints (the run command and the rendered "
                "Kubernetes manifests set it).", node_env.SETTING, node_env.PROXY_OPTIONS_ENV,
                node_env.PRELOADED_MODULE)
        elif not serve_internals.server_options_in_force(requested):
            self.options_in_force = False
            logger.warning(
                "Serve's gRPC proxy runs with gRPC's default server options although this node's environment asks "
                "for the service's (%s): the module %s was not preloaded into the proxy's worker, so a burst of more "
                "than 1,000 calls waiting for the proxy gets CANCELLED. Check that the node's environment names it "
                "in Ray's preload setting (`python -m embedding_service node-env`).", node_env.SETTING,
                node_env.PRELOADED_MODULE)
        else:
            logger.info("Serve's gRPC proxy runs with the service's server options (%s)",
                        ", ".join(f"{key}={value}" for key, value in requested))
        if self._gauges is None:
            self._gauges = asyncio.get_running_loop().create_task(keep_gauges_set(self._report))

    def _report(self) -> None:
        self.metrics.options_in_force.set(1 if self.options_in_force else 0)
        self.metrics.keys_checked.set(1 if self.keys_checked else 0)
        self.metrics.node_watchers.set(self.nodes.watchers)

    def admitted(self, context, stream: bool, method: str) -> bool:
        """Whether the caller may call (its key, or loopback where no keys are configured); else it is answered."""
        try:
            self.auth.check(context.invocation_metadata(), context.peer())
        except ServiceError as error:
            self.refuse(error, context, stream, method)
            return False
        return True

    def refuse(self, error: ServiceError, context, stream: bool, method: str) -> None:
        """Answers the call with `error` here, in the proxy, and counts it."""
        status.apply(error, context, stream=stream)
        self.metrics.refusals.inc(tags={"method": method, "code": error.code.name, "reason": error.reason.name})

    def finish(self, outcome: Outcome, context, stream: bool, method: str) -> None:
        """Serve's status onto the caller's call; a failure Serve reported on its own gets the service's reason."""
        if outcome.raised:
            self.refuse(serve_failures.serve_raised_error(), context, stream, method)
            return
        if outcome.code is not None:
            context.set_code(outcome.code)
        if outcome.details:
            context.set_details(outcome.details)
        if outcome.trailers:
            context.set_trailing_metadata(outcome.trailers)
        error = serve_failures.serve_status_error(outcome.code, outcome.details, outcome.trailers)
        if error is not None:
            self.refuse(error, context, stream, method)

    def serve_raised(self, context, stream: bool, method: str) -> None:
        """Serve's own handler raised (gRPC would answer UNKNOWN with the exception's class): our status instead."""
        logger.exception("Serve's proxy failed a call")
        self.finish(Outcome(b"", raised=True), context, stream, method)


_proxy: ProxyState | None = None


def this_proxy() -> ProxyState:
    global _proxy
    if _proxy is None:
        _proxy = ProxyState()
    return _proxy
