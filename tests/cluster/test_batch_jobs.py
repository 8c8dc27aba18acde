"""Batch jobs on Ray Data, on the session's real cluster: OpenAI's Batch API through the gateway with the official
`openai` SDK, and gRPC jobs over Parquet; every vector equal to sentence-transformers' own, every row written once
through a lost runner and a lost worker node, cancel stopping the pool, and one key's jobs invisible to another."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import openai
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.batch.manager import runner_of
from embedding_service.batch.ray_data_internals import requests_of
from embedding_service.batch.runner import NAMESPACE, runner_name
from embedding_service.wire.messages import JOBS_DEPLOYMENT
from tests.helpers.gateways import running_gateway
from tests.helpers.grpc_errors import error_info
from tests.helpers.models import MINILM, RERANKER, TINY, TINY_DIM
from tests.helpers.observe import scrape, total, wait_until
from tests.helpers.replicas import replica_actors
from tests.helpers.session import BATCH_RESOURCE
from tests.helpers.texts import make_texts

KEY = "batch-key"
TOL = 1e-5
FINAL = (pb.JOB_STATUS_COMPLETED, pb.JOB_STATUS_FAILED, pb.JOB_STATUS_CANCELLED, pb.JOB_STATUS_EXPIRED)


def _line(custom_id: str, text, model: str = MINILM, **body) -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings",
                       "body": {"model": model, "input": text, **body}}).encode() + b"\n"


@pytest.fixture(scope="module")
def jobs(service):
    return service.config.args.jobs


@pytest.fixture(scope="module")
def client(service, jobs):
    with running_gateway(targets=[service.target], api_keys=[KEY, "other-key"],
                         jobs_storage_root=jobs.storage_root) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)


def _finished(client: openai.OpenAI, batch_id: str, timeout_s: float = 180):
    seen = {}

    def done() -> bool:
        seen["batch"] = client.batches.retrieve(batch_id)
        return seen["batch"].status in ("completed", "failed", "cancelled", "expired")

    wait_until(done, timeout_s, f"batch {batch_id} finished")
    return seen["batch"]


def _jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).content.splitlines()] if file_id else []


def _gauge(name: str, job_id: str) -> float:
    return max((s.value for s in scrape() if s.name == name and s.labels.get("job") == job_id), default=0.0)


def _pool_nodes() -> list[str]:
    """The jobs' nodes that hold a model actor now (each takes one of a node's BATCH_RESOURCE)."""
    from ray._private.state import state

    available = state.available_resources_per_node()
    return [n["NodeID"] for n in ray.nodes() if n["Alive"] and BATCH_RESOURCE in n["Resources"]
            and available.get(n["NodeID"], {}).get(BATCH_RESOURCE, 0) <= n["Resources"][BATCH_RESOURCE] - 1]


def test_an_openai_batch_through_the_sdk_equals_sentence_transformers_line_by_line(client, reference_models):
    model = reference_models[MINILM]
    texts = make_texts(40, seed=11)
    data = b"".join(_line(f"doc-{i}", t) for i, t in enumerate(texts))
    data += _line("many", texts[:3]) + _line("cut", texts[0], dimensions=128) + _line("b64", texts[1],
                                                                                      encoding_format="base64")
    data += b"{not json\n" + _line("too-wide", texts[2], dimensions=4096) + _line("empty", [])
    source = client.files.create(file=("corpus.jsonl", io.BytesIO(data)), purpose="batch")
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/embeddings", completion_window="24h",
                                  metadata={"run": "e2e"})
    done = _finished(client, batch.id)
    assert done.status == "completed", done.errors
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (46, 43, 3)
    # Its runner (a detached actor) stopped once the job ended: nothing of it holds memory on.
    wait_until(lambda: runner_of(batch.id) is None, 30, "the ended job's runner stopped")
    assert done.in_progress_at and done.finalizing_at and done.completed_at and done.model == MINILM
    out = {line["custom_id"]: line for line in _jsonl(client, done.output_file_id)}
    errors = _jsonl(client, done.error_file_id)
    assert len(out) == 43 and len(errors) == 3
    expected = model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    for i in range(40):
        body = out[f"doc-{i}"]["response"]["body"]
        assert out[f"doc-{i}"]["response"]["status_code"] == 200 and body["model"] == MINILM
        np.testing.assert_allclose(body["data"][0]["embedding"], expected[i], atol=TOL)
        assert body["usage"]["prompt_tokens"] == len(model.tokenizer(texts[i], truncation=True)["input_ids"])
    many = out["many"]["response"]["body"]["data"]
    np.testing.assert_allclose([d["embedding"] for d in many], expected[:3], atol=TOL)
    assert [d["index"] for d in many] == [0, 1, 2]
    cut = expected[0][:128] / np.linalg.norm(expected[0][:128])
    np.testing.assert_allclose(out["cut"]["response"]["body"]["data"][0]["embedding"], cut, atol=TOL)
    raw = base64.b64decode(out["b64"]["response"]["body"]["data"][0]["embedding"])
    np.testing.assert_allclose(np.frombuffer(raw, "<f4"), expected[1], atol=TOL)
    by_id = {e["custom_id"]: e["response"] for e in errors}
    assert by_id[None]["status_code"] == 400 and "not JSON" in by_id[None]["body"]["error"]["message"]
    assert by_id["too-wide"]["status_code"] == 400 and by_id["too-wide"]["body"]["error"]["param"] == "dimensions"
    assert by_id["empty"]["status_code"] == 400 and by_id["empty"]["body"]["error"]["param"] == "input"
    # Another key sees none of it.
    other = openai.OpenAI(base_url=str(client.base_url), api_key="other-key", max_retries=0)
    for call in (lambda: other.batches.retrieve(batch.id), lambda: other.files.content(done.output_file_id),
                 lambda: other.batches.cancel(batch.id)):
        with pytest.raises(openai.NotFoundError):
            call()


def test_a_bad_file_fails_its_batch_and_an_unknown_model_fails_its_lines(client):
    twice = _line("same", "a") + _line("same", "b")
    batch = client.batches.create(input_file_id=client.files.create(
        file=("twice.jsonl", io.BytesIO(twice)), purpose="batch").id, endpoint="/v1/embeddings",
        completion_window="24h")
    failed = _finished(client, batch.id)
    assert failed.status == "failed" and failed.errors.data[0].code == "duplicate_custom_id"
    assert failed.errors.data[0].line == 2
    unknown = b"".join(json.dumps({"custom_id": f"u{i}", "method": "POST", "url": "/v1/embeddings",
                                   "body": {"model": "no-such-model", "input": "x"}}).encode() + b"\n"
                       for i in range(3))
    batch = client.batches.create(input_file_id=client.files.create(
        file=("unknown.jsonl", io.BytesIO(unknown)), purpose="batch").id, endpoint="/v1/embeddings",
        completion_window="24h")
    done = _finished(client, batch.id)
    assert done.status == "completed" and done.output_file_id is None
    lines = _jsonl(client, done.error_file_id)
    assert [line["response"]["status_code"] for line in lines] == [404] * 3
    assert lines[0]["response"]["body"]["error"]["code"] == "model_not_found"


def test_rerank_lines_equal_the_gateways_rerank_and_cross_encoder(client, cross_encoder):
    """A /v1/rerank batch: each line's body is what the gateway's /v1/rerank answers for the same body, its scores
    CrossEncoder.predict's."""
    queries = ["what do cats eat", "how do planes fly", "where is the sun"]
    documents = make_texts(7, seed=21)
    bodies = {
        "plain": {"query": queries[0], "documents": documents},
        "top": {"query": queries[1], "documents": documents, "top_n": 3, "return_documents": True},
        "raw": {"query": queries[2], "documents": [{"text": d} for d in documents[:4]], "raw_scores": True},
    }
    lines = [json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/rerank",
                         "body": {"model": RERANKER, **body}}).encode() + b"\n" for cid, body in bodies.items()]
    refused = {"long": {"query": "q", "documents": ["word " * 3000], "truncate": False},
               "long-query": {"query": "word " * 600, "documents": ["d"]},  # past max_query_tokens (512)
               "unknown": {"query": "q", "documents": ["d"], "relevant_spans": True},
               "top-too-big": {"query": "q", "documents": ["d"], "top_n": 2}}
    lines += [json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/rerank",
                          "body": {"model": RERANKER, **body}}).encode() + b"\n" for cid, body in refused.items()]
    source = client.files.create(file=("rerank.jsonl", io.BytesIO(b"".join(lines))), purpose="batch")
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/rerank", completion_window="24h")
    done = _finished(client, batch.id)
    assert done.status == "completed", done.errors
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (7, 3, 4)
    out = {line["custom_id"]: line["response"] for line in _jsonl(client, done.output_file_id)}
    headers = {"Authorization": f"Bearer {KEY}"}
    base = str(client.base_url).removesuffix("/v1/").removesuffix("/v1")
    for cid, body in bodies.items():
        online = httpx.post(f"{base}/v1/rerank", json={"model": RERANKER, **body}, headers=headers, timeout=60)
        assert online.status_code == 200, online.text
        expected, got = online.json(), out[cid]["body"]
        assert out[cid]["status_code"] == 200 and got["model"] == expected["model"] == RERANKER
        assert [r["index"] for r in got["results"]] == [r["index"] for r in expected["results"]]
        assert [r.get("document") for r in got["results"]] == [r.get("document") for r in expected["results"]]
        np.testing.assert_allclose([r["relevance_score"] for r in got["results"]],
                                   [r["relevance_score"] for r in expected["results"]], atol=TOL)
        assert got["usage"] == expected["usage"] and got["meta"] == expected["meta"]
        texts = [d["text"] if isinstance(d, dict) else d for d in body["documents"]]
        activation = torch.nn.Identity() if body.get("raw_scores") else None  # None: the model's own
        scores = cross_encoder.predict([[body["query"], t] for t in texts], activation_fn=activation)
        np.testing.assert_allclose([r["relevance_score"] for r in got["results"]],
                                   scores[[r["index"] for r in got["results"]]], atol=TOL)
    assert len(out["top"]["body"]["results"]) == 3
    errors = {e["custom_id"]: e["response"] for e in _jsonl(client, done.error_file_id)}
    assert {cid: (e["status_code"], e["body"]["error"]["param"]) for cid, e in errors.items()} == {
        "long": (400, "documents"), "long-query": (400, "query"), "unknown": (400, "relevant_spans"),
        "top-too-big": (400, "top_n")}
    # A query or a pair too long: the error the gateway's /v1/rerank answers for the same body.
    for cid in ("long", "long-query"):
        online = httpx.post(f"{base}/v1/rerank", json={"model": RERANKER, **refused[cid]}, headers=headers, timeout=60)
        assert online.status_code == errors[cid]["status_code"] == 400
        mine, theirs = errors[cid]["body"]["error"], online.json()["error"]
        assert (mine["code"], mine["param"]) == (theirs["code"], theirs["param"]) and mine["code"] == "input_too_long"


