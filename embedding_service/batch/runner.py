"""A job's runner: a detached, named Ray actor per running job, the driver of its Ray Data pipeline.

Why an actor of its own (not the job manager's replica, not a Ray job): Ray Data's context is per process (the
checkpoint config is set on it before the read), so one process per job keeps jobs apart; the manager's replica
can be restarted by Serve without stopping a job; and it needs no Ray Jobs API (the dashboard is optional). Its
state is the store and the storage root only, so whatever stops it (the manager's cancel, its node lost, the head
restarted) leaves a job that the manager starts again, and Ray Data's checkpoints resume it from what was written.

    validating (an OpenAI file: checked, made Parquet; openai_input.py)
      -> in_progress (the pool: pipeline.py; rows written and rows/s to the store every second)
      -> finalizing (an OpenAI batch's output and error files, line for line)
      -> completed | failed (the first failing block's error, in errors)
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass

import orjson
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from embedding_service.batch.openai_input import Validated, lines_of, validate
from embedding_service.batch.pipeline import Plan, WrittenRows, rows_written, run_pool
from embedding_service.config import JobsSettings, Limits, ModelSettings
from embedding_service.jobs.openai_batch import KIND_OF_ENDPOINT, FileRefused, result_line
from embedding_service.jobs.spec import JobSpec, job_folder, output_of
from embedding_service.jobs.storage import StorageRoot, filesystem_for
from embedding_service.jobs.store import JobRecord, JobStore, now_ms, open_store
from embedding_service.observability.logs import service_logger

logger = service_logger(__name__)

NAMESPACE = "embedding-jobs"
PROGRESS_S = 1.0
PARTIAL_MARKER = "_PARTIAL"
MAX_ERROR_CHARS = 2000
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def runner_name(job_id: str) -> str:
    return f"embedding-job-{job_id}"


@dataclass(frozen=True)
class Paths:
    """A job's own files under the storage root."""

    folder: str

    @property
    def runnable(self) -> str:
        return f"{self.folder}/input.parquet"

    @property
    def refused(self) -> str:
        return f"{self.folder}/refused-lines.jsonl"

    @property
    def validated(self) -> str:
        return f"{self.folder}/validated.json"

    @property
    def output(self) -> str:
        return f"{self.folder}/output"

    @property
    def checkpoints(self) -> str:
        return f"{self.folder}/checkpoints"


def failure(error: BaseException) -> dict:
    """OpenAI's errors.data entry for a failed job: the innermost cause (a block's UDF error, under Ray's
    wrappers), without Ray's traceback."""
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        error = getattr(error, "cause", None) or error.__cause__
    own = next((e for e in reversed(seen) if not type(e).__module__.startswith("ray.")), None)
    # A block's own error says it on its first line (Ray Data appends its retry advice below); a Ray error, last.
    root, line = (own, 0) if own is not None else (seen[-1], -1)
    lines = [text for text in str(root).splitlines() if text.strip()]
    message = f"{type(root).__name__}: {lines[line] if lines else ''}"
    return {"code": "job_failed", "message": ANSI.sub("", message)[:MAX_ERROR_CHARS], "param": None, "line": None}


