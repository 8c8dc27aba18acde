"""Routers that go away with calls in flight lose none of them. A router replica that dies (killed here, as
Serve kills one that outlives its grace in an upgrade, or as a failing node takes it) has its calls sent on
by the proxy to the router Serve starts in its place: an EmbedStream with only the inputs not yet returned.
And Serve replacing every replica (an upgrade: `serve.run` rolls all deployments) under load: the old router
and model replicas stop with calls in flight, and those calls finish; callers see answers or retryable
refusals with a retry hint, never a lost call. A one-replica model has no replica while its successor loads
(longer than the service's bound on a loaded machine): its calls wait, and are answered at the latest at their
deadline, with the service's reason. Runs last: it replaces the session's replicas."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedding_client.errors import RETRYABLE_CODES, read_details
from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.ops import launcher
from tests.helpers.models import MINILM, TINY
from tests.helpers.observe import total, wait_until
from tests.helpers.replicas import replica_actors, wait_healthy
from tests.helpers.session import REQUEST_TIMEOUT_S
from tests.helpers.texts import make_texts, text_inputs, vectors_of

# and Serve's proxy holds a call while no router is up (12-15 s measured with one core kept busy).
DEADLINE_SLACK_S = 20


def replica_ids() -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_REPLICA::")}


def routers() -> set[str]:
    return {name for name in replica_ids() if "#EmbedRouter#" in name}


def test_a_router_killed_mid_call_loses_neither_its_stream_nor_its_calls(service, reference_models):
    (router,) = replica_actors("EmbedRouter")
    texts = make_texts(1500, seed=67, max_words=20)
    seen: list = []
    errors: list = []
    calls: list = []

    def stream() -> None:
        try:
            request = pb.EmbedStreamRequest(inputs=text_inputs(texts), encoding=pb.VECTOR_ENCODING_FLOAT32_LE)
            for chunk in service.stub.EmbedStream(request, timeout=300):
                seen.extend((e.index, np.frombuffer(e.float32_le, "<f4")) for e in chunk.embeddings)
        except grpc.RpcError as err:
            errors.append(f"stream: {err.code()}: {err.details()}")

    def embed(k: int) -> None:
        batch = [f"a call through a dying router {k} {i}" for i in range(40)]
        try:
            response = service.stub.Embed(pb.EmbedRequest(inputs=text_inputs(batch)), timeout=300)
            calls.append(np.abs(vectors_of(response) - reference_models[MINILM].encode(batch, normalize_embeddings=True)).max())
        except grpc.RpcError as err:
            errors.append(f"Embed: {err.code()}: {err.details()}")

    threads = [threading.Thread(target=stream)] + [threading.Thread(target=embed, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: len(seen) >= 64, 60, "the stream under way")
    returned_before = len(seen)
    ray.kill(ray.get_actor(router["name"], namespace=router["namespace"]), no_restart=True)
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert returned_before < len(texts), "the stream ended before its router was killed; make it longer"
    assert sorted(i for i, _ in seen) == list(range(len(texts))), "every input once, under its own index"
    expected = reference_models[MINILM].encode(texts, normalize_embeddings=True)
    assert max(float(np.abs(v - expected[i]).max()) for i, v in seen) < 1e-5
    assert len(calls) == 4 and max(calls) < 1e-5
    assert replica_actors("EmbedRouter") != [router], "Serve replaced the killed router"
    wait_until(lambda: total("ray_embedding_proxy_calls_resent_total", method="EmbedStream") >= 1, 30,
               "the resend counted")
    print(f"router killed at {returned_before} of {len(texts)} streamed; the proxy sent the rest to its successor")
    wait_healthy()
    health = health_pb2_grpc.HealthStub(service.channel)
    wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
               == health_pb2.HealthCheckResponse.SERVING, 60, "health SERVING after the router's replacement")


def test_an_upgrade_under_load_finishes_calls_in_flight_and_loses_none(service, reference_models):
    before = replica_ids()
    stream_texts = make_texts(2400, seed=61, max_words=20)
    stream_seen: list[int] = []
    stream_error: list = []
    done = threading.Event()
    served: list[str] = []
    refused: list[tuple[str, str | None, float | None]] = []
    failed: list[str] = []
    timed_out: list[float] = []

    def stream() -> None:
        try:
            request = pb.EmbedStreamRequest(inputs=text_inputs(stream_texts), encoding=pb.VECTOR_ENCODING_FLOAT32_LE)
            for chunk in service.stub.EmbedStream(request, timeout=300):
                stream_seen.extend(e.index for e in chunk.embeddings)
        except grpc.RpcError as err:
            stream_error.append(f"{err.code()}: {err.details()}")

    def load(model: str) -> None:
        n = 0
        while not done.is_set():
            texts = [f"{model} upgrade call {n} part {i}" for i in range(4)]
            started = time.monotonic()
            try:
                response = service.stub.Embed(pb.EmbedRequest(model=model, inputs=text_inputs(texts)), timeout=120)
                expected = reference_models[model].encode(texts, normalize_embeddings=True)
                served.append(model if np.abs(vectors_of(response) - expected).max() < 1e-5 else "WRONG")
            except grpc.RpcError as err:
                details = read_details(err.trailing_metadata(), err.details() or "")
                took = time.monotonic() - started
                if err.code() in RETRYABLE_CODES:
                    refused.append((err.code().name, details.reason, details.retry_after_s))
                    time.sleep(details.retry_after_s or 0.5)
                elif (model == TINY and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and details.reason == "TIMEOUT"
                      and took < REQUEST_TIMEOUT_S + DEADLINE_SLACK_S):
                    # One replica: Serve stops it as its successor starts, and on a loaded machine the successor
                    # can take longer than the service's bound to load. The call waits; at its deadline it is
                    # MODEL_UNAVAILABLE (retried above) while the router's view shows no serving replica, TIMEOUT
                    # when the successor had just registered.
                    timed_out.append(took)
                else:
                    failed.append(f"{model} sent at {time.strftime('%H:%M:%S', time.localtime(time.time() - took))}, "
                                  f"answered after {took:.1f} s: {err.code()}: {err.details()}")
            n += 1

    streamer = threading.Thread(target=stream)
    clients = [threading.Thread(target=load, args=(m,)) for m in (MINILM, TINY)]
    for c in clients:
        c.start()
    streamer.start()
    wait_until(lambda: len(stream_seen) >= 64 and len(served) >= 4, 60, "the stream and the load under way")

    # Watched from a thread while this one runs the upgrade (serve.run again: every replica rolls; Serve
    # stops a deployment's only replica as its successor starts). Through Ray's actor names: serve.status()
    # beside serve.run races in cloudpickle's process-wide registry (Ray's, not ours).
    streamed_when_stopping: list[int] = []
    old_routers = routers()

    def watch_router() -> None:
        deadline = time.monotonic() + 120
        while not streamed_when_stopping and time.monotonic() < deadline:
            if routers() - old_routers:
                streamed_when_stopping.append(len(stream_seen))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch_router)
    watcher.start()
    launcher.start(service.config, address=service.cluster.address)
    watcher.join(timeout=130)
    assert streamed_when_stopping, "Serve never stopped the old router"
    wait_healthy()
    after = replica_ids()
    streamer.join(timeout=300)
    served_after_upgrade = len(served)
    wait_until(lambda: len(served) >= served_after_upgrade + 4, 60, "calls served by the new replicas")
    done.set()
    for c in clients:
        c.join(timeout=120)

    assert not before & after, "Serve replaced every replica"
    assert not stream_error, stream_error
    assert sorted(stream_seen) == list(range(len(stream_texts))), "the stream in flight through the upgrade finished"
    assert streamed_when_stopping[0] < len(stream_texts), "the stream ended before Serve stopped its router"
    assert not failed, failed
    assert "WRONG" not in served
    assert all(reason and delay for _, reason, delay in refused), refused  # refusals say why and when to retry
    print(f"upgrade under load: {len(served)} calls served, {len(refused)} refused retryably {set(refused)}, "
          f"{len(timed_out)} {TINY} calls answered at their deadline {[round(t, 1) for t in timed_out]}; "
          f"the stream had {streamed_when_stopping[0]} of {len(stream_texts)} when Serve began stopping its router")
    health = health_pb2_grpc.HealthStub(service.channel)
    wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
               == health_pb2.HealthCheckResponse.SERVING, 60, "health SERVING after the upgrade")
