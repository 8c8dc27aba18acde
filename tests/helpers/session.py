"""The cluster tier's service: one real Ray cluster on this machine (a head, two workers and two nodes for batch
jobs) running the service from serve-config.yaml with the tests' overrides (free ports, the packaged
all-MiniLM-L6-v2 and a tiny random-weight BERT of another dimension, a tiny reranker, SPLADE model and classifier,
small bounds a test can reach), and how to start and stop it.
tests/cluster/conftest.py makes it a session fixture."""

from __future__ import annotations

import contextlib
import os
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path

import grpc

from benchmarks.otlp_sink import OtlpSink
from benchmarks.proc_cpu import cmdline
from embedding_service.config import HEAD_RESOURCE
from embedding_service.ops import ray_internals, servefile
from embedding_service.ops.servefile import ServeFile  # imports no Ray
from tests.helpers.classifiers import CLASSIFIER
from tests.helpers.models import RERANKER, SPLADE, TINY
from tests.helpers.ports import free_port

# Its replica refuses to serve: bf16 cannot reach the gate this config sets (mean cosine 1.0).
REFUSING = "tiny-bert-refusing"
# Small enough for tests to pass it, big enough for every sparse vector of the tiny SPLADE model's to be cut.
MAX_SPARSE_TERMS = 4096
# Low enough for the client's splitting of a big rerank to be tried in seconds.
MAX_DOCUMENTS_PER_RERANK = 200
# Truncation WINDOWS for the tiny model: windows smaller than the model takes, few of them.
TINY_WINDOWS = {"window_tokens": 20, "overlap_tokens": 6, "max_windows": 6}
MAX_REQUEST_BYTES = 4 * 1024 * 1024
HEAD = {HEAD_RESOURCE: 0.001}
# The service's bound per call. Past the 17-25 s that Serve leaves a one-replica deployment (the tiny model) without a
# replica while it rolls it on these 2 cores (test_upgrade): at 20 s, calls waiting through that gap timed out.
REQUEST_TIMEOUT_S = 45
WORKER_CPUS = 2
# The refusing, reranking and sparse models' share: every replica of the session (2 x 0.5 + 0.5 + 3 x 0.1) fits on
# one worker, so the recycler test's surviving worker takes all that its drained one held.
SMALL_CPUS = 0.1
ROUTER_ONGOING = 64
ROUTER_QUEUED = 64
NODE_WATCHERS = 512
# Calls a proxy holds waiting to leave merged: small enough for a test to fill, more than the tests' 96 concurrent
# callers.
PROXY_MAX_QUEUED_CALLS = 256
# The batch jobs' node group: BATCH_NODES nodes without CPUs (no replica lands there, so losing one costs the online
# service nothing) that declare it, each taking BATCH_SLOTS of the jobs' model actors at once. Started with the
# session: a node added to the running session was seen killed by itself seconds or minutes later (docs/testing.md).
BATCH_RESOURCE = "embedding_batch"
BATCH_SLOTS = 4
BATCH_NODES = 2
MAX_RUNNING_JOBS_PER_KEY = 2
# Ray reports metrics every 10 s by default; the tests scrape sooner.
METRICS_REPORT_MS = 500


def make_test_config(tiny_model_dir: Path, fault_dir: Path, otlp_endpoint: str | None = None,
                     scoring_dirs: dict[str, Path] | None = None) -> ServeFile:
    config = servefile.read()
    config["http_options"]["port"] = free_port()
    config["grpc_options"]["port"] = free_port()
    args = config["applications"][0]["args"]
    minilm = args["models"][0]
    minilm.update(num_replicas=2, num_cpus=0.5, threads=1)  # two replicas share 2 cores
    args["models"].append(
        {
            "name": TINY,
            "path": str(tiny_model_dir),
            "device": "cpu",
            "backend": "torch",  # MiniLM runs the shipped default (auto: OpenVINO on CPU), this one torch
            "num_replicas": 1,
            "num_cpus": 0.5,
            "long_inputs": TINY_WINDOWS,  # MiniLM keeps the defaults
        }
    )
    from sentence_transformers import SentenceTransformer

    from embedding_service.model import calibration

    # Its fp32 reference made once here, not again by every replica start (the upgrade test restarts it).
    reference = fault_dir.parent / "tiny-bert-calibration.npz"
    model = SentenceTransformer(str(tiny_model_dir), device="cpu")
    calibration.save(calibration.compute(model), reference)
    args["models"].append(
        {"name": REFUSING, "path": str(tiny_model_dir), "device": "cpu", "backend": "torch", "precision": "bf16",
         "accuracy_gate": {"min_mean_cosine": 1.0}, "calibration": str(reference), "num_replicas": 1,
         "num_cpus": SMALL_CPUS}
    )
    for name, kind in ((RERANKER, "rerank"), (SPLADE, "sparse"), (CLASSIFIER, "classify")):
        if scoring_dirs:
            args["models"].append({"name": name, "kind": kind, "path": str(scoring_dirs[name]), "device": "cpu",
                                   "num_replicas": 1, "num_cpus": SMALL_CPUS, "threads": 1})
    args["limits"].update(max_sparse_terms=MAX_SPARSE_TERMS, max_documents_per_rerank=MAX_DOCUMENTS_PER_RERANK)
    # Queue bounds a burst test can exceed in seconds (64 in flight, as the benchmark's W3, still fit).
    args["router"].update(shard_retries=5, retry_backoff_s=0.2, resources=HEAD,
                          max_ongoing_requests=ROUTER_ONGOING, max_queued_requests=ROUTER_QUEUED)
    # Every caller here is one (loopback, no keys): room for test_health's watchers of WatchNodes.
    args["proxy"] = {"max_queued_calls": PROXY_MAX_QUEUED_CALLS, "max_node_watchers": NODE_WATCHERS,
                     "max_node_watchers_per_caller": NODE_WATCHERS}
    args["limits"]["max_request_bytes"] = MAX_REQUEST_BYTES
    args["limits"]["request_timeout_s"] = REQUEST_TIMEOUT_S
    args["recycler"].update(tick_s=0.5, heartbeat_s=2, replica_ttl_s=5, grace_cycles=1)
    for model in args["models"]:
        model.update(
            gpu_check="embedding_service.fleet.gpu_checks:fault_file_check",
            gpu_check_args={"directory": str(fault_dir)},
            health_check_period_s=1,
        )
    if otlp_endpoint:  # traces to the test's collector, sent within 0.2 s (the SDK's standard setting)
        args["tracing"] = {"otlp_endpoint": otlp_endpoint}
        config["applications"][0]["runtime_env"]["env_vars"]["OTEL_BSP_SCHEDULE_DELAY"] = "200"
    # Batch jobs: files and outputs under the session's temporary folder; one actor per job's pool, on the jobs' own
    # nodes (BATCH_RESOURCE).
    args["jobs"] = {"storage_root": str(fault_dir.parent / "jobs"),
                    "dataset_roots": [str(fault_dir.parent / "datasets")], "num_cpus_per_actor": 0,
                    "actor_resources": {BATCH_RESOURCE: 1}, "min_actors": 1, "max_actors": 1, "rows_per_batch": 64,
                    "block_bytes": 256 * 1024, "poll_s": 0.5,
                    "limits": {"max_running_jobs_per_key": MAX_RUNNING_JOBS_PER_KEY}}
    # One proxy: proxies on several nodes of one machine would share the port.
    config["proxy_location"] = "HeadOnly"
    return ServeFile.parse(config)