def test_cancel_stops_the_pool_within_seconds_and_keeps_the_lines_done(client):
    texts = make_texts(20000, seed=5, max_words=30)
    source = client.files.create(file=("big.jsonl", io.BytesIO(b"".join(_line(f"c{i}", t, TINY) for i, t in
                                                                        enumerate(texts)))), purpose="batch")
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/embeddings", completion_window="24h")
    wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed > 0, 120, "lines done")
    asked = time.monotonic()
    assert client.batches.cancel(batch.id).status == "cancelling"
    done = _finished(client, batch.id, 30)
    assert done.status == "cancelled" and done.cancelled_at
    wait_until(lambda: not _pool_nodes(), 15, "the pool stopped")
    assert time.monotonic() - asked < 20
    # What Ray Data reserved for the killed runner's execution is released (else it would shrink the next jobs'
    # share of the cluster for minutes).
    assert requests_of(runner_name(batch.id)) == []
    lines = _jsonl(client, done.output_file_id)
    ids = [line["custom_id"] for line in lines]
    assert 0 < len(ids) < len(texts) and len(set(ids)) == len(ids)
    assert done.request_counts.completed == len(ids)


def test_a_batch_past_its_completion_window_expires_with_the_lines_done(client, jobs):
    """Mid-pool, the batch's creation moved a day back in the store: the manager's next round finds it past its
    window, stops its runner and pool, and ends it expired with the lines it had done."""
    import sqlalchemy as sa

    texts = make_texts(20000, seed=6, max_words=30)
    source = client.files.create(file=("late.jsonl", io.BytesIO(b"".join(_line(f"e{i}", t, TINY) for i, t in
                                                                       enumerate(texts)))), purpose="batch")
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/embeddings", completion_window="24h")
    assert batch.expires_at - batch.created_at == 24 * 3600
    wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed > 0, 120, "lines done")
    engine = sa.create_engine(f"sqlite:///{jobs.storage_root}/jobs.db")
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE batch_jobs SET created_at = created_at - :day WHERE id = :id"),
                           {"day": 24 * 3600 * 1000, "id": batch.id})
    engine.dispose()
    done = _finished(client, batch.id, 60)
    assert done.status == "expired" and done.expired_at and done.expired_at >= done.expires_at
    wait_until(lambda: not _pool_nodes() and runner_of(batch.id) is None, 15, "the pool and the runner stopped")
    assert requests_of(runner_name(batch.id)) == []
    ids = [line["custom_id"] for line in _jsonl(client, done.output_file_id)]
    assert 0 < len(ids) < len(texts) and len(set(ids)) == len(ids) and done.request_counts.completed == len(ids)
    assert set(ids) <= {f"e{i}" for i in range(len(texts))}


