"""The proxy side's touches of Ray Serve's non-public gRPC proxy, fenced in one place.

Serve's proxy has no public hook for three things this service needs at its edge, so they are made here and
nowhere else:

1. gRPC server options (the burst bounds): Serve builds its server from the list
   `ray.serve._private.constants.DEFAULT_GRPC_SERVER_OPTIONS`, read by name in `grpc_util` when it builds
   one; it is extended in place as a Ray worker starts (proxy/grpc_options.py).
2. A wrapper around Serve's handlers of our services (malformed bytes, the caller's deadline, Serve's own
   failures): `gRPCGenericServer.service_handler_factory`, which the server reads, and calls with the keywords
   `service_method` and `streaming_type`, for each method registered.
3. grpc.health.v1 answered in the proxy itself: `gRPCGenericServer.add_passthrough_service`.
5. On a Ray whose node is loopback only (the run command's own: node_env.LOOPBACK_RAY_ENV "0"), each replica's
   inter-deployment gRPC server listens on loopback too, not on every interface (Serve binds "[::]:0"):
   `replica.add_port_to_grpc_server`, the name replica.py calls it by.
4. The service's methods registered as request-streaming, so that gRPC reads no request before the proxy has
   checked the caller's key: the factory is asked for each streaming type (`gRPCStreamingType`, by its values),
   and a request-streaming slot is served with Serve's handler of the matching unary-request type.

Each shape is checked as this module is imported (in the proxy, and in every worker the options are
preloaded into): a Ray release that moved one stops with the Ray version and what moved, rather than serving
with gRPC's defaults (bursts CANCELLED) or without the wrapper. Whether the options are in force is checked
again by the proxy when it registers the services (registration.py, state.py), and reported. Tested against the
installed Ray (tests/unit/test_ray_internals.py); pyproject pins Ray's minor release.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import ray
from ray.serve._private import constants, grpc_util

OPTIONS = "DEFAULT_GRPC_SERVER_OPTIONS"
FACTORY = "service_handler_factory"
FACTORY_KEYWORDS = ("service_method", "streaming_type")
# Serve's streaming types (their values) of a request-streaming slot -> the unary-request type it stands for.
UNARY_REQUEST_OF = {"stream_unary": "unary_unary", "stream_stream": "unary_stream"}


class RayInternalsChanged(RuntimeError):
    """A non-public Ray API the service relies on is not where, or not what, it was."""


def _check() -> None:
    where = f"Ray {ray.__version__}"
    options = getattr(constants, OPTIONS, None)
    if not isinstance(options, list) or not all(isinstance(o, tuple) and len(o) == 2 for o in options):
        raise RayInternalsChanged(f"{where}: ray.serve._private.constants.{OPTIONS} is not a list of option pairs")
    if getattr(grpc_util, OPTIONS, None) is not options:
        raise RayInternalsChanged(f"{where}: grpc_util no longer holds constants.{OPTIONS} itself (a copy would "
                                  "leave the proxy on gRPC's defaults)")
    server = getattr(grpc_util, "gRPCGenericServer", None)
    if server is None:
        raise RayInternalsChanged(f"{where}: ray.serve._private.grpc_util.gRPCGenericServer is gone")
    if OPTIONS not in server.__init__.__code__.co_names:
        raise RayInternalsChanged(f"{where}: gRPCGenericServer no longer builds its server from {OPTIONS}")
    override = getattr(server, "_override_method_handler", None)
    code = getattr(override, "__code__", None)
    if code is None or FACTORY not in code.co_names or FACTORY_KEYWORDS not in code.co_consts:
        raise RayInternalsChanged(f"{where}: gRPCGenericServer no longer calls self.{FACTORY}"
                                  f"({', '.join(k + '=' for k in FACTORY_KEYWORDS)}) per method")
    if not callable(getattr(server, "add_passthrough_service", None)):
        raise RayInternalsChanged(f"{where}: gRPCGenericServer.add_passthrough_service is gone")
    from ray.serve._private.proxy_request_response import gRPCStreamingType

    values = {t.value for t in gRPCStreamingType}
    if not set(UNARY_REQUEST_OF) | set(UNARY_REQUEST_OF.values()) <= values:
        raise RayInternalsChanged(f"{where}: gRPCStreamingType's values are {sorted(values)}, not those of gRPC's "
                                  "four kinds of method")


_check()


def apply_server_options(options: list[tuple[str, int]]) -> None:
    """Serve's gRPC servers built from here on get `options` (each replacing Serve's own of that name)."""
    names = {key for key, _ in options}
    default = getattr(constants, OPTIONS)
    default[:] = [o for o in default if o[0] not in names] + list(options)  # in place: grpc_util holds this list


def server_options_in_force(options: list[tuple[str, int]]) -> bool:
    """Whether a server Serve built (from the list, when it started) runs with every one of `options`."""
    default = getattr(grpc_util, OPTIONS)
    return all(option in default for option in options)


@contextlib.contextmanager
def wrapped_handler_factory(server, wrap: Callable[..., Callable]) -> Iterator[None]:
    """While registering services on Serve's `server`, Serve's handler factory is `wrap(original, **keywords)`.

    Raises if Serve registered a method without asking the factory (the wrapper would be silently missing).
    """
    original = getattr(server, FACTORY)
    made: list[str] = []

    def factory(**keywords):
        made.append(keywords[FACTORY_KEYWORDS[0]])
        return wrap(original, **keywords)

    setattr(server, FACTORY, factory)
    try:
        yield
    finally:
        setattr(server, FACTORY, original)
    if not made:
        raise RayInternalsChanged(f"Ray {ray.__version__}: Serve registered the services without its handler factory")


def unary_request_keywords(keywords: dict) -> dict | None:
    """The factory's keywords for Serve's handler of the unary-request type that a request-streaming slot stands
    for; None for a unary-request slot (gRPC never runs those of a method registered as request-streaming)."""
    kind = keywords[FACTORY_KEYWORDS[1]]
    unary = UNARY_REQUEST_OF.get(getattr(kind, "value", kind))
    return None if unary is None else {**keywords, FACTORY_KEYWORDS[1]: type(kind)(unary)}


REPLICA_ADDRESS = "[::]:0"


def bind_replica_servers_to_loopback() -> None:
    """Each Serve replica started in this process from here on listens on 127.0.0.1 for inter-deployment calls."""
    from ray.serve._private import replica

    add_port = getattr(replica, "add_port_to_grpc_server", None)
    if add_port is None or REPLICA_ADDRESS not in replica.Replica._on_initialized.__code__.co_consts:
        raise RayInternalsChanged(f"Ray {ray.__version__}: Serve's replica no longer binds its inter-deployment "
                                  f"server with add_port_to_grpc_server(server, {REPLICA_ADDRESS!r})")

    def on_loopback(server, address: str):
        return add_port(server, "127.0.0.1:0" if address == REPLICA_ADDRESS else address)

    replica.add_port_to_grpc_server = on_loopback


def add_passthrough(server, service: str) -> None:
    """`service`'s handlers run in the proxy as registered: Serve routes none of its calls."""
    server.add_passthrough_service(service)
