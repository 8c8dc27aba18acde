"""Who may call the gRPC API: API keys from a secret, or callers on loopback only.

Keys come from the environment variable and/or the file that `args.auth` names
(config.AuthSettings), never from the config itself. A call carries
`authorization: Bearer <key>` metadata; keys are compared in constant time. The
peer is the address Ray Serve's proxy saw (`grpc_context.peer()`, e.g.
"ipv4:127.0.0.1:52114").
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Iterable, Mapping

from embedding_service.config import AuthSettings
from embedding_service.wire.bearer import bearer_key, known_key
from embedding_service.wire.reasons import Reason, ServiceError

# A rotated key file is noticed within this long.
FILE_CHECK_S = 1.0


def parse_keys(text: str) -> tuple[bytes, ...]:
    """Keys separated by commas or newlines; blanks and surrounding spaces dropped."""
    return tuple(k.strip().encode() for k in text.replace(",", "\n").splitlines() if k.strip())


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string: "ipv4:1.2.3.4:5", "ipv6:[::1]:5", "unix:/path" -> its address or ''."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]").split("%")[0]
    return ""


def is_local_peer(peer: str) -> bool:
    """Loopback addresses (IPv4, IPv6 and IPv4-mapped) and Unix sockets are this machine."""
    if peer.startswith(("unix:", "unix-abstract:")):
        return True
    try:
        address = ipaddress.ip_address(peer_host(peer))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


class Authenticator:
    def __init__(self, settings: AuthSettings, environ: Mapping[str, str] = os.environ) -> None:
        self.settings = settings
        # A named variable that is not set at all (and no file): serving loopback callers only, as with no auth
        # configured, rather than refusing to start: the shipped config names one for Kubernetes, where a Secret
        # sets it, while `run` on a laptop has none. Set but holding no key still stops the start.
        self.unset_env = bool(settings.api_keys_env and settings.api_keys_env not in environ
                              and not settings.api_keys_file)
        self._env_keys = parse_keys(environ.get(settings.api_keys_env, "")) if settings.api_keys_env else ()
        self._file_keys: tuple[bytes, ...] = ()
        self._file_stamp: tuple[float, int] | None = None
        self._file_checked = float("-inf")
        self._reload_file()
        if self.enabled and not self.keys():
            sources = [f"environment variable {settings.api_keys_env}" if settings.api_keys_env else "",
                       f"file {settings.api_keys_file}" if settings.api_keys_file else ""]
            raise ValueError(f"args.auth names {' and '.join(s for s in sources if s)} but no API key was found there")

    @property
    def enabled(self) -> bool:
        return self.settings.configured and not self.unset_env

    def _reload_file(self) -> None:
        path = self.settings.api_keys_file
        if path is None:
            return
        self._file_checked = time.monotonic()
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            self._file_keys, self._file_stamp = (), None
            return
        stamp = (stat.st_mtime, stat.st_size)
        if stamp != self._file_stamp:
            with open(path) as f:
                self._file_keys = parse_keys(f.read())
            self._file_stamp = stamp

    def keys(self) -> tuple[bytes, ...]:
        if self.settings.api_keys_file and time.monotonic() - self._file_checked >= FILE_CHECK_S:
            self._reload_file()
        return self._env_keys + self._file_keys

    def check(self, metadata: Iterable[tuple[str, str | bytes]], peer: str) -> None:
        """Raises ServiceError unless the caller may call."""
        if not self.enabled:
            if not is_local_peer(peer):
                raise ServiceError(
                    Reason.LOOPBACK_ONLY,
                    (f"this service's API keys variable {self.settings.api_keys_env} is not set on its node, so it "
                     "serves callers on loopback only" if self.unset_env else
                     "this service has no API keys configured (args.auth) and serves callers on loopback only"),
                    peer=_peer_address(peer),
                )
            return
        given = bearer_key(next((v for k, v in metadata if k == "authorization"), None))
        if given is None:
            raise ServiceError(Reason.API_KEY_MISSING, "this service needs an API key: `authorization: Bearer <key>`",
                               peer=_peer_address(peer))
        if not known_key(given, self.keys()):
            raise ServiceError(Reason.API_KEY_INVALID, "the API key is not valid for this service",
                               peer=_peer_address(peer))


def _peer_address(peer: str) -> str:
    """"ipv4:127.0.0.1:52114" -> "127.0.0.1:52114": the address the service saw, for the caller's own debugging."""
    return peer.partition(":")[2] if peer.startswith(("ipv4:", "ipv6:")) else peer