@dataclass
class Service:
    target: str
    channel: grpc.Channel
    config: ServeFile
    cluster: object  # ray.cluster_utils.Cluster
    fault_dir: Path
    traces: OtlpSink  # the spans the service exported

    @property
    def stub(self):
        from embedding_client.v1 import embedding_pb2_grpc

        return embedding_pb2_grpc.EmbedServiceStub(self.channel)


def start_cluster():
    """A head (no CPUs: the proxy, router and recycler go there by resource), two workers and the batch jobs' nodes
    (BATCH_NODES). Ray's own start of a
    node timed out once on a loaded 2-core machine (its raylet registered with the GCS; the driver's wait for it
    never saw it): a second try, once every process of the first is stopped."""
    from ray.cluster_utils import Cluster

    for attempt in (1, 2):
        cluster = Cluster()
        try:
            cluster.add_node(num_cpus=0, include_dashboard=False, resources={HEAD_RESOURCE: 1},
                             **ray_internals.metrics_report_interval(METRICS_REPORT_MS))
            for _ in range(2):
                cluster.add_node(num_cpus=WORKER_CPUS)
            for _ in range(BATCH_NODES):
                cluster.add_node(num_cpus=0, resources={BATCH_RESOURCE: BATCH_SLOTS})
            cluster.wait_for_nodes()
            return cluster
        except Exception as exc:
            if attempt == 2:
                raise
            warnings.warn(f"Ray's cluster failed to start ({exc}); starting it again", stacklevel=1)
            # The session just made, head or not, in Ray's temp folder (RAY_TMPDIR, else TMPDIR, else /tmp).
            temp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
            session = (Path(temp) / "ray" / "session_latest").resolve()
            cluster.shutdown()
            stop_session(session)
    raise AssertionError("unreachable")


def stop_session(session: Path) -> None:
    """Kills what is left of a Ray session whose start failed: a node that never joined is not the Cluster's to
    shut down. Every process of a session names its directory on its command line."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if f"={session}" in cmdline(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


@contextlib.contextmanager
def running_service(tiny_model_dir: Path, scoring_model_dirs: dict[str, Path], fault_dir: Path, sink: OtlpSink):
    """The cluster and the service on it, tracing to `sink`; stopped, cluster and all, on leaving."""
    from embedding_service.ops import launcher

    config = make_test_config(tiny_model_dir, fault_dir, sink.endpoint, scoring_model_dirs)
    config.prepare_environment()
    # What this process's environment already sets wins over the config (an operator's override); here it must
    # be the test config's own: a value left by an earlier test would start the session's Ray otherwise.
    stale = {k: os.environ[k] for k, v in config.node_environment().items()
             if k != ray_internals.PRELOAD_ENV and os.environ[k] != v}
    assert not stale, f"the session's nodes would start with settings other than its config's: {stale}"
    cluster = start_cluster()
    try:
        target = launcher.start(config, address=cluster.address)
        channel = grpc.insecure_channel(
            target,
            options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)],
        )
        try:
            grpc.channel_ready_future(channel).result(timeout=60)
            yield Service(target, channel, config, cluster, fault_dir, sink)
        finally:
            channel.close()
            launcher.stop()
    finally:
        cluster.shutdown()


def one_model_config(tiny_model_dir: Path, **model: object) -> tuple[dict, int]:
    """The shipped config file, parsed, serving only the tiny model on CPU on free ports (for a service that starts a
    Ray of its own beside the session's); and its gRPC port. `model`: settings of the one model to change (another
    name and path serve another model)."""
    config = servefile.read()
    grpc_port = free_port()
    config["http_options"]["port"] = free_port()
    config["grpc_options"]["port"] = grpc_port
    args = config["applications"][0]["args"]
    args["models"] = [{"name": TINY, "path": str(tiny_model_dir), "device": "cpu", "backend": "torch",
                       "num_replicas": 1, "num_cpus": 1, "threads": 1} | model]
    args["default_model"] = args["models"][0]["name"]
    return config, grpc_port
