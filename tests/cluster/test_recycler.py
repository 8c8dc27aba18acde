"""A GPU fault on one worker of a real multi-node Ray cluster, under client load.

The fault is injected through the model's pluggable device check (a flag file
per node, since this machine has no GPU). Everything else is real: Ray's node
drain, Serve replacing replicas, the proxy, the health Watch and the clients.
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedding_client.v1 import embedding_pb2 as pb
from tests.helpers.grpc_errors import error_info
from tests.helpers.models import MINILM, RERANKER, TINY
from tests.helpers.observe import scrape, total, wait_until
from tests.helpers.scoring import raw_scores
from tests.helpers.session import WORKER_CPUS
from tests.helpers.texts import vectors_of

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}


class Stream:
    """Collects a server stream's messages in a thread; cancel() ends it from the client side."""

    def __init__(self, call) -> None:
        self.call = call
        self.items: list = []
        self.error: grpc.RpcError | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self.call:
                self.items.append((time.monotonic(), item))
        except grpc.RpcError as err:
            self.error = err

    def cancel(self) -> None:
        self.call.cancel()
        self._thread.join(timeout=10)


class Load:
    """Clients that keep embedding on both embedding models and reranking, retrying only on retryable statuses;
    each answer checked against sentence-transformers' own on the same inputs."""

    def __init__(self, stub, reference, cross_encoder) -> None:
        self.stub = stub
        self.reference = reference
        self.cross_encoder = cross_encoder
        self.done = threading.Event()
        self.completed = 0
        self.completed_by: dict[str, int] = {}
        self.retried: list[tuple[str, grpc.StatusCode, str]] = []
        self.failed: list[str] = []
        self.wrong: list[str] = []
        self.longest = 0.0  # seconds, the longest call
        self.threads = [threading.Thread(target=self._client, args=(m, k), daemon=True)
                        for k, m in enumerate([MINILM, TINY, MINILM, TINY, RERANKER])]
        for t in self.threads:
            t.start()

    def _ask(self, model: str, texts: list[str]) -> str | None:
        """One call; what was wrong with its answer, or None."""
        if model == RERANKER:
            reply = self.stub.Rerank(pb.RerankRequest(model=model, query=texts[0], documents=texts[1:]), timeout=60)
            expected = raw_scores(self.cross_encoder, texts[0], texts[1:])
            got = np.array([score for _, score in sorted((r.index, r.score) for r in reply.results)])
            return None if len(got) == len(expected) and np.abs(got - expected).max() < 1e-5 else model
        response = self.stub.Embed(pb.EmbedRequest(model=model, inputs=[pb.EmbedInput(text=t) for t in texts]),
                                   timeout=60)
        expected = self.reference[model].encode(texts, normalize_embeddings=True)
        return None if np.abs(vectors_of(response) - expected).max() < 1e-5 else model

    def _client(self, model: str, k: int) -> None:
        n = 0
        while not self.done.is_set():
            texts = [f"client {k} request {n} sentence {i}" for i in range(8)]
            for _attempt in range(30):
                started = time.monotonic()
                try:
                    wrong = self._ask(model, texts)
                except grpc.RpcError as err:
                    if err.code() in RETRYABLE:
                        self.retried.append((model, err.code(), error_info(err).reason))
                        time.sleep(0.2)
                        continue
                    self.failed.append(f"{model}: {err.code()} {err.details()}")
                    break
                finally:
                    self.longest = max(self.longest, time.monotonic() - started)
                if wrong:
                    self.wrong.append(wrong)
                self.completed += 1
                self.completed_by[model] = self.completed_by.get(model, 0) + 1
                break
            else:
                self.failed.append(f"{model}: still failing after 30 retries")
            n += 1
            time.sleep(0.05)

    def stop(self) -> None:
        self.done.set()
        for t in self.threads:
            t.join(timeout=120)


