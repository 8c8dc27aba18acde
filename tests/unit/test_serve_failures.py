"""Serve's and Ray's own failures read as the service's (wire/serve_failures.py), as the proxy and the router
meet them: a bare status Serve's proxy set, an exception a handle call raised."""

from __future__ import annotations

import grpc
import pytest
import ray
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from embedding_client.errors import RETRYABLE_CODES, STATUS_DETAILS_KEY
from embedding_service.wire import serve_failures, status
from embedding_service.wire.messages import ReplicaRefused
from embedding_service.wire.reasons import Reason, ServiceError

LOST = "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task."


@pytest.mark.parametrize("code, reason", [
    (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.OVERLOADED),  # Serve's queue full
    (grpc.StatusCode.UNAVAILABLE, Reason.SERVICE_UNAVAILABLE),  # no router replica
    (grpc.StatusCode.INTERNAL, Reason.SERVICE_UNAVAILABLE),  # a router lost past the resends
    (grpc.StatusCode.UNKNOWN, Reason.SERVICE_UNAVAILABLE),
])
def test_a_bare_status_of_serves_gets_the_services_reason_and_a_retry_delay(code, reason):
    for details in (LOST, LOST.encode(), None):
        error = serve_failures.serve_status_error(code, details, ())
        assert error.reason == reason and error.code in RETRYABLE_CODES and error.retry_after_s
        assert "ray.exceptions" not in error.message


def test_the_routers_own_status_and_success_are_left_as_they_are():
    routers = ServiceError(Reason.MODEL_UNAVAILABLE, "no replica")
    trailers = ((STATUS_DETAILS_KEY, routers.status_bytes()),)
    assert serve_failures.serve_status_error(routers.code, routers.message, trailers) is None
    # A failed stream's trailers are dropped by Serve: the reason leads its message.
    bug = ServiceError(Reason.INTERNAL, "a bug")
    assert serve_failures.serve_status_error(bug.code, bug.stream_details(), ()) is None
    assert serve_failures.serve_status_error(None, None, ()) is None
    assert serve_failures.serve_status_error(grpc.StatusCode.OK, "", ()) is None
    assert serve_failures.serve_status_error(grpc.StatusCode.INVALID_ARGUMENT, "bad", ()) is None


def test_serves_handler_raising_is_retryable_not_unknown():
    error = serve_failures.serve_raised_error()
    assert error.reason == Reason.SERVICE_UNAVAILABLE and error.code == grpc.StatusCode.UNAVAILABLE


def test_only_a_bare_internal_status_is_a_lost_router():
    assert serve_failures.router_lost(grpc.StatusCode.INTERNAL, LOST, ())
    assert serve_failures.router_lost(grpc.StatusCode.INTERNAL, LOST.encode(), ())
    bug = ServiceError(Reason.INTERNAL, "a bug")
    assert not serve_failures.router_lost(bug.code, bug.stream_details(), ())  # the router answered: not resent
    assert not serve_failures.router_lost(bug.code, bug.message, ((STATUS_DETAILS_KEY, bug.status_bytes()),))
    assert not serve_failures.router_lost(grpc.StatusCode.UNAVAILABLE, "", ())
    assert not serve_failures.router_lost(None, None, ())


def test_serves_exceptions_in_a_handle_call_get_the_services_reasons():
    full = BackPressureError(num_queued_requests=3, max_queued_requests=3)
    none = DeploymentUnavailableError(DeploymentID(name="model-m", app_name="embedding"))
    assert serve_failures.serve_exception_error(full).reason == Reason.OVERLOADED
    assert serve_failures.serve_exception_error(none).reason == Reason.MODEL_UNAVAILABLE
    assert serve_failures.serve_exception_error(ValueError("x")) is None
    # The router's edge reads them here too.
    assert status.classify(full).reason == Reason.OVERLOADED
    assert status.classify(none).reason == Reason.MODEL_UNAVAILABLE
    assert status.classify(ValueError("x")).reason == Reason.INTERNAL


def test_a_replica_gone_is_sent_again_and_a_bad_request_is_not():
    refused = ray.exceptions.RayTaskError("embed", "traceback", ReplicaRefused("draining")).as_instanceof_cause()
    assert serve_failures.replica_gone(refused) and serve_failures.cause_label(refused) == "ReplicaRefused"
    assert serve_failures.replica_gone(ray.exceptions.ActorUnavailableError("gone", b"\x00" * 16))
    bad = ray.exceptions.RayTaskError("embed", "traceback", ValueError("bad input")).as_instanceof_cause()
    assert not serve_failures.replica_gone(bad) and not serve_failures.replica_gone(ValueError("bad input"))
    assert serve_failures.cause_label(ValueError("x")) == "ValueError"
