"""The run command as a user starts it: its own local Ray (beside the session's idle one), the API
keys in a secret (an environment variable and a file), the gateway with keys of its own, and a
graceful stop on SIGTERM in the middle of a long stream."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import psutil
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedding_client.errors import read_details
from embedding_client.v1 import embedding_pb2 as pb
from embedding_client.v1 import embedding_pb2_grpc
from embedding_service.cli import TEARDOWN_S
from embedding_service.wire.reasons import Reason
from tests.helpers.classifiers import CLASSIFIER
from tests.helpers.gateways import readiness, running_gateway
from tests.helpers.models import RERANKER, SPLADE, TINY
from tests.helpers.observe import wait_until
from tests.helpers.ports import free_port
from tests.helpers.run_command import bearer, own_environment
from tests.helpers.session import REFUSING, one_model_config
from tests.helpers.tcp_relay import relay

KEYS_ENV = "EMBEDDING_TEST_API_KEYS"
ADMIN_KEYS_ENV = "EMBEDDING_TEST_ADMIN_KEYS"
ENV_KEY, FILE_KEY, ROTATED_KEY, ADMIN_KEY = "env-key-0123", "file-key-4567", "rotated-key-89ab", "admin-key-cdef"
USER_KEY = "gateway-user-key"
# Long enough for the stream below to finish within it on a slow 2-core CPU (AVX2 only), where 30 s cut it; the
# run command exits as soon as its calls in flight are done, so a fast machine does not wait it out.
GRACE_S = 120
STREAM_INPUTS = 30_000
# The service's bound per call here: short, for a Watch to be seen outliving it in seconds.
REQUEST_TIMEOUT_S = 5
EMBED = "/embedding_service.v1.EmbedService/Embed"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class RunCommand:
    process: subprocess.Popen
    target: str
    gateway: str
    key_file: Path
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stub(self, target: str | None = None):
        return embedding_pb2_grpc.EmbedServiceStub(grpc.insecure_channel(target or self.target))


def refusal(call) -> tuple[grpc.StatusCode, object]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    err = caught.value
    return err.code(), read_details(err.trailing_metadata(), err.details() or "")


@pytest.fixture(scope="module")
def run_command(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("run-command")
    config, grpc_port = one_model_config(tiny_model_dir)
    gateway_port = free_port()
    args = config["applications"][0]["args"]
    key_file = folder / "api-keys"
    key_file.write_text(FILE_KEY + "\n")
    args["auth"] = {"api_keys_env": KEYS_ENV, "api_keys_file": str(key_file), "admin_keys_env": ADMIN_KEYS_ENV}
    args["shutdown"] = {"grace_s": GRACE_S}
    args["limits"]["request_timeout_s"] = REQUEST_TIMEOUT_S
    config_path = folder / "serve-config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = own_environment(**{KEYS_ENV: ENV_KEY, ADMIN_KEYS_ENV: ADMIN_KEY, "GATEWAY_API_KEYS": json.dumps([USER_KEY])})
    log = folder / "run.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "embedding_service", "run", "--config", str(config_path),
             "--gateway-port", str(gateway_port), "--gateway-drain-delay-s", "3"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    run = RunCommand(process, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{gateway_port}", key_file, log)

    try:
        wait_until(lambda: "OpenAI gateway:" in run.output() or process.poll() is not None, 240, "the run command")
        assert process.poll() is None, run.output()[-4000:]
        wait_until(lambda: readiness(run.gateway) == 200, 60, "the gateway ready")
        yield run
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=GRACE_S + TEARDOWN_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def test_the_grpc_api_needs_a_key_from_the_secret_and_health_needs_none(run_command, reference_models):
    stub = run_command.stub()
    channel = grpc.insecure_channel(run_command.target)
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == SERVING  # probes need no key
    request = pb.EmbedRequest(inputs=[pb.EmbedInput(text="a keyed call")])

    code, details = refusal(lambda: stub.Embed(request, timeout=30))
    assert (code, details.reason) == (grpc.StatusCode.UNAUTHENTICATED, Reason.API_KEY_MISSING.name)
    code, details = refusal(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=30))
    assert details.reason == Reason.API_KEY_MISSING.name
    code, details = refusal(lambda: next(stub.WatchNodes(pb.WatchNodesRequest(), timeout=30)))
    assert (code, details.reason) == (grpc.StatusCode.UNAUTHENTICATED, Reason.API_KEY_MISSING.name)
    code, details = refusal(lambda: stub.Embed(request, timeout=30, metadata=bearer("not-a-key")))
    assert (code, details.reason) == (grpc.StatusCode.UNAUTHENTICATED, Reason.API_KEY_INVALID.name)

    expected = reference_models[TINY].encode(["a keyed call"], normalize_embeddings=True)
    for key in (ENV_KEY, FILE_KEY):  # from the variable and from the file
        response = stub.Embed(request, timeout=30, metadata=bearer(key))
        assert np.abs(np.array(response.embeddings[0].values) - expected[0]).max() < 1e-5

    # A rotated file is read again: the new key works, the old one stops working.
    run_command.key_file.write_text(ROTATED_KEY + "\n")

    def rotated() -> bool:
        try:
            stub.Embed(request, timeout=30, metadata=bearer(ROTATED_KEY))
            return True
        except grpc.RpcError:
            return False

    wait_until(rotated, 30, "the rotated key accepted")
    code, details = refusal(lambda: stub.Embed(request, timeout=30, metadata=bearer(FILE_KEY)))
    assert details.reason == Reason.API_KEY_INVALID.name
    assert stub.Embed(request, timeout=30, metadata=bearer(ENV_KEY)).embeddings


def test_a_caller_without_a_key_costs_the_proxy_nothing_however_big_its_request(run_command):
    """The proxy checks the key before it reads the request: a 200 MiB Embed without a key is UNAUTHENTICATED, and
    the proxy's memory does not grow by the request (it grew by more than the request when the router checked)."""
    proxy = next(p for p in psutil.Process(run_command.process.pid).children(recursive=True)
                 if p.name().startswith("ray::ProxyActor"))
    body = pb.EmbedRequest(inputs=[pb.EmbedInput(text="x" * (1 << 20))] * 200).SerializeToString()
    assert len(body) > 200 << 20
    channel = grpc.insecure_channel(run_command.target, options=[("grpc.max_send_message_length", -1)])
    grpc.channel_ready_future(channel).result(timeout=30)
    baseline = proxy.memory_info().rss
    peak, done = [baseline], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proxy.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        code, details = refusal(lambda: channel.unary_unary(EMBED)(body, timeout=60))
        time.sleep(0.5)  # what the proxy would still be reading or parsing
    finally:
        done.set()
        sampler.join()
        channel.close()
    assert (code, details.reason) == (grpc.StatusCode.UNAUTHENTICATED, Reason.API_KEY_MISSING.name)
    assert peak[0] - baseline < 10 << 20, f"the proxy grew by {(peak[0] - baseline) >> 20} MiB"