class GaugeSampler:
    """Scrapes the service's metrics in the background: a gauge shows a state only while it lasts."""

    def __init__(self) -> None:
        self.unhealthy_nodes: list[float] = []  # quarantined + draining
        self.tiny_serving: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                samples = scrape()
            except Exception:  # a node leaving mid-scrape
                continue
            self.unhealthy_nodes.append(total("ray_embedding_nodes", samples, state="quarantined")
                                        + total("ray_embedding_nodes", samples, state="draining"))
            self.tiny_serving.append(total("ray_embedding_health_serving", samples, service=TINY))
            self._stop.wait(0.5)  # the states it must catch last seconds

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def latest_nodes(stream: Stream):
    return stream.items[-1][1].nodes if stream.items else []


def node_of(stream: Stream, model: str) -> set[str]:
    return {n.node_id for n in latest_nodes(stream) if n.state == pb.NODE_STATE_HEALTHY
            for r in n.replicas if r.model == model}


def test_cuda_fault_quarantines_drains_and_recycles_the_node_without_losing_requests(service, reference_models,
                                                                                   cross_encoder, capacity_restored):
    stub = service.stub
    health = health_pb2_grpc.HealthStub(service.channel)
    nodes = Stream(stub.WatchNodes(pb.WatchNodesRequest()))
    capacity_restored.append(nodes.cancel)
    wait_until(lambda: len(node_of(nodes, MINILM)) >= 1 and len(node_of(nodes, TINY)) == 1
               and len(node_of(nodes, RERANKER)) == 1, 60, "replicas registered")
    (victim,) = node_of(nodes, TINY)
    head = ray.get_runtime_context().get_node_id()
    assert victim != head
    # The one-replica models the fault takes away for a while: the tiny embedding model, and the reranker when
    # Serve placed it there too (Serve chooses; the test reports which).
    moved = [m for m in (TINY, RERANKER) if node_of(nodes, m) == {victim}]

    watches = {m: Stream(health.Watch(health_pb2.HealthCheckRequest(service=m))) for m in moved}
    whole_watch = Stream(health.Watch(health_pb2.HealthCheckRequest(service="")))
    capacity_restored += [w.cancel for w in (*watches.values(), whole_watch)]
    wait_until(lambda: all(w.items for w in (*watches.values(), whole_watch)), 30, "first Watch messages")
    assert all(w.items[0][1].status == SERVING for w in (*watches.values(), whole_watch))

    load = Load(stub, reference_models, cross_encoder)
    capacity_restored.append(load.stop)
    wait_until(lambda: load.completed >= 8, 60, "load under way")
    before = scrape()
    gauges = GaugeSampler()
    capacity_restored.append(gauges.stop)
    # Written whole, then named as the check looks for it: a check between the file's creation and its text read an
    # empty file once and reported "injected fault".
    pending = service.fault_dir / f".{victim}.pending"
    pending.write_text("CUDA error: an illegal memory access was encountered (injected)")
    pending.replace(service.fault_dir / victim)

    def state(node_id):
        return next((n.state for n in latest_nodes(nodes) if n.node_id == node_id), None)

    def track(target):
        return state(victim) == target

    wait_until(lambda: state(victim) in (pb.NODE_STATE_QUARANTINED, pb.NODE_STATE_DRAINING), 30, "quarantine")
    quarantined = next(n for n in latest_nodes(nodes) if n.node_id == victim)
    assert "illegal memory access" in quarantined.reason
    wait_until(lambda: track(pb.NODE_STATE_DRAINING), 30, "drain")
    # Serve brings the moved models back on the healthy worker (the drained one takes no new replicas).
    for m in moved:
        wait_until(lambda m=m: node_of(nodes, m) and victim not in node_of(nodes, m), 180, f"{m} replica elsewhere")

    # The node leaves: by itself once drained, else the infrastructure (here the test) removes it.
    victim_handle = next(n for n in service.cluster.worker_nodes if n.node_id == victim)
    try:
        wait_until(lambda: not any(n["NodeID"] == victim and n["Alive"] for n in ray.nodes()), 20, "node exit")
    except TimeoutError:
        service.cluster.remove_node(victim_handle)
    wait_until(lambda: track(pb.NODE_STATE_RECYCLED), 60, "recycled")
    # The operators' stream told every step, in order.
    history = []
    for _, view in nodes.items:
        current = next((n.state for n in view.nodes if n.node_id == victim), None)
        if current is not None and (not history or history[-1] != current):
            history.append(current)
    assert history == [pb.NODE_STATE_HEALTHY, pb.NODE_STATE_QUARANTINED, pb.NODE_STATE_DRAINING, pb.NODE_STATE_RECYCLED], history

    for m, watch in watches.items():
        wait_until(lambda w=watch: w.items[-1][1].status == SERVING and len(w.items) >= 3, 60,
                   f"{m} Watch back to SERVING")
    served = dict(load.completed_by)
    wait_until(lambda: all(load.completed_by.get(m, 0) >= served.get(m, 0) + 2 for m in (MINILM, TINY, RERANKER)),
               60, "calls of every model served after the recovery")
    load.stop()
    longest_gap = {m: round(w.items[2][0] - w.items[1][0], 1) for m, w in watches.items()}
    print(f"moved with the node: {moved}, NOT_SERVING for {longest_gap} s; longest call {load.longest:.1f} s; "
          f"{len(load.retried)} calls retried {sorted(set(load.retried))}; {load.completed_by} served")

    for m, watch in watches.items():
        statuses = [item.status for _, item in watch.items]
        assert statuses[:3] == [SERVING, NOT_SERVING, SERVING], (m, statuses)
        assert all(a != b for a, b in zip(statuses, statuses[1:])), "one message per change"
    assert all(item.status == SERVING for _, item in whole_watch.items), "another model kept the service up"
    assert not load.failed, load.failed
    assert not load.wrong, load.wrong
    assert load.completed > 20
    # A call that waited its whole bound while its model had no serving replica is told to retry, and why.
    assert {(code, reason) for _, code, reason in load.retried} <= {
        (grpc.StatusCode.UNAVAILABLE, "MODEL_UNAVAILABLE"), (grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED")}, load.retried
    assert stub.Embed(pb.EmbedRequest(model=TINY, inputs=[pb.EmbedInput(text="after")]), timeout=60).embeddings

    # The metrics told the same story: the node left the healthy count and the tiny model's health
    # gauge went to 0 and back; one fault (by its reason's head), one drain started and finished.
    def delta(name: str, samples: list | None = None, **labels: str) -> float:
        return total(name, samples, **labels) - total(name, before, **labels)

    wait_until(lambda: delta("ray_embedding_node_drains_finished_total") >= 1 and gauges.tiny_serving
               and gauges.tiny_serving[-1] == 1, 30, "the recycler's metrics reported")
    gauges.stop()
    after = scrape()
    assert total("ray_embedding_nodes", before, state="quarantined") == 0
    assert total("ray_embedding_health_serving", before, service=TINY) == 1
    assert max(gauges.unhealthy_nodes) >= 1, gauges.unhealthy_nodes
    assert min(gauges.tiny_serving) == 0, gauges.tiny_serving
    assert delta("ray_embedding_node_faults_total", after, reason="CUDA error") >= 1
    assert delta("ray_embedding_node_drains_started_total", after, action="drain") == 1
    assert delta("ray_embedding_node_drains_finished_total", after) == 1
    assert total("ray_embedding_nodes", after, state="recycled") >= 1

    # Capacity comes back: a new worker is tracked afresh, healthy.
    (service.fault_dir / victim).unlink()
    added = service.cluster.add_node(num_cpus=WORKER_CPUS)
    wait_until(lambda: state(added.node_id) == pb.NODE_STATE_HEALTHY, 60, "new node tracked")

    for stream in (*watches.values(), whole_watch, nodes):
        stream.cancel()
        assert stream.error is None or stream.error.code() == grpc.StatusCode.CANCELLED
