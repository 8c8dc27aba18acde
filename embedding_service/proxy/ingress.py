"""What runs inside Ray Serve's gRPC proxy: the registrations serve-config.yaml names.

`grpc_options.grpc_servicer_functions` names `add_EmbedServiceServicer_to_server` and
`add_HealthServicer_to_server` from here (as do the rendered Kubernetes manifests); they are made in
registration.py. The health service is answered in the proxy, from the router's view that each proxy follows
over one stream (health_relay.py), and so is WatchNodes (nodes_relay.py). The embedding service's handlers are
Serve's own, with these changes at the edge, before a call costs the service anything:

- The caller's API key (or, with no keys configured, its being on loopback) is checked before gRPC reads the
  call's request: the methods are registered as request-streaming (registration.py, handlers.py, state.py).
- Request bytes that do not parse get INVALID_ARGUMENT (MALFORMED_REQUEST) and a plain message (parsing.py).
- Metadata the service passes between its own processes is taken from what the caller sent, and the caller's
  deadline goes on to the router as metadata (call_context.py).
- Concurrent small Embed calls may leave as one (merging.py).
- A call whose router replica was lost before answering is sent again to another, a stream with only the
  inputs it has not returned (resends.py).
- Serve's own failures (its queue full, no router replica, a router lost past the resends) get the service's
  reasons and a RetryInfo delay, as every other error (wire/serve_failures.py, state.py).
"""

from embedding_service.proxy.registration import add_EmbedServiceServicer_to_server, add_HealthServicer_to_server

__all__ = ["add_EmbedServiceServicer_to_server", "add_HealthServicer_to_server"]