def test_watchnodes_holds_no_router_slot_is_bounded_per_caller_and_shows_operator_detail_to_admins(run_command):
    stub = run_command.stub()
    calls = [stub.WatchNodes(pb.WatchNodesRequest(), timeout=60, metadata=bearer(ENV_KEY)) for _ in range(4)]
    try:
        views = [next(c) for c in calls]
        assert all(v.nodes for v in views)
        public = views[0].nodes[0]
        assert public.node_id and public.state and not public.node_ip
        # The fifth of one caller's: refused at once, the others stay open.
        code, details = refusal(lambda: next(stub.WatchNodes(pb.WatchNodesRequest(), timeout=30,
                                                             metadata=bearer(ENV_KEY))))
        assert (code, details.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.OVERLOADED.name)
        assert all(c.is_active() for c in calls)
        admin = next(stub.WatchNodes(pb.WatchNodesRequest(), timeout=30, metadata=bearer(ADMIN_KEY)))
        assert admin.nodes[0].node_ip == views[0].nodes[0].node_ip or admin.nodes[0].node_ip
        assert {n.node_id for n in admin.nodes} == {n.node_id for n in views[0].nodes}
    finally:
        for c in calls:
            c.cancel()


def test_the_run_command_listens_on_loopback_but_for_its_grpc_port(run_command):
    """Ray's node, its GCS, raylet, workers, agents and metrics, the dashboard and the gateway: loopback only. The gRPC
    proxy listens on every interface (Serve has no host option for it), its callers' keys checked."""
    grpc_port = int(run_command.target.rsplit(":", 1)[1])
    root = psutil.Process(run_command.process.pid)
    listening = {(c.laddr.ip, c.laddr.port, p.name()) for p in [root, *root.children(recursive=True)]
                 for c in _connections(p) if c.status == psutil.CONN_LISTEN}
    assert any(name == "raylet" for _, _, name in listening) and any(port == grpc_port for _, port, _ in listening)
    loopback = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
    beyond = {entry for entry in listening if entry[0] not in loopback and entry[1] != grpc_port}
    assert not beyond, f"listening beyond loopback: {sorted(beyond)}"
    printed = re.search(r"Prometheus metrics \(service, Ray Serve\): http://([0-9.]+):", run_command.output())
    assert printed and printed.group(1) == "127.0.0.1", run_command.output()[-2000:]
    assert "Ray's token authentication: on" in run_command.output()


