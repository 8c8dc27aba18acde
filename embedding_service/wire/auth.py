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


class KeySource:
    """Keys from an environment variable and/or a file (one key per line, re-read when its content changes)."""

    def __init__(self, env_name: str | None, path: str | None, environ: Mapping[str, str]) -> None:
        self.env_name, self.path = env_name, path
        self.unset_env = bool(env_name and env_name not in environ and not path)
        self._env_keys = parse_keys(environ.get(env_name, "")) if env_name else ()
        self._file_keys: tuple[bytes, ...] = ()
        self._file_content: bytes | None = None
        self._file_checked = float("-inf")
        self._reload_file()

    def describe(self) -> str:
        return " and ".join(s for s in (f"environment variable {self.env_name}" if self.env_name else "",
                                        f"file {self.path}" if self.path else "") if s)

    def _reload_file(self) -> None:
        """Reads the key file again and keeps its keys when its content changed. The content, not its mtime and
        size: a key rewritten with one of the same length and the old mtime kept (os.utime, a copy with -p, a
        restored backup) must still be revoked; the file is small and read at most once per FILE_CHECK_S."""
        if self.path is None:
            return
        self._file_checked = time.monotonic()
        try:
            with open(self.path, "rb") as f:
                content = f.read()
        except FileNotFoundError:
            self._file_keys, self._file_content = (), None
            return
        if content != self._file_content:
            self._file_keys = parse_keys(content.decode())
            self._file_content = content

    def keys(self) -> tuple[bytes, ...]:
        if self.path and time.monotonic() - self._file_checked >= FILE_CHECK_S:
            self._reload_file()
        return self._env_keys + self._file_keys


class Authenticator:
    def __init__(self, settings: AuthSettings, environ: Mapping[str, str] = os.environ,
                 require_keys: bool = True) -> None:
        """`require_keys`: a source named but empty stops the start (False: every caller is refused instead, for a
        process that cannot refuse to start, Serve's proxy)."""
        self.settings = settings
        # A named variable that is not set at all (and no file): serving loopback callers only, as with no auth
        # configured, rather than refusing to start: the shipped config names one for Kubernetes, where a Secret
        # sets it, while `run` on a laptop has none. Set but holding no key still stops the start.
        self._callers = KeySource(settings.api_keys_env, settings.api_keys_file, environ)
        self._admins = KeySource(settings.admin_keys_env, settings.admin_keys_file, environ)
        self.unset_env = self._callers.unset_env
        if require_keys and self.enabled and not self.keys():
            raise ValueError(f"args.auth names {self._callers.describe()} but no API key was found there")

    @property
    def enabled(self) -> bool:
        return self.settings.configured and not self.unset_env

    def keys(self) -> tuple[bytes, ...]:
        """The keys callers may call with (an admin key is one too)."""
        return self._callers.keys() + self._admins.keys()

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
        given = given_key(metadata)
        if given is None:
            raise ServiceError(Reason.API_KEY_MISSING, "this service needs an API key: `authorization: Bearer <key>`",
                               peer=_peer_address(peer))
        if not known_key(given, self.keys()):
            raise ServiceError(Reason.API_KEY_INVALID, "the API key is not valid for this service",
                               peer=_peer_address(peer))

    def is_admin(self, metadata: Iterable[tuple[str, str | bytes]], peer: str) -> bool:
        """Whether an admitted caller may read operator detail: an admin key, or any loopback caller of a service
        with no keys configured (the machine's own operator)."""
        if not self.enabled:
            return is_local_peer(peer)
        given = given_key(metadata)
        return given is not None and known_key(given, self._admins.keys())


def given_key(metadata: Iterable[tuple[str, str | bytes]]) -> bytes | None:
    """The key of a call's `authorization: Bearer <key>` metadata, or None."""
    return bearer_key(next((v for k, v in metadata if k == "authorization"), None))


def _peer_address(peer: str) -> str:
    """"ipv4:127.0.0.1:52114" -> "127.0.0.1:52114": the address the service saw, for the caller's own debugging."""
    return peer.partition(":")[2] if peer.startswith(("ipv4:", "ipv6:")) else peer
