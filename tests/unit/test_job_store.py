"""The batch jobs' store in real databases: SQLite (a file, the embedded default) and PostgreSQL (a real server from
Debian's package, started here): ownership (another key finds nothing), the bounds per key, paging as OpenAI's
cursor lists page, progress and cancellation that never leave a final status, and retention."""

from __future__ import annotations

import pytest

from embedding_service.config import JobLimits
from embedding_service.jobs.store import FINAL, JobStore, LimitReached, RequestKeyReused, now_ms, owner_of
from tests.helpers import postgres

ALICE, BOB = owner_of("sk-alice"), owner_of("sk-bob")


@pytest.fixture(scope="module")
def postgres_url():
    if postgres.binaries() is None:
        pytest.skip("PostgreSQL's binaries are not installed (Debian's postgresql package)")
    with postgres.running_postgres() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def make_store(store_url):
    stores = []

    def make(**limits) -> JobStore:
        store = JobStore(store_url, JobLimits(**limits))
        stores.append(store)
        return store

    yield make
    for store in stores:
        from sqlalchemy import text

        with store.engine.begin() as connection:  # each test starts from empty tables on the module's server
            connection.execute(text("DELETE FROM batch_jobs"))
            connection.execute(text("DELETE FROM batch_files"))
        store.close()


def test_the_owner_is_a_digest_never_the_key():
    assert owner_of("sk-alice") == ALICE != BOB and "sk-alice" not in ALICE and len(ALICE) == 32


def test_a_job_and_a_file_belong_to_their_key_and_another_key_finds_nothing(make_store):
    store = make_store()
    upload = store.add_file(ALICE, "batch", "in.jsonl", 1234, "files/a")
    job = store.add_job(ALICE, "/v1/embeddings", upload.id, "all-MiniLM-L6-v2", {"team": "search"})
    assert job.status == "validating" and job.job_metadata == {"team": "search"} and job.id.startswith("batch_")
    assert store.file(ALICE, upload.id) == upload and store.job(ALICE, job.id) == job
    assert store.file(BOB, upload.id) is None and store.job(BOB, job.id) is None
    assert store.files(BOB) == ([], False) and store.jobs(BOB) == ([], False)
    assert store.jobs(BOB, after=job.id) == ([], False)  # another's id as a cursor tells nothing either
    assert store.request_cancel(BOB, job.id) is None and store.job(ALICE, job.id).status == "validating"
    assert store.delete_file(BOB, upload.id) is None and store.file(ALICE, upload.id) == upload
    assert store.delete_file(ALICE, upload.id) == upload and store.file(ALICE, upload.id) is None


def test_a_reopened_store_keeps_what_was_written(make_store):
    first = make_store()
    job = first.add_job(ALICE, "/v1/embeddings", "file-x", "m")
    first.update_job(job.id, status="in_progress", total=10, completed=4)
    again = make_store()  # a new engine on the same database: the job manager restarted
    got = again.job(ALICE, job.id)
    assert (got.status, got.total, got.completed) == ("in_progress", 10, 4)


def test_the_bounds_per_key_refuse_with_their_name(make_store):
    store = make_store(max_jobs_per_key=3, max_running_jobs_per_key=2, max_file_bytes=100, max_files_per_key=1)
    with pytest.raises(LimitReached) as caught:
        store.add_file(ALICE, "batch", "big.jsonl", 101, "files/big")
    assert (caught.value.bound, caught.value.limit) == ("max_file_bytes", 100)
    store.add_file(ALICE, "batch", "a.jsonl", 100, "files/a")
    with pytest.raises(LimitReached) as caught:
        store.add_file(ALICE, "batch", "b.jsonl", 1, "files/b")
    assert caught.value.bound == "max_files_per_key"
    store.add_file(BOB, "batch", "b.jsonl", 1, "files/b")  # another key's bound is its own
    first, second = (store.add_job(ALICE, "/v1/embeddings", "f", "m") for _ in range(2))
    with pytest.raises(LimitReached) as caught:
        store.add_job(ALICE, "/v1/embeddings", "f", "m")
    assert caught.value.bound == "max_running_jobs_per_key"
    store.update_job(first.id, status="completed")
    third = store.add_job(ALICE, "/v1/embeddings", "f", "m")  # one running slot freed
    store.update_job(second.id, status="failed")
    store.update_job(third.id, status="cancelled")
    with pytest.raises(LimitReached) as caught:
        store.add_job(ALICE, "/v1/embeddings", "f", "m")
    assert (caught.value.bound, caught.value.limit) == ("max_jobs_per_key", 3)