@pytest.fixture
def dataset(jobs) -> tuple[str, list[str]]:
    root = Path(jobs.dataset_roots[0])
    root.mkdir(parents=True, exist_ok=True)
    texts = make_texts(30000, seed=3, max_words=30)
    path = root / f"corpus-{time.monotonic_ns()}.parquet"
    pq.write_table(pa.table({"doc_id": [f"d{i}" for i in range(len(texts))], "body": texts}), path,
                   row_group_size=200)
    return str(path), texts


def _create(service, dataset_path: str, tenant: str = "", model: str = TINY, **fields) -> pb.Job:
    metadata = (("embedding-tenant", tenant),) if tenant else None
    request = pb.CreateJobRequest(model=model, input_uri=dataset_path, input_format=pb.DATASET_FORMAT_PARQUET,
                                  text_column="body", id_column="doc_id", **fields)
    return service.stub.CreateJob(request, metadata=metadata, timeout=30).job


def test_a_job_survives_a_node_and_its_runner_lost_writing_each_row_once(service, dataset, reference_models):
    """Submitted and followed with the client library (submit_job, wait over WatchJob), read with the command line."""
    import subprocess
    import sys

    from embedding_client import EmbedClient

    path, texts = dataset
    resumed_before = total("ray_embedding_job_runners_started_total", reason="resumed")
    seen: list[tuple[int, int]] = []
    with EmbedClient(service.target) as client:
        job = client.submit_job(path, input_format="parquet", model=TINY, text_column="body", id_column="doc_id",
                                output_uri=str(Path(path).with_suffix("")) + "-out")
        assert job.status == "validating"
        follow = threading.Thread(target=lambda: job.wait(timeout_s=300, progress=lambda d, n: seen.append((d, n))),
                                  daemon=True)
        follow.start()

        def progress() -> pb.Job:
            return client.job(job.id).message

        # Each fault is made at the first rows written after the last, seconds before the end (the tiny model
        # writes some 3,000 rows/s here, in blocks of about 1,300).
        wait_until(lambda: progress().rows_done > 0 and _pool_nodes(), 120, "rows written")
        # The node that holds the pool's actor lost (another of the jobs' nodes standing by): Ray Data starts the
        # actor again there and retries the lost blocks.
        holding = _pool_nodes()
        assert len(holding) == 1  # the session's other node of the jobs' group stands by
        service.cluster.remove_node(next(n for n in service.cluster.worker_nodes if n.node_id == holding[0]))
        written = progress().rows_done
        assert written < len(texts), "the node was lost mid-job"
        wait_until(lambda: progress().rows_done > written, 120, "the pool going on elsewhere")
        # The runner (the job's Ray Data driver) and the job manager's replica killed together: the pool dies with
        # the runner; Serve starts the manager again, which starts the runner again, and Ray Data's checkpoints
        # resume the job from the rows written.
        ray.kill(ray.get_actor(runner_name(job.id), namespace=NAMESPACE), no_restart=True)
        for replica in replica_actors(JOBS_DEPLOYMENT):
            ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
        written = progress().rows_done
        assert written < len(texts), "the runner was lost mid-job"
        follow.join(300)
    assert job.status == "completed", job.message.errors
    done = job.message
    assert (done.rows_total, done.rows_done) == (len(texts), len(texts))
    assert seen[-1] == (len(texts), len(texts)) and all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    assert done.status_times_ms["in_progress"] <= done.status_times_ms["completed"]
    out = pq.read_table(done.output_uri)
    ids = out.column("doc_id").to_pylist()
    assert len(ids) == len(texts) and set(ids) == {f"d{i}" for i in range(len(texts))}  # each row once
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), TINY_DIM)
    order = np.array([int(i[1:]) for i in ids])
    sample = np.random.default_rng(0).choice(len(ids), 64, replace=False)
    expected = reference_models[TINY].encode([texts[k] for k in order[sample]], normalize_embeddings=True)
    np.testing.assert_allclose(np.stack(out.column("embedding").to_numpy(zero_copy_only=False)[sample]), expected,
                               atol=TOL)
    wait_until(lambda: total("ray_embedding_job_runners_started_total", reason="resumed") > resumed_before, 30,
               "the resumed runner counted")
    # The killed runner's Ray Data resource request was released (it would hold for 180 s): none of the job's is left.
    assert requests_of(runner_name(job.id)) == []
    assert total("ray_embedding_job_reservations_released_total", outcome="failed") == 0
    # Its progress, as Prometheus scrapes it per job from the (restarted) manager's gauges, ends at every row.
    # (the killed manager's series may linger beside the new one's: the newest is the largest)
    wait_until(lambda: _gauge("ray_embedding_job_rows_done", job.id) == len(texts), 30, "the job's rows scraped")
    assert _gauge("ray_embedding_job_rows_total", job.id) == len(texts)
    status = subprocess.run([sys.executable, "-m", "embedding_client", "job", "status", job.id, "--target",
                             service.target], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert (shown["id"], shown["status"], int(shown["rows_done"])) == (job.id, "JOB_STATUS_COMPLETED", len(texts))
    # The manager set the ended job's gauges once more, with its final values; Ray exports a gauge no longer set
    # for about 20 s, so a job's series leave the scrape after it ends (the `job` label grows no series).
    wait_until(lambda: not [s for s in scrape("ray_embedding_job_rows") if s.labels.get("job") == job.id], 90,
               "the ended job's series gone from the scrape")


def test_a_dataset_row_past_the_bounds_fails_its_job_naming_the_row(service, jobs):
    """A row's text past max_chars_per_input (the session's default, 100,000) is refused in the model actor before
    it is tokenized, as an online input is: the job fails, and its error names the row."""
    root = Path(jobs.dataset_roots[0])
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"long-row-{time.monotonic_ns()}.parquet"
    pq.write_table(pa.table({"doc_id": ["d0", "d1", "d2"], "body": ["fine", "x" * 100_001, "fine too"]}), path)
    job = _create(service, str(path))

    def ended() -> pb.Job:
        return service.stub.GetJob(pb.GetJobRequest(id=job.id), timeout=30).job

    wait_until(lambda: ended().status in (pb.JOB_STATUS_FAILED, pb.JOB_STATUS_COMPLETED), 120, "the job ended")
    done = ended()
    assert done.status == pb.JOB_STATUS_FAILED
    assert [e.code for e in done.errors] == ["job_failed"]
    # The row's own error, whole, without Ray Data's wrapper or its advice on retries.
    assert done.errors[0].message == "BadRow: row 'd1': its 'body' has 100001 characters; the limit is 100000"


def test_jobs_belong_to_their_key_and_bad_requests_get_their_reasons(service, dataset, jobs):
    path, _ = dataset
    stub = service.stub

    def refused(call) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        return caught.value.code(), error_info(caught.value).reason

    mine = _create(service, path, tenant="alice", encoding=pb.VECTOR_ENCODING_INT8, dimensions=32,
                   request_id="create-1")
    assert _create(service, path, tenant="alice").id != mine.id
    # The running bound (2 per key): the third is refused; the first create sent again (its request_id) is answered
    # with the job it made.
    assert refused(lambda: _create(service, path, tenant="alice")) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                                       "JOB_LIMIT_REACHED")
    assert _create(service, path, tenant="alice", encoding=pb.VECTOR_ENCODING_INT8, dimensions=32,
                   request_id="create-1").id == mine.id
    # Sent with another request (float vectors here), the id is refused.
    assert refused(lambda: _create(service, path, tenant="alice", request_id="create-1")) == (
        grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    assert refused(lambda: _create(service, path, tenant="alice", request_id="r" * 129)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_JOB")
    bob = (("embedding-tenant", "bob"),)
    assert refused(lambda: stub.GetJob(pb.GetJobRequest(id=mine.id), metadata=bob)) == (
        grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND")
    assert refused(lambda: stub.CancelJob(pb.CancelJobRequest(id=mine.id), metadata=bob)) == (
        grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND")
    assert mine.id not in [j.id for j in stub.ListJobs(pb.ListJobsRequest(), metadata=bob).jobs]
    listed = stub.ListJobs(pb.ListJobsRequest(limit=1), metadata=(("embedding-tenant", "alice"),))
    assert len(listed.jobs) == 1 and listed.has_more
    for job in stub.ListJobs(pb.ListJobsRequest(), metadata=(("embedding-tenant", "alice"),)).jobs:
        cancelled = stub.CancelJob(pb.CancelJobRequest(id=job.id), metadata=(("embedding-tenant", "alice"),)).job
        assert cancelled.status in (pb.JOB_STATUS_CANCELLING, pb.JOB_STATUS_CANCELLED)
    assert refused(lambda: _create(service, "/etc/passwd")) == (grpc.StatusCode.PERMISSION_DENIED,
                                                                "DATASET_NOT_ALLOWED")
    escape = str(Path(jobs.dataset_roots[0]) / ".." / "jobs" / "jobs.db")
    assert refused(lambda: _create(service, escape)) == (grpc.StatusCode.PERMISSION_DENIED, "DATASET_NOT_ALLOWED")
    assert refused(lambda: _create(service, path, output_uri="/tmp/elsewhere")) == (
        grpc.StatusCode.PERMISSION_DENIED, "DATASET_NOT_ALLOWED")
    assert refused(lambda: stub.CreateJob(pb.CreateJobRequest(model=MINILM, input_uri=path))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_JOB")
    assert refused(lambda: _create(service, path, dimensions=TINY_DIM + 1)) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                        "INVALID_JOB")
    assert refused(lambda: stub.CreateJob(pb.CreateJobRequest(
        model="nope", input_uri=path, input_format=pb.DATASET_FORMAT_PARQUET))) == (grpc.StatusCode.NOT_FOUND,
                                                                                   "MODEL_NOT_FOUND")
    assert refused(lambda: stub.CreateJob(pb.CreateJobRequest(
        model=RERANKER, input_uri=path, input_format=pb.DATASET_FORMAT_PARQUET))) == (
        grpc.StatusCode.FAILED_PRECONDITION, "WRONG_MODEL_KIND")
    assert refused(lambda: stub.GetJob(pb.GetJobRequest(id="batch_missing"))) == (grpc.StatusCode.NOT_FOUND,
                                                                                  "JOB_NOT_FOUND")


def test_a_job_runs_on_an_s3_storage_root_dataset_checkpoints_and_output(service, jobs, tmp_path):
    """The storage root and the dataset on a real S3-compatible server (SeaweedFS, started here): a runner reads,
    checkpoints and writes there through pyarrow's S3 filesystem, the store's URL from the variable the settings
    name, the keys from the AWS_* variables, as on a cluster."""
    import pyarrow.fs as pafs

    from embedding_client import EmbedClient
    from embedding_service.batch.runner import JobRunner
    from embedding_service.jobs.spec import JobSpec
    from embedding_service.jobs.store import JobStore, owner_of
    from tests.helpers.seaweed import aws_env, s3_server
    from tests.helpers.session import HEAD

    with s3_server() as s3:
        fs = s3.filesystem()
        texts = make_texts(600, seed=2, max_words=20)
        pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), f"{s3.bucket}/datasets/in.parquet",
                       filesystem=fs)
        settings = jobs.model_copy(update={"storage_root": f"s3://{s3.bucket}/jobs", "s3_endpoint": s3.endpoint,
                                           "store_url_env": "JOBS_STORE_URL_FOR_TEST",
                                           "dataset_roots": [f"s3://{s3.bucket}/datasets"]})
        url = f"sqlite:///{tmp_path}/jobs.db"
        store = JobStore(url)
        spec = JobSpec(source="dataset", model=TINY, input_uri=f"s3://{s3.bucket}/datasets/in.parquet",
                       input_format="parquet", output_uri=f"s3://{s3.bucket}/datasets/out", encoding="int8",
                       dimensions=32)
        record = store.add_job(owner_of("s3-key"), "dataset", "", TINY, spec=spec.model_dump())
        models = {m.name: m for m in service.config.args.models}
        runner = ray.remote(JobRunner).options(
            num_cpus=0, resources=HEAD, runtime_env={"env_vars": {**aws_env(s3), "JOBS_STORE_URL_FOR_TEST": url}},
        ).remote(settings, models, service.config.args.limits, record.id)
        assert ray.get(runner.run.remote(), timeout=240) == "completed", store.job_by_id(record.id).errors
        ray.kill(runner)
        done = store.job_by_id(record.id)
        assert (done.total, done.completed) == (len(texts), len(texts))
        out = pq.read_table(f"{s3.bucket}/datasets/out", filesystem=fs)
        ids = out.column("id").to_numpy()
        assert sorted(ids.tolist()) == list(range(len(texts)))
        assert out.schema.field("embedding").type == pa.list_(pa.int8(), 32)
        # The service's own int8 at 32 dimensions (the same calibrated ranges), as the online path returns it.
        with EmbedClient(service.target) as online:
            expected = online.embed([texts[i] for i in ids], model=TINY, dimensions=32, output="int8").vectors
        np.testing.assert_array_equal(np.stack(out.column("embedding").to_numpy(zero_copy_only=False)), expected)
        checkpoints = fs.get_file_info(pafs.FileSelector(f"{s3.bucket}/jobs/jobs/{record.id}/checkpoints",
                                                         recursive=True))
        assert sum(i.size for i in checkpoints if i.type == pafs.FileType.File) > 0  # Ray Data's, on S3 too
        store.close()