class JobRunner:
    def __init__(self, jobs: JobsSettings, models: dict[str, ModelSettings], calls: Limits, job_id: str) -> None:
        """`calls`: the service's bounds on one call (args.limits), which an OpenAI batch's lines keep too."""
        self.jobs, self.models, self.calls, self.job_id = jobs, models, calls, job_id

    def run(self) -> str:
        """Runs the job to a final status (or until it is killed); the status."""
        store, root = open_store(self.jobs), StorageRoot.of(self.jobs)
        try:
            return self._run(store, root)
        except Exception as error:  # the job fails with its cause; the runner itself stays sound
            logger.warning("job %s failed: %s", self.job_id, error)
            store.update_job(self.job_id, status="failed", errors=[failure(error)])
            return "failed"
        finally:
            store.close()

    def _run(self, store: JobStore, root: StorageRoot) -> str:
        job = store.job_by_id(self.job_id)
        if job is None:
            return "gone"
        spec = JobSpec.model_validate(job.spec)
        paths = Paths(job_folder(root.uri, job.id))
        if spec.source == "openai":
            return self._run_openai(store, root, job, spec, paths)
        total = count_rows(spec, self.jobs.s3_endpoint)
        store.update_job(job.id, status="in_progress", total=total)
        plan = Plan(spec.input_uri, spec.input_format, spec.id_column, output_of(spec, root.uri, job.id),
                    paths.checkpoints)
        done = self._pool(store, root, job, spec, self.models[spec.model], plan)
        return store.update_job(job.id, status="completed", completed=done, rows_per_s=0.0,
                                expires_at=now_ms() + int(self.jobs.retention_s * 1000)).status

    def _run_openai(self, store: JobStore, root: StorageRoot, job: JobRecord, spec: JobSpec, paths: Paths) -> str:
        # A runner lost while finalizing had done every line: its successor writes the files again, and neither
        # goes back to in_progress (which its deadline would then expire) nor starts a pool.
        if job.status != "finalizing":
            checked = self._validated(store, root, job, spec, paths)
            if checked is None:
                return "failed"
            store.update_job(job.id, status="in_progress", total=checked.total, failed=checked.refused,
                             model=checked.model)
            if checked.runnable:
                spec = spec.model_copy(update={"model": checked.model})
                plan = Plan(paths.runnable, "parquet", "row", paths.output, paths.checkpoints)
                self._pool(store, root, job, spec, self.models[checked.model], plan, checked.refused)
            store.update_job(job.id, status="finalizing")
        return finish_openai(store, root, store.job_by_id(job.id), paths, "completed", self.jobs.retention_s).status

    def _validated(self, store: JobStore, root: StorageRoot, job: JobRecord, spec: JobSpec,
                   paths: Paths) -> Validated | None:
        """The file's check, done once: a resumed job reads what the first run found."""
        found = read_validated(root, paths)
        if found is not None:
            return found
        kind = KIND_OF_ENDPOINT[spec.endpoint]
        served = frozenset(name for name, m in self.models.items() if m.kind == kind)
        try:
            checked = validate(root, spec.input_uri, paths.runnable, paths.refused, spec.endpoint, self.jobs.limits,
                               self.calls, served)
        except FileRefused as refused:
            store.update_job(job.id, status="failed", errors=[refused.data])
            return None
        root.write_chunks(paths.validated, iter([orjson.dumps(checked.__dict__)]))
        return checked

    def _pool(self, store: JobStore, root: StorageRoot, job: JobRecord, spec: JobSpec, model: ModelSettings,
              plan: Plan, failed: int = 0) -> int:
        """Runs the pipeline in a thread while the store learns its progress each second; the rows written."""
        outcome: list[BaseException | None] = []

        def pool() -> None:
            try:
                run_pool(runner_name(job.id), spec, model, self.jobs, self.calls, root, plan)
                outcome.append(None)
            except BaseException as error:  # handed to the runner's thread
                outcome.append(error)

        thread = threading.Thread(target=pool, name=f"job-{job.id}", daemon=True)
        written = WrittenRows(root, plan.checkpoint_uri)
        started, first = time.monotonic(), written.count()
        thread.start()
        while thread.is_alive():
            thread.join(PROGRESS_S)
            done = written.count()
            rate = (done - first) / max(time.monotonic() - started, 1e-9)
            store.update_job(job.id, completed=done, rows_per_s=round(rate, 3))
        if outcome and outcome[0] is not None:
            raise outcome[0]
        return written.count()