def test_lists_page_newest_first_by_cursor_as_openais_lists_do(make_store):
    store = make_store(max_running_jobs_per_key=10)
    ids = [store.add_job(ALICE, "/v1/embeddings", "f", "m").id for _ in range(7)]
    store.add_job(BOB, "/v1/embeddings", "f", "m")
    pages, after = [], None
    while True:
        page, more = store.jobs(ALICE, after=after, limit=3)
        pages.append([j.id for j in page])
        if not more:
            break
        after = page[-1].id
    assert [len(p) for p in pages] == [3, 3, 1]
    listed = [i for p in pages for i in p]
    assert sorted(listed) == sorted(ids) and len(set(listed)) == 7  # every job once, none of Bob's
    created = [store.job(ALICE, i).created_at for i in listed]
    assert created == sorted(created, reverse=True)
    with pytest.raises(ValueError):
        store.jobs(ALICE, limit=0)


def test_progress_never_leaves_a_final_status_and_a_cancel_ends_cancelled(make_store):
    store = make_store()
    job = store.add_job(ALICE, "/v1/embeddings", "f", "m")
    store.update_job(job.id, status="in_progress", total=100)
    cancelling = store.request_cancel(ALICE, job.id)
    assert cancelling.status == "cancelling" and cancelling.cancel_requested
    after = store.update_job(job.id, status="in_progress", completed=40)  # a runner that has not seen the cancel yet
    assert after.status == "cancelling" and after.completed == 40
    assert store.update_job(job.id, status="cancelled").status == "cancelled"
    assert store.update_job(job.id, status="in_progress", completed=41).status == "cancelled"  # final stays final
    assert store.request_cancel(ALICE, job.id).status == "cancelled"
    with pytest.raises(ValueError):
        store.update_job(job.id, owner=BOB)  # not a job's progress
    with pytest.raises(ValueError):
        store.update_job(job.id, status="paused")
    assert set(FINAL) == {"completed", "failed", "expired", "cancelled"}


def test_retention_deletes_expired_files_and_final_jobs_only(make_store):
    store = make_store()
    stamp = now_ms()
    old = store.add_file(ALICE, "batch", "old.jsonl", 1, "files/old", expires_at=stamp - 1)
    kept = store.add_file(ALICE, "batch", "kept.jsonl", 1, "files/kept", expires_at=stamp + 60_000)
    done = store.add_job(ALICE, "/v1/embeddings", "f", "m", expires_at=stamp - 1)
    running = store.add_job(ALICE, "/v1/embeddings", "f", "m", expires_at=stamp - 1)
    store.update_job(done.id, status="completed")
    store.update_job(running.id, status="in_progress")
    files, jobs = store.expire(now=stamp)
    assert [f.id for f in files] == [old.id] and [j.id for j in jobs] == [done.id]
    assert store.file(ALICE, kept.id) is not None and store.job(ALICE, running.id) is not None
    assert store.file(ALICE, old.id) is None and store.job(ALICE, done.id) is None


def test_a_create_sent_again_with_its_key_returns_the_job_it_made(make_store):
    store = make_store(max_running_jobs_per_key=1)
    first = store.add_job(ALICE, "dataset", "", "m", request_key="create-1")
    # The running bound is full, yet the same create sent again is answered: it makes nothing.
    again = store.add_job(ALICE, "dataset", "", "m", request_key="create-1")
    assert again.id == first.id
    with pytest.raises(LimitReached):
        store.add_job(ALICE, "dataset", "", "m", request_key="create-2")
    # Another key's create with the same id is its own.
    theirs = store.add_job(BOB, "dataset", "", "m", request_key="create-1")
    assert theirs.id != first.id and store.job(BOB, first.id) is None
    assert [j.id for j in store.jobs(ALICE)[0]] == [first.id]
    store.update_job(first.id, status="completed")
    assert store.add_job(ALICE, "dataset", "", "m").id != first.id  # no key: a new job each time


