"""OpenAI's Files and Batches routes of the gateway, driven by the official `openai` SDK against a real gateway
(uvicorn) and a real store (SQLite under a temporary storage root): uploads streamed and bounded, listings paged,
content downloaded byte for byte, batches created, cancelled and listed, and every object of one key invisible to
another. The jobs' running is the cluster tests' (tests/cluster/test_batch_jobs.py)."""

from __future__ import annotations

import io
import json
import os

import httpx
import openai
import pytest

from embedding_service.jobs.store import JobStore, owner_of, store_url
from embedding_service.ops import launcher, servefile
from embedding_service.ops.servefile import ServeFile
from tests.helpers.gateways import readiness, running_gateway
from tests.helpers.observe import wait_until
from tests.helpers.ports import free_port

KEYS = ["key-a", "key-b", "key-c", "key-d"]


def _lines(n: int, model: str = "m") -> bytes:
    return b"".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/embeddings",
                                "body": {"model": model, "input": f"text {i}"}}).encode() + b"\n" for i in range(n))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs")
    with running_gateway(targets=["127.0.0.1:1"], api_keys=KEYS, jobs_storage_root=str(root),
                         max_file_bytes=64 * 1024, max_files_per_key=6, max_running_jobs_per_key=3) as base:
        yield base, root


