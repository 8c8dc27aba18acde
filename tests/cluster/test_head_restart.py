"""A batch job outlives its head: the run command's whole Ray (its head: GCS, raylet, the job's detached runner and
pool, the Serve application with the job manager) killed outright mid-job, as a head pod dies, and started again
from the same config file. What a head keeps across that on a cluster (the store in PostgreSQL, the files in S3)
is here the storage root's folder and its SQLite store. The new manager finds the job in progress without a
runner and starts one, and Ray Data's checkpoints resume it from the rows written: every row once, and the first
run's files kept (never from zero)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from embedding_client.v1 import embedding_pb2 as pb
from embedding_client.v1 import embedding_pb2_grpc
from embedding_service.batch.pipeline import PENDING
from embedding_service.jobs.spec import job_folder
from tests.helpers.models import TINY
from tests.helpers.observe import wait_until
from tests.helpers.run_command import bearer, own_environment
from tests.helpers.session import one_model_config
from tests.helpers.texts import make_texts

KEYS_ENV = "EMBEDDING_TEST_HEAD_KEYS"
KEY = "head-restart-key"
ROWS = 30_000


def _start(config_path: Path, log: Path, env: dict) -> subprocess.Popen:
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "embedding_service", "run", "--config", str(config_path),
                                    "--no-gateway"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    wait_until(lambda: "embedding service ready" in log.read_text(errors="replace") or process.poll() is not None,
               240, "the run command ready")
    assert process.poll() is None, log.read_text(errors="replace")[-4000:]
    return process


def _kill_head(process: subprocess.Popen) -> None:
    """Every process of the run command's Ray, killed at once without a word (SIGKILL): nothing of it drains,
    cancels or writes on its way out."""
    try:
        root = psutil.Process(process.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:  # killed already
        return
    for member in tree:
        try:
            member.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)
    process.wait(timeout=30)




@pytest.fixture
def head(tmp_path, tiny_model_dir):
    config, grpc_port = one_model_config(tiny_model_dir, num_cpus=0.5)
    args = config["applications"][0]["args"]
    args["auth"] = {"api_keys_env": KEYS_ENV}
    # One node of 2 CPUs: the replica's half, the pool's actor on none, and room for what a resumed job's Ray Data
    # runs (its 1-CPU checkpoint filter, the reads and writes).
    args["jobs"] = {"storage_root": str(tmp_path / "jobs"), "dataset_roots": [str(tmp_path / "datasets")],
                    "num_cpus_per_actor": 0, "min_actors": 1, "max_actors": 1, "rows_per_batch": 64,
                    "block_bytes": 256 * 1024, "poll_s": 0.5}
    config_path = tmp_path / "serve-config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = own_environment(**{KEYS_ENV: KEY})
    running: list[subprocess.Popen] = []

    def start(name: str) -> subprocess.Popen:
        running.append(_start(config_path, tmp_path / f"{name}.log", env))
        return running[-1]

    try:
        yield start, f"127.0.0.1:{grpc_port}", tmp_path
    finally:  # nothing to drain: what the test proves is a head killed outright
        for process in running:
            _kill_head(process)


def test_a_job_resumes_from_its_rows_written_when_its_head_is_killed_and_started_again(head, reference_models):
    start, target, folder = head
    texts = make_texts(ROWS, seed=8, max_words=30)
    dataset = folder / "datasets" / "corpus.parquet"
    dataset.parent.mkdir(parents=True)
    pq.write_table(pa.table({"doc_id": [f"d{i}" for i in range(ROWS)], "body": texts}), dataset, row_group_size=200)
    output = folder / "datasets" / "out"

    first = start("first")
    stub = embedding_pb2_grpc.EmbedServiceStub(grpc.insecure_channel(target))
    job = stub.CreateJob(pb.CreateJobRequest(
        model=TINY, input_uri=str(dataset), input_format=pb.DATASET_FORMAT_PARQUET, text_column="body",
        id_column="doc_id", output_uri=str(output)), metadata=bearer(KEY), timeout=60).job

    def progress(channel_stub=None) -> pb.Job:
        return (channel_stub or stub).GetJob(pb.GetJobRequest(id=job.id), metadata=bearer(KEY), timeout=30).job

    wait_until(lambda: progress().rows_done > 0, 180, "rows written")
    _kill_head(first)
    # What the first head wrote: its data files, and the rows its committed checkpoints hold (a data file whose
    # checkpoint it left pending is deleted on resume, and written again).
    written = {p.name: p.stat().st_mtime_ns for p in output.glob("*.parquet")}
    checkpoints = Path(job_folder(str(folder / "jobs"), job.id)) / "checkpoints"
    done_before = sum(pq.read_metadata(c).num_rows for c in checkpoints.glob("*.parquet")
                      if not c.name.endswith(PENDING))
    assert 0 < done_before < ROWS, "the head was killed mid-job"

    restarted = start("second")
    stub = embedding_pb2_grpc.EmbedServiceStub(grpc.insecure_channel(target))
    seen = []

    def finished() -> bool:
        now = progress(stub)
        seen.append(now.rows_done)
        return now.status in (pb.JOB_STATUS_COMPLETED, pb.JOB_STATUS_FAILED, pb.JOB_STATUS_CANCELLED)

    wait_until(finished, 240, "the job finished on the new head")
    done = progress(stub)
    assert done.status == pb.JOB_STATUS_COMPLETED, done.errors
    assert (done.rows_total, done.rows_done) == (ROWS, ROWS)
    # Resumed, not begun again: the new head's progress never went below what the first had committed, and of the
    # first head's data files, those that hold its committed rows are still there, unchanged.
    assert min(seen) >= done_before > 0
    kept = [name for name, stamp in written.items()
            if (output / name).exists() and (output / name).stat().st_mtime_ns == stamp]
    assert sum(pq.read_metadata(output / name).num_rows for name in kept) >= done_before
    table = pq.read_table(output)
    ids = table.column("doc_id").to_pylist()
    assert len(ids) == ROWS and set(ids) == {f"d{i}" for i in range(ROWS)}  # each row once
    order = np.array([int(i[1:]) for i in ids])
    sample = np.random.default_rng(1).choice(ROWS, 64, replace=False)
    expected = reference_models[TINY].encode([texts[k] for k in order[sample]], normalize_embeddings=True)
    np.testing.assert_allclose(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)[sample]), expected,
                               atol=1e-5)
    assert restarted.poll() is None
