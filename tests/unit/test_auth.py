"""Who may call: keys from a secret (variable or file, rotated), or loopback only. End to end: test_run_command.py."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from embedding_service.config import AuthSettings
from embedding_service.wire import auth
from embedding_service.wire.auth import Authenticator, is_local_peer, parse_keys, peer_host
from embedding_service.wire.reasons import Reason, ServiceError

LOCAL = "ipv4:127.0.0.1:50111"
REMOTE = "ipv4:10.1.2.3:50111"


def refused(check) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        check()
    return caught.value


@pytest.mark.parametrize("peer, local", [
    ("ipv4:127.0.0.1:5000", True),
    ("ipv4:127.9.9.9:5000", True),
    ("ipv6:[::1]:5000", True),
    ("ipv6:[::ffff:127.0.0.1]:5000", True),
    ("unix:/tmp/grpc.sock", True),
    ("ipv4:10.0.0.5:5000", False),
    ("ipv4:192.168.1.7:5000", False),
    ("ipv6:[2001:db8::1]:5000", False),
    ("ipv6:[fe80::1%eth0]:5000", False),
    ("", False),
    ("garbage", False),
])
def test_loopback_peers_are_told_apart(peer, local):
    assert is_local_peer(peer) is local


def test_peer_strings_and_key_lists_parse():
    assert peer_host("ipv4:127.0.0.1:5000") == "127.0.0.1" and peer_host("ipv6:[::1]:5000") == "::1"
    assert parse_keys(" a, b\n\nc ,") == (b"a", b"b", b"c")


def test_without_keys_only_loopback_callers_are_served():
    gate = Authenticator(AuthSettings(), environ={})
    assert not gate.enabled
    gate.check([], LOCAL)
    gate.check([], "ipv6:[::1]:7")
    error = refused(lambda: gate.check([("authorization", "Bearer anything")], REMOTE))
    assert error.reason == Reason.LOOPBACK_ONLY and error.code.name == "UNAUTHENTICATED"
    assert error.metadata["peer"] == "10.1.2.3:50111"  # the address the service saw, for the caller


def test_keys_from_the_environment_are_required_of_every_caller():
    gate = Authenticator(AuthSettings(api_keys_env="KEYS"), environ={"KEYS": "k-one, k-two"})
    gate.check([("authorization", "Bearer k-two")], REMOTE)
    gate.check([("authorization", b"bearer k-one")], LOCAL)
    for metadata, reason in [
        ([], Reason.API_KEY_MISSING),
        ([("authorization", "Basic k-one")], Reason.API_KEY_MISSING),
        ([("authorization", "Bearer ")], Reason.API_KEY_MISSING),
        ([("authorization", "Bearer k-three")], Reason.API_KEY_INVALID),
        ([("authorization", "Bearer k-one2")], Reason.API_KEY_INVALID),
        ([("x-api-key", "k-one")], Reason.API_KEY_MISSING),
    ]:
        error = refused(lambda m=metadata: gate.check(m, LOCAL))  # loopback too, once keys exist
        assert error.reason == reason, metadata
        assert error.metadata["peer"] == "127.0.0.1:50111"
        assert "k-one" not in error.message


def test_a_key_file_is_read_and_re_read_when_it_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "FILE_CHECK_S", 0.0)
    path = tmp_path / "keys"
    path.write_text("first-key\n")
    gate = Authenticator(AuthSettings(api_keys_file=str(path)), environ={})
    gate.check([("authorization", "Bearer first-key")], REMOTE)
    path.write_text("second-key\nthird-key\n")  # rotated (the size changes with it)
    gate.check([("authorization", "Bearer third-key")], REMOTE)
    assert refused(lambda: gate.check([("authorization", "Bearer first-key")], REMOTE)).reason == Reason.API_KEY_INVALID
    path.unlink()  # a secret gone: nobody gets in, rather than everybody
    assert refused(lambda: gate.check([("authorization", "Bearer third-key")], REMOTE)).reason == Reason.API_KEY_INVALID


def test_a_key_rewritten_with_its_size_and_mtime_kept_is_revoked_after_the_check_interval(tmp_path, monkeypatch):
    """A same-length key written over the old one with the old mtime put back (os.utime, `cp -p`, a restored
    backup): the file's content decides, within the one check interval, not its stat."""
    now = [0.0]
    monkeypatch.setattr(auth, "time", SimpleNamespace(monotonic=lambda: now[0]))
    path = tmp_path / "keys"
    path.write_text("key-aaaa\n")
    gate = Authenticator(AuthSettings(api_keys_file=str(path)), environ={})
    gate.check([("authorization", "Bearer key-aaaa")], REMOTE)
    before = os.stat(path)
    path.write_text("key-bbbb\n")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
    gate.check([("authorization", "Bearer key-aaaa")], REMOTE)  # within the interval: not read again yet
    now[0] += auth.FILE_CHECK_S
    assert refused(lambda: gate.check([("authorization", "Bearer key-aaaa")], REMOTE)).reason == Reason.API_KEY_INVALID
    gate.check([("authorization", "Bearer key-bbbb")], REMOTE)


def test_a_named_secret_that_holds_no_key_stops_the_start(tmp_path):
    with pytest.raises(ValueError, match="EMPTY_KEYS"):
        Authenticator(AuthSettings(api_keys_env="EMPTY_KEYS"), environ={"EMPTY_KEYS": " , "})
    with pytest.raises(ValueError, match="no API key"):
        Authenticator(AuthSettings(api_keys_file=str(tmp_path / "missing")), environ={})


def test_a_named_variable_that_is_not_set_serves_loopback_only():
    """The shipped config names EMBEDDING_API_KEYS for Kubernetes (a Secret sets it); `run` on a laptop has none."""
    gate = Authenticator(AuthSettings(api_keys_env="EMBEDDING_API_KEYS"), environ={})
    assert not gate.enabled
    gate.check([], "ipv4:127.0.0.1:5000")
    error = refused(lambda: gate.check([("authorization", "Bearer anything")], REMOTE))
    assert error.reason == Reason.LOOPBACK_ONLY and "EMBEDDING_API_KEYS is not set" in error.message