def _client(base: str, key: str = "key-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)


def test_a_file_goes_up_streamed_and_comes_back_byte_for_byte(gateway):
    base, root = gateway
    client = _client(base)
    data = _lines(300)
    created = client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch")
    assert (created.object, created.purpose, created.filename, created.bytes) == ("file", "batch", "input.jsonl",
                                                                                    len(data))
    assert client.files.retrieve(created.id).bytes == len(data)
    assert client.files.content(created.id).content == data
    stored = list((root / "files" / owner_of("key-a")).iterdir())
    assert any(p.read_bytes() == data for p in stored)
    # Another key: not found, as a missing one.
    other = _client(base, "key-b")
    for call in (lambda: other.files.retrieve(created.id), lambda: other.files.content(created.id),
                 lambda: other.files.delete(created.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert created.id not in [f.id for f in other.files.list()]
    assert client.files.delete(created.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    assert not any(p.exists() and p.read_bytes() == data for p in stored)


def test_an_oversized_upload_is_413_and_leaves_nothing(gateway):
    base, root = gateway
    client = _client(base, "key-b")
    before = {p for p in (root / "files").rglob("*") if p.is_file()}
    with pytest.raises(openai.APIStatusError) as caught:
        client.files.create(file=("big.jsonl", io.BytesIO(b"x" * (200 * 1024))), purpose="batch")
    assert caught.value.status_code == 413
    # Without a content-length (chunked): cut at the first byte past the bound, as it streams.
    body = (b"--B\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--B\r\n"
            b"Content-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n\r\n" + b"y" * (100 * 1024)
            + b"\r\n--B--\r\n")
    answer = httpx.post(f"{base}/v1/files", content=iter([body[i:i + 4096] for i in range(0, len(body), 4096)]),
                        headers={"authorization": "Bearer key-b", "content-type": "multipart/form-data; boundary=B"})
    assert answer.status_code == 413, answer.text
    assert answer.json()["error"]["code"] == "file_too_large"
    assert {p for p in (root / "files").rglob("*") if p.is_file()} == before


def test_uploads_are_refused_without_a_key_or_with_a_wrong_purpose(gateway):
    base, _ = gateway
    answer = httpx.post(f"{base}/v1/files", files={"file": ("a.jsonl", b"{}")}, data={"purpose": "batch"})
    assert answer.status_code == 401
    with pytest.raises(openai.BadRequestError):
        _client(base).files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    answer = httpx.post(f"{base}/v1/files", content=b"plain", headers={"authorization": "Bearer key-a",
                                                                      "content-type": "text/plain"})
    assert answer.status_code == 400


def test_files_list_in_pages_newest_first(gateway):
    base, _ = gateway
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="key-b", max_retries=0)
    made = [client.files.create(file=(f"f{i}.jsonl", io.BytesIO(_lines(1))), purpose="batch").id for i in range(4)]
    page = client.files.list(limit=3)
    assert [f.id for f in page.data] == made[::-1][:3] and page.has_more
    assert [f.id for f in client.files.list(limit=3)][:4] == made[::-1]
    # The bound on files per key (6): refused past it.
    client.files.create(file=("f4.jsonl", io.BytesIO(_lines(1))), purpose="batch")
    client.files.create(file=("f5.jsonl", io.BytesIO(_lines(1))), purpose="batch")
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("f6.jsonl", io.BytesIO(_lines(1))), purpose="batch")
    assert "max_files_per_key" in str(caught.value)
    for file_id in [f.id for f in client.files.list()]:
        client.files.delete(file_id)


def test_a_batch_is_created_listed_and_cancelled_by_its_key_only(gateway):
    base, root = gateway
    client = _client(base)
    source = client.files.create(file=("input.jsonl", io.BytesIO(_lines(5))), purpose="batch")
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/embeddings", completion_window="24h",
                                  metadata={"corpus": "docs"})
    assert (batch.status, batch.input_file_id, batch.endpoint, batch.metadata) == (
        "validating", source.id, "/v1/embeddings", {"corpus": "docs"})
    assert batch.expires_at - batch.created_at == 24 * 3600
    assert client.batches.retrieve(batch.id).id == batch.id
    other = _client(base, "key-b")
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.batches.cancel(batch.id)
    with pytest.raises(openai.NotFoundError):  # another key's file cannot be a batch's input
        other.batches.create(input_file_id=source.id, endpoint="/v1/embeddings", completion_window="24h")
    assert batch.id not in [b.id for b in other.batches.list()]
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status == "cancelling" and cancelled.cancelling_at is not None
    # What the store holds: the spec the service's runner reads.
    store = JobStore(store_url(str(root), None))
    kept = store.job(owner_of("key-a"), batch.id)
    assert kept.spec["source"] == "openai" and kept.spec["input_uri"].endswith(kept.spec["input_uri"].split("/")[-1])
    store.close()


def test_batches_refuse_what_openai_refuses_and_page(gateway):
    base, _ = gateway
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="key-b", max_retries=0)
    source = client.files.create(file=("input.jsonl", io.BytesIO(_lines(2))), purpose="batch")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=source.id, endpoint="/v1/embeddings", completion_window="48h")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-missing", endpoint="/v1/embeddings", completion_window="24h")
    made = [client.batches.create(input_file_id=source.id, endpoint="/v1/embeddings",
                                  completion_window="24h").id for _ in range(3)]
    # The bound on running jobs per key (3): refused with 429.
    with pytest.raises(openai.RateLimitError):
        client.batches.create(input_file_id=source.id, endpoint="/v1/embeddings", completion_window="24h")
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == made[::-1][:2] and page.has_more
    assert [b.id for b in client.batches.list(limit=2)] == made[::-1]
    for batch_id in made:
        client.batches.cancel(batch_id)


def test_the_batch_api_is_off_without_a_storage_root():
    with running_gateway(targets=["127.0.0.1:1"], api_keys=KEYS) as base:
        with pytest.raises(openai.NotFoundError):
            _client(base).batches.list()