def _connections(process: psutil.Process) -> list:
    try:
        return process.net_connections(kind="inet")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def test_the_peer_the_service_sees_is_the_callers_own_address(run_command):
    # The relay is the client here; it connects from 127.0.0.9, which no other client of this test uses.
    with relay(run_command.target, "127.0.0.9") as (address, outbound):
        code, details = refusal(lambda: run_command.stub(address).Embed(
            pb.EmbedRequest(inputs=[pb.EmbedInput(text="who am I")]), timeout=30))
    assert details.reason == Reason.API_KEY_MISSING.name
    assert outbound and details.metadata["peer"] in outbound, (details.metadata, outbound)


def test_the_gateway_has_its_own_keys_and_calls_with_its_upstream_key(run_command, reference_models):
    body = {"model": TINY, "input": ["through the gateway"], "encoding_format": "float"}
    assert httpx.post(f"{run_command.gateway}/v1/embeddings", json=body, timeout=30).status_code == 401
    wrong = httpx.post(f"{run_command.gateway}/v1/embeddings", json=body, timeout=30,
                       headers={"Authorization": f"Bearer {ENV_KEY}"})  # the service's key is not a user key
    assert wrong.status_code == 401
    ok = httpx.post(f"{run_command.gateway}/v1/embeddings", json=body, timeout=30,
                    headers={"Authorization": f"Bearer {USER_KEY}"})
    assert ok.status_code == 200, ok.text  # the run command gave the gateway an upstream key of the service
    expected = reference_models[TINY].encode(body["input"], normalize_embeddings=True)
    assert np.abs(np.array(ok.json()["data"][0]["embedding"]) - expected[0]).max() < 1e-5

    # A gateway whose upstream key the service refuses: the operator's error, not the user's (no 401).
    with running_gateway(targets=[run_command.target], upstream_api_key="stale-key") as base:
        stale = httpx.post(f"{base}/v1/embeddings", json=body, timeout=30)
    assert stale.status_code == 500 and stale.json()["error"]["code"] == "upstream_unauthorized"


def test_the_run_command_prints_its_metrics_endpoints_and_its_proxy_runs_with_the_services_options(run_command):
    printed = re.search(r"Prometheus metrics \(service, Ray Serve\): (\S+)", run_command.output())
    assert printed, run_command.output()[-2000:]
    url = printed.group(1).rstrip(",")
    assert re.fullmatch(r"http://[0-9.]+:\d+/metrics", url), url
    assert f"its metrics: {run_command.gateway}/metrics" in run_command.output()
    stub = run_command.stub()
    with pytest.raises(grpc.RpcError):
        stub.ListModels(pb.ListModelsRequest(), timeout=30)  # no key

    def counted() -> bool:  # Ray reports every 10 s by default
        text = httpx.get(url, timeout=10).text
        return 'code="UNAUTHENTICATED"' in text and "ray_embedding_requests_total" in text

    wait_until(counted, 60, "the refused call on the printed endpoint")
    assert "embedding_gateway_http_requests_total" in httpx.get(f"{run_command.gateway}/metrics", timeout=10).text
    # The run command gave its nodes the proxy's options (the preload), and the proxy says they are in force.
    in_force = [line for line in httpx.get(url, timeout=10).text.splitlines()
                if line.startswith("ray_embedding_proxy_grpc_options_in_force")]
    assert in_force and all(line.endswith(" 1.0") for line in in_force), in_force
    # Its Ray runs with token authentication (the proxy, the probes and the gateway above were called through it).
    token_auth = [line for line in httpx.get(url, timeout=10).text.splitlines()
                  if line.startswith("ray_embedding_ray_token_auth")]
    assert token_auth and all(line.endswith(" 1.0") for line in token_auth), token_auth