def count_rows(spec: JobSpec, s3_endpoint: str | None) -> int:
    """A dataset's rows: Parquet footers, or the lines of JSONL files (read as a stream)."""
    fs, path = filesystem_for(spec.input_uri, s3_endpoint)
    if fs.get_file_info(path).type == pafs.FileType.File:
        paths = [path]
    else:
        selector = pafs.FileSelector(path, recursive=True)
        paths = sorted(i.path for i in fs.get_file_info(selector) if i.type == pafs.FileType.File)
    if spec.input_format == "parquet":
        return sum(pq.read_metadata(p, filesystem=fs).num_rows for p in paths if p.endswith(".parquet"))
    total = 0
    for one in paths:
        with fs.open_input_stream(one) as stream:
            total += sum(1 for _ in lines_of(iter(lambda s=stream: s.read(1 << 20), b"")))
    return total


def read_validated(root: StorageRoot, paths: Paths) -> Validated | None:
    """What a job's file check found, when it ran already (a resumed job does not check again)."""
    if not root.exists(paths.validated):
        return None
    return Validated(**orjson.loads(b"".join(root.read_chunks(paths.validated))))


def finish_openai(store: JobStore, root: StorageRoot, job: JobRecord, paths: Paths, status: str,
                  retention_s: float) -> JobRecord:
    """Writes an OpenAI batch's output and error files from what the pool wrote (all of it, or what a cancelled
    job had written) and ends the job in `status`."""
    fs = root.filesystem
    fs.create_dir(root.path_of(paths.folder), recursive=True)  # a batch stopped before its runner ever ran has none
    out_uri, err_uri = f"{paths.folder}/output.jsonl", f"{paths.folder}/errors.jsonl"
    ok = bad = 0
    with fs.open_output_stream(root.path_of(out_uri)) as out, fs.open_output_stream(root.path_of(err_uri)) as err:
        if root.exists(paths.refused):
            for chunk in root.read_chunks(paths.refused):
                err.write(chunk)
        for path in root.listing(paths.output, ".parquet"):
            try:
                parquet = pq.ParquetFile(path, filesystem=fs)
            except (OSError, ValueError):  # a file a cancelled job left half written
                continue
            for batch in parquet.iter_batches(columns=["custom_id", "status_code", "body"]):
                for custom_id, code, body in zip(*(c.to_pylist() for c in batch.columns)):
                    line = result_line(custom_id, code, orjson.Fragment(body))
                    if 200 <= code < 300:
                        out.write(line)
                        ok += 1
                    else:
                        err.write(line)
                        bad += 1
    validated = read_validated(root, paths)
    refused = validated.refused if validated is not None else 0
    expires = now_ms() + int(retention_s * 1000)
    output_id = store.add_output_file(job.owner, f"{job.id}_output.jsonl", root.size(out_uri), out_uri,
                                      expires).id if ok else None
    error_id = store.add_output_file(job.owner, f"{job.id}_error.jsonl", root.size(err_uri), err_uri,
                                     expires).id if bad + refused else None
    return store.update_job(job.id, status=status, completed=ok, failed=bad + refused, output_file_id=output_id,
                            error_file_id=error_id, rows_per_s=0.0, expires_at=expires)


def finish_stopped(store: JobStore, root: StorageRoot, job: JobRecord, status: str, retention_s: float,
                   s3_endpoint: str | None = None) -> JobRecord:
    """A job's end once its runner is stopped (status cancelled, or expired past its deadline): an OpenAI batch gets
    the output of the lines done; a dataset's output folder gets a _PARTIAL marker (its files hold only some
    rows)."""
    spec = JobSpec.model_validate(job.spec)
    paths = Paths(job_folder(root.uri, job.id))
    if spec.source == "openai":
        return finish_openai(store, root, job, paths, status, retention_s)
    done = rows_written(root, paths.checkpoints)
    fs, folder = filesystem_for(output_of(spec, root.uri, job.id), s3_endpoint)
    fs.create_dir(folder, recursive=True)
    with fs.open_output_stream(f"{folder}/{PARTIAL_MARKER}") as marker:
        marker.write(f"{status}: {done} rows of {job.total} written\n".encode())
    return store.update_job(job.id, status=status, completed=done, rows_per_s=0.0,
                            expires_at=now_ms() + int(retention_s * 1000))