def test_a_key_sent_again_with_another_request_is_refused(make_store):
    """A key names one request: sent with other parameters it is refused (never another job's answer), while the
    same create sent again still gets its job once its runner set the batch's model."""
    store = make_store()
    spec = {"source": "dataset", "model": "m", "input_uri": "/data/a.parquet"}
    first = store.add_job(ALICE, "dataset", "", "m", {"team": "a"}, spec=spec, request_key="k")
    store.update_job(first.id, model="m2", status="in_progress")
    assert store.add_job(ALICE, "dataset", "", "m", {"team": "a"}, spec=spec, request_key="k").id == first.id
    for other in ({"spec": {**spec, "input_uri": "/data/b.parquet"}}, {"metadata": {"team": "b"}, "spec": spec}):
        with pytest.raises(RequestKeyReused) as reused:
            store.add_job(ALICE, "dataset", "", "m", other.get("metadata", {"team": "a"}), spec=other["spec"],
                          request_key="k")
        assert reused.value.job_id == first.id
    with pytest.raises(RequestKeyReused):
        store.add_job(ALICE, "/v1/embeddings", "file-x", "", {"team": "a"}, spec=spec, request_key="k")
    assert [j.id for j in store.jobs(ALICE)[0]] == [first.id]


def test_a_store_of_the_release_before_idempotency_keys_gains_them(store_url):
    """A store that outlived an upgrade (PostgreSQL, or SQLite under the storage root) has batch_jobs without
    request_key: opened, it gains the column and its uniqueness, and keeps its jobs."""
    from sqlalchemy import MetaData, Table, create_engine, text

    from embedding_service.jobs.store import _JobRow

    engine = create_engine(store_url)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS batch_jobs"))
    before = MetaData()
    Table("batch_jobs", before, *[c._copy() for c in _JobRow.__table__.columns if c.name != "request_key"])
    before.create_all(engine)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO batch_jobs (id, owner, endpoint, input_file_id, model, spec, status, "
                                "created_at, updated_at, job_metadata, total, completed, failed, errors, "
                                "cancel_requested, rows_per_s, times) VALUES ('batch_old', :owner, 'dataset', '', "
                                "'m', '{}', 'completed', 1, 1, '{}', 0, 0, 0, '[]', false, 0, '{}')"),
                           {"owner": ALICE})
    engine.dispose()
    store = JobStore(store_url)
    try:
        assert store.job(ALICE, "batch_old").status == "completed"
        first = store.add_job(ALICE, "dataset", "", "m", request_key="k")
        assert store.add_job(ALICE, "dataset", "", "m", request_key="k").id == first.id
        JobStore(store_url).close()  # opened again: nothing left to add
    finally:
        with store.engine.begin() as connection:
            connection.execute(text("DELETE FROM batch_jobs"))
        store.close()


def test_a_file_the_service_writes_again_keeps_its_one_record(make_store):
    """A batch's output written again (its runner resumed while finalizing) updates its record: the owner never
    lists two records of one file."""
    store = make_store()
    first = store.add_output_file(ALICE, "b_output.jsonl", 10, "jobs/b/output.jsonl", 1000)
    again = store.add_output_file(ALICE, "b_output.jsonl", 25, "jobs/b/output.jsonl", 2000)
    assert again.id == first.id and (again.bytes, again.expires_at) == (25, 2000)
    other = store.add_output_file(BOB, "b_output.jsonl", 5, "jobs/b/output.jsonl", 1000)
    assert other.id != first.id
    assert [f.id for f in store.files(ALICE, purpose="batch_output")[0]] == [first.id]