def test_a_create_sent_again_with_its_idempotency_key_returns_the_batch_it_made(gateway):
    base, _ = gateway
    client = _client(base, "key-c")
    source = client.files.create(file=("input.jsonl", io.BytesIO(_lines(2))), purpose="batch")

    def create(key: str):
        return client.batches.create(input_file_id=source.id, endpoint="/v1/embeddings", completion_window="24h",
                                     extra_headers={"Idempotency-Key": key})

    first = create("nightly-2026-12-06")
    assert create("nightly-2026-12-06").id == first.id
    assert create("nightly-2026-12-07").id != first.id
    assert [b.id for b in client.batches.list()].count(first.id) == 1
    with pytest.raises(openai.BadRequestError):
        create("k" * 129)
    # The key sent with another request (another file, other metadata) is refused, naming the batch it made.
    other_source = client.files.create(file=("other.jsonl", io.BytesIO(_lines(3))), purpose="batch")
    for call in (lambda: client.batches.create(input_file_id=other_source.id, endpoint="/v1/embeddings",
                                               completion_window="24h",
                                               extra_headers={"Idempotency-Key": "nightly-2026-12-06"}),
                 lambda: client.batches.create(input_file_id=source.id, endpoint="/v1/embeddings",
                                               completion_window="24h", metadata={"run": "2"},
                                               extra_headers={"Idempotency-Key": "nightly-2026-12-06"})):
        with pytest.raises(openai.UnprocessableEntityError) as reused:
            call()
        assert reused.value.code == "idempotency_key_reused" and first.id in reused.value.message
    # Another key's create with the same Idempotency-Key is its own.
    other = _client(base, "key-d")
    theirs = other.files.create(file=("input.jsonl", io.BytesIO(_lines(2))), purpose="batch")
    assert other.batches.create(input_file_id=theirs.id, endpoint="/v1/embeddings", completion_window="24h",
                                extra_headers={"Idempotency-Key": "nightly-2026-12-06"}).id != first.id


def test_the_run_commands_gateway_serves_the_batch_api_of_the_configs_jobs(tmp_path):
    """The gateway the run command starts (launcher.start_gateway, the same command line the Kubernetes manifests
    give it): with jobs on in the config, its Files and Batches routes use the jobs' storage root, bounds and store
    (its URL from the variable jobs.store_url_env names, as the service reads it)."""
    raw = servefile.read()
    raw["applications"][0]["args"]["jobs"] = {"storage_root": str(tmp_path / "jobs"), "store_url_env": "TEST_STORE",
                                              "limits": {"max_file_bytes": 4096}}
    config = ServeFile.parse(raw)
    elsewhere = tmp_path / "store" / "jobs.db"
    elsewhere.parent.mkdir()
    env = {**os.environ, "GATEWAY_API_KEYS": '["key-a"]'}
    env.pop("EMBEDDING_API_KEYS", None)
    port = free_port()
    with pytest.raises(RuntimeError, match="TEST_STORE, which is not set here"):  # not a store of its own
        launcher.start_gateway(config, "127.0.0.1:1", port, env=env)
    env["TEST_STORE"] = f"sqlite:///{elsewhere}"
    process = launcher.start_gateway(config, "127.0.0.1:1", port, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        # Listening (not ready: no service answers at its target, which the Batch API does not need).
        wait_until(lambda: readiness(base) != 0 or process.poll() is not None, 60, "the gateway listening")
        assert process.poll() is None, f"the gateway exited with {process.returncode}"
        client = _client(base)
        created = client.files.create(file=("in.jsonl", io.BytesIO(_lines(3))), purpose="batch")
        assert [f.id for f in client.files.list()] == [created.id]
        with pytest.raises(openai.APIStatusError) as too_big:  # the config's bound, not the gateway's default
            client.files.create(file=("big.jsonl", io.BytesIO(_lines(100))), purpose="batch")
        assert too_big.value.status_code == 413
    finally:
        process.terminate()
        process.wait(30)
    assert any((tmp_path / "jobs" / "files").rglob("*"))  # the upload under the jobs' root
    store = JobStore(f"sqlite:///{elsewhere}")
    try:  # its record in the store the variable names, not in <root>/jobs.db
        assert store.file(owner_of("key-a"), created.id) is not None
    finally:
        store.close()
    assert not (tmp_path / "jobs" / "jobs.db").exists()
