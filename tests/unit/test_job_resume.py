"""A batch whose runner was lost while it wrote its output files (finalizing) is resumed by the next runner, which
writes the files again from the pool's output: it neither goes back to in_progress nor runs a pool, so a deadline
passed meanwhile does not expire a batch whose lines are all done. Real SQLite store, real storage root."""

from __future__ import annotations

import time

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedding_service.batch import runner as runner_module
from embedding_service.batch.manager import _past_deadline
from embedding_service.batch.openai_input import Validated
from embedding_service.batch.runner import JobRunner, Paths
from embedding_service.config import JobsSettings, Limits
from embedding_service.jobs.spec import JobSpec, job_folder
from embedding_service.jobs.storage import StorageRoot
from embedding_service.jobs.store import now_ms, open_store, owner_of

OWNER = owner_of("sk-alice")
DONE = [("a", 200, {"object": "list", "data": []}), ("b", 400, {"error": {"message": "bad"}}),
        ("c", 200, {"object": "list", "data": []})]


@pytest.fixture
def finalizing(tmp_path, monkeypatch):
    """A batch past its completion window whose runner died finalizing: its pool's output written, its output file's
    record made, its status not yet completed."""

    def no_pool(*args, **kwargs):
        raise AssertionError("a pool ran for a batch whose lines were all done")

    monkeypatch.setattr(runner_module, "run_pool", no_pool)
    jobs = JobsSettings(storage_root=str(tmp_path / "jobs"))
    store, root = open_store(jobs), StorageRoot.of(jobs)
    spec = JobSpec(source="openai", model="m", input_uri=f"{root.uri}/files/in.jsonl", completion_window_s=0.001)
    job = store.add_job(OWNER, "/v1/embeddings", "file-in", "m", spec=spec.model_dump(mode="json"))
    store.update_job(job.id, status="in_progress", total=len(DONE))
    store.update_job(job.id, status="finalizing")
    paths = Paths(job_folder(root.uri, job.id))
    root.write_chunks(paths.validated, iter([orjson.dumps(Validated(len(DONE), len(DONE), 0, "m").__dict__)]))
    root.filesystem.create_dir(root.path_of(paths.output), recursive=True)
    pq.write_table(pa.table({"row": list(range(len(DONE))), "custom_id": [d[0] for d in DONE],
                             "status_code": pa.array([d[1] for d in DONE], pa.int32()),
                             "body": [orjson.dumps(d[2]).decode() for d in DONE]}),
                   root.path_of(f"{paths.output}/part-0.parquet"))
    store.add_output_file(OWNER, f"{job.id}_output.jsonl", 1, f"{paths.folder}/output.jsonl")  # the lost runner's
    time.sleep(0.01)  # past its deadline
    yield jobs, store, root, store.job_by_id(job.id), paths
    store.close()


def test_a_batch_lost_while_finalizing_resumes_to_completed_past_its_deadline(finalizing):
    jobs, store, root, job, paths = finalizing
    assert not _past_deadline(job, now_ms())  # the manager leaves it to its runner, which it starts again
    assert JobRunner(jobs, {}, Limits(), job.id).run() == "completed"
    done = store.job_by_id(job.id)
    assert (done.status, done.completed, done.failed) == ("completed", 2, 1)
    assert done.times["in_progress"] < done.times["finalizing"] <= done.times["completed"]
    files = {f.id: f for f in store.files(OWNER, limit=100, purpose="batch_output")[0]}
    assert set(files) == {done.output_file_id, done.error_file_id}  # the lost runner's record kept, none added
    output = b"".join(root.read_chunks(files[done.output_file_id].location)).splitlines()
    errors = b"".join(root.read_chunks(files[done.error_file_id].location)).splitlines()
    assert files[done.output_file_id].bytes == sum(len(line) + 1 for line in output)
    assert sorted(orjson.loads(line)["custom_id"] for line in output) == ["a", "c"]
    assert [orjson.loads(line)["response"]["status_code"] for line in errors] == [400]


def test_a_jobs_rows_written_are_its_committed_checkpoints_each_footer_read_once(tmp_path):
    """The runner counts progress each second: committed checkpoints only (a pending one's rows are not written
    yet), each file's footer read once (a long job's count does not reread every file), a file gone uncounted."""
    from embedding_service.batch.pipeline import PENDING, WrittenRows

    root = StorageRoot.open(str(tmp_path / "jobs"))
    folder = f"{root.uri}/checkpoints"
    root.filesystem.create_dir(root.path_of(folder), recursive=True)

    def checkpoint(name: str, rows: int) -> str:
        path = root.path_of(f"{folder}/{name}")
        pq.write_table(pa.table({"id": [f"{name}-{i}" for i in range(rows)]}), path)
        return path

    written = WrittenRows(root, folder)
    assert written.count() == 0
    first = checkpoint("a.parquet", 5)
    checkpoint("b" + PENDING, 7)
    assert written.count() == 5
    with open(first, "wb") as damaged:  # were its footer read again, the count would lose its rows
        damaged.write(b"not parquet")
    checkpoint("c.parquet", 3)
    assert written.count() == 8
    (tmp_path / "jobs" / "checkpoints" / "c.parquet").unlink()
    assert written.count() == 5
