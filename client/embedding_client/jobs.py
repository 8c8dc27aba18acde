"""Batch jobs from the client: a corpus embedded on the service's cluster (Ray Data) rather than through calls.

    with EmbedClient("host:9000", api_key=...) as client:
        job = client.submit_job("s3://bucket/corpus/", input_format="parquet", text_column="text", id_column="id")
        job.wait()                  # a progress bar (tqdm when installed), until the job ends
        job.output_uri              # Parquet: the id column, `embedding` (a fixed-size list), `tokens`

The dataset lies where the service can read it (one of its dataset roots); nothing passes through the client.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

from embedding_client.errors import DeadlineExceeded, Unavailable
from embedding_client.progress import reporter
from embedding_client.v1 import embedding_pb2 as pb

FORMATS = {"jsonl": pb.DATASET_FORMAT_JSONL, "parquet": pb.DATASET_FORMAT_PARQUET}
ENCODINGS = {"float": pb.VECTOR_ENCODING_FLOAT, "int8": pb.VECTOR_ENCODING_INT8, "uint8": pb.VECTOR_ENCODING_UINT8,
             "binary": pb.VECTOR_ENCODING_BINARY, "ubinary": pb.VECTOR_ENCODING_UBINARY}
FINAL = frozenset({pb.JOB_STATUS_COMPLETED, pb.JOB_STATUS_FAILED, pb.JOB_STATUS_CANCELLED, pb.JOB_STATUS_EXPIRED})
# A watch is cut at the service's stream bound (limits.stream_timeout_s): each watch asks for at most this long.
WATCH_S = 600.0


def status_name(status: int) -> str:
    """pb.JOB_STATUS_IN_PROGRESS -> "in_progress" (OpenAI's names)."""
    return pb.JobStatus.Name(status).removeprefix("JOB_STATUS_").lower()


def create_request(input_uri: str, *, input_format: str, model: str = "", text_column: str = "text",
                   id_column: str = "id", dimensions: int | None = None, encoding: str = "float",
                   output_uri: str = "", prompt_name: str = "", metadata: dict[str, str] | None = None,
                   request_id: str | None = None) -> pb.CreateJobRequest:
    """The CreateJob request; `request_id` (default: a new one) makes its retries return the job it made."""
    if input_format not in FORMATS:
        raise ValueError(f"input_format must be one of {sorted(FORMATS)}")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {sorted(ENCODINGS)}")
    return pb.CreateJobRequest(model=model, input_uri=input_uri, input_format=FORMATS[input_format],
                               text_column=text_column, id_column=id_column, dimensions=dimensions,
                               encoding=ENCODINGS[encoding], output_uri=output_uri, prompt_name=prompt_name,
                               metadata=metadata or {}, request_id=request_id or uuid.uuid4().hex)


class JobFailed(Exception):
    """A job that ended failed or expired; `job` is its last state, `job.errors` why."""

    def __init__(self, job: pb.Job) -> None:
        why = "; ".join(f"{e.code}: {e.message}" for e in job.errors) or "no reason recorded"
        super().__init__(f"job {job.id} {status_name(job.status)}: {why}")
        self.job = job


class Job:
    """A job of the calling key: its last known state (`message`), refreshed by refresh(), wait() and cancel()."""

    def __init__(self, client, message: pb.Job) -> None:
        self._client = client  # an EmbedClient (sync.py)
        self.message = message

    def __repr__(self) -> str:
        m = self.message
        return f"Job({m.id}, {status_name(m.status)}, {m.rows_done}/{m.rows_total} rows)"

    @property
    def id(self) -> str:
        return self.message.id

    @property
    def status(self) -> str:
        return status_name(self.message.status)

    @property
    def done(self) -> bool:
        return self.message.status in FINAL

    @property
    def output_uri(self) -> str:
        return self.message.output_uri

    def refresh(self) -> Job:
        self.message = self._client.call("GetJob", pb.GetJobRequest(id=self.id)).job
        return self

    def cancel(self) -> Job:
        """Asks the service to cancel: its pool stops within seconds; the output written so far stays (partial)."""
        self.message = self._client.call("CancelJob", pb.CancelJobRequest(id=self.id)).job
        return self

    def wait(self, timeout_s: float | None = None, progress: bool | Callable[[int, int], None] | None = True,
             check: bool = True) -> Job:
        """Follows the job (WatchJob, opened again when the service's stream bound cuts it) until it ends;
        `progress`: a bar of rows (True), a callback(rows_done, rows_total), or None. Raises JobFailed for a job
        that failed or expired (check=True), TimeoutError past `timeout_s`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        report, finish = reporter(progress, self.message.rows_total, self.message.rows_done, desc=self.id)
        shown = self.message.rows_done
        try:
            while not self.done:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"job {self.id} still {self.status} after {timeout_s} s")
                window = WATCH_S if left is None else min(WATCH_S, left)
                try:
                    for message in self._client.watch_job(self.id, timeout_s=window):
                        self.message = message
                        if message.rows_done > shown:
                            report(message.rows_done - shown, message.rows_total)
                            shown = message.rows_done
                except (DeadlineExceeded, Unavailable):  # the stream's bound, or no target for now: watch again
                    self.refresh()
        finally:
            finish()
        if check and self.message.status in (pb.JOB_STATUS_FAILED, pb.JOB_STATUS_EXPIRED):
            raise JobFailed(self.message)
        return self


def pages(call: Callable[[pb.ListJobsRequest], pb.ListJobsResponse], page_size: int = 20) -> Iterator[pb.Job]:
    """Every job of the calling key, newest first, a page at a time."""
    after = ""
    while True:
        page = call(pb.ListJobsRequest(after=after, limit=page_size))
        yield from page.jobs
        if not page.has_more or not page.jobs:
            return
        after = page.jobs[-1].id