def test_a_watch_sends_the_status_at_once_and_stays_open_past_the_services_bound(run_command):
    """grpc.health.v1 Watch, as Kubernetes and the client library keep it open: the status at once (SERVICE_UNKNOWN
    for an unknown service, and the call stays open), nothing more while nothing changes, past the service's bound
    on a call (REQUEST_TIMEOUT_S here; Serve's own request_timeout_s, unset in serve-config.yaml, would cut it)."""
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(run_command.target))
    known = health.Watch(health_pb2.HealthCheckRequest(service=TINY))
    unknown = health.Watch(health_pb2.HealthCheckRequest(service="no-such-service"))
    assert next(known).status == SERVING
    assert next(unknown).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    received, errors = [], []

    def drain(call) -> None:
        try:
            received.extend(call)
        except grpc.RpcError as err:
            errors.append(err.code())

    threads = [threading.Thread(target=drain, args=(c,), daemon=True) for c in (known, unknown)]
    for t in threads:
        t.start()
    opened = time.monotonic()
    wait_until(lambda: time.monotonic() - opened > REQUEST_TIMEOUT_S + 2 or errors or received, 60, "the bound passed")
    assert received == [] and errors == []
    assert known.is_active() and unknown.is_active()
    # Client cancellation ends them cleanly, and the service goes on.
    known.cancel()
    unknown.cancel()
    for t in threads:
        t.join(timeout=10)
    assert errors == [grpc.StatusCode.CANCELLED] * 2
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == SERVING


def test_sigterm_lets_a_long_stream_finish_while_new_calls_are_refused(run_command):
    stub = run_command.stub()
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(run_command.target))
    texts = [f"stream sentence {i} about search ranking and retrieval" for i in range(STREAM_INPUTS)]
    request = pb.EmbedStreamRequest(inputs=[pb.EmbedInput(text=t) for t in texts],
                                    encoding=pb.VECTOR_ENCODING_FLOAT32_LE)
    seen: list[int] = []
    failure: list[grpc.RpcError] = []

    def consume() -> None:
        try:
            for chunk in stub.EmbedStream(request, timeout=300, metadata=bearer(ENV_KEY)):
                seen.extend(e.index for e in chunk.embeddings)
        except grpc.RpcError as err:
            failure.append(err)

    reader = threading.Thread(target=consume)
    reader.start()
    wait_until(lambda: len(seen) >= 2000 or failure, 120, "the stream under way")
    sent = time.monotonic()
    run_command.process.send_signal(signal.SIGTERM)

    wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == NOT_SERVING, 15,
               "health NOT_SERVING")
    code, details = refusal(lambda: stub.Embed(pb.EmbedRequest(inputs=[pb.EmbedInput(text="new")]), timeout=30,
                                              metadata=bearer(ENV_KEY)))
    assert (code, details.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.SHUTTING_DOWN.name)
    assert details.retry_after_s and details.retry_after_s > 0

    wait_until(lambda: readiness(run_command.gateway) == 503, 5, "the gateway's /readyz 503")
    in_flight_at_refusal = len(seen)
    assert in_flight_at_refusal < STREAM_INPUTS, "the stream ended before the checks; make it longer"

    reader.join(timeout=GRACE_S + 30)
    assert not failure, failure[0].details() if failure else None
    assert sorted(seen) == list(range(STREAM_INPUTS)), "every input of the stream in flight came back"
    run_command.process.wait(timeout=GRACE_S + TEARDOWN_S)
    took = time.monotonic() - sent
    output = run_command.output()
    assert "calls in flight finished" in output, output[-3000:]
    assert took <= GRACE_S + TEARDOWN_S, f"exited {took:.1f} s after SIGTERM"
    print(f"SIGTERM at {in_flight_at_refusal} of {STREAM_INPUTS} streamed; exited after {took:.1f} s")


def test_the_run_command_used_a_ray_of_its_own_and_left_the_sessions_alone(run_command, service):
    # ray.init() with no address joins the last cluster started here: the run command must not.
    assert "Started a local Ray instance" in run_command.output()
    listed = service.stub.ListModels(pb.ListModelsRequest(), timeout=60)
    assert {m.name for m in listed.models} == {"all-MiniLM-L6-v2", TINY, REFUSING, RERANKER, SPLADE, CLASSIFIER}
    assert service.stub.Embed(pb.EmbedRequest(inputs=[pb.EmbedInput(text="still here")]), timeout=60).embeddings
