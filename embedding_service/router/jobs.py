"""The batch jobs' gRPC methods, answered in the router from the jobs' store (CreateJob, GetJob, ListJobs,
CancelJob, WatchJob). The router only writes and reads the store: the job manager (batch/manager.py) starts
what it finds there, so these calls cost the router a database round trip, never a Ray call.

Every job belongs to its caller's key (jobs/store.py owner_of; a caller may name a tenant of its own with the
`embedding-tenant` metadata, as the gateway does for its callers): another key's job is not found.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.config import AppArgs, JobsSettings
from embedding_service.jobs.spec import JobSpec, metadata_refusal, output_of, request_key_refusal
from embedding_service.jobs.storage import within
from embedding_service.jobs.store import (
    FINAL,
    JobRecord,
    JobStore,
    LimitReached,
    RequestKeyReused,
    open_store,
    owner_of,
)
from embedding_service.router.validation import check_kind, resolve_model_name
from embedding_service.wire.auth import given_key
from embedding_service.wire.reasons import Reason, ServiceError

TENANT_METADATA = "embedding-tenant"
MAX_PAGE, DEFAULT_PAGE = 100, 20
WATCH_POLL_S = 0.5
FORMATS = {pb.DATASET_FORMAT_JSONL: "jsonl", pb.DATASET_FORMAT_PARQUET: "parquet"}
ENCODINGS = {pb.VECTOR_ENCODING_UNSPECIFIED: "float", pb.VECTOR_ENCODING_FLOAT: "float",
             pb.VECTOR_ENCODING_FLOAT32_LE: "float", pb.VECTOR_ENCODING_INT8: "int8",
             pb.VECTOR_ENCODING_UINT8: "uint8", pb.VECTOR_ENCODING_BINARY: "binary",
             pb.VECTOR_ENCODING_UBINARY: "ubinary"}
STATUSES = {name: pb.JobStatus.Value(f"JOB_STATUS_{name.upper()}") for name in
            ("validating", "in_progress", "finalizing", "cancelling", "completed", "failed", "expired", "cancelled")}


def caller_owner(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The owner of a call's jobs: its key (none: the loopback caller of a service without keys) and the tenant it
    names."""
    pairs = list(metadata or ())
    tenant = next((v for k, v in pairs if k == TENANT_METADATA), "")
    return owner_of(given_key(pairs) or b"", tenant)


def _invalid(message: str, field: str) -> ServiceError:
    return ServiceError(Reason.INVALID_JOB, message, field=field)


def _not_found(job_id: str) -> ServiceError:
    return ServiceError(Reason.JOB_NOT_FOUND, f"no job {job_id!r} of this key", job=job_id)


class JobDesk:
    def __init__(self, args: AppArgs) -> None:
        self.args = args
        self.settings: JobsSettings | None = args.jobs
        self._store: JobStore | None = None
        self._opening = asyncio.Lock()

    async def store(self) -> JobStore:
        if self.settings is None:
            raise ServiceError(Reason.JOBS_DISABLED, "batch jobs are not configured on this service (args.jobs)")
        async with self._opening:
            if self._store is None:
                self._store = await asyncio.to_thread(open_store, self.settings)
        return self._store

    async def create(self, request: pb.CreateJobRequest, owner: str, names: list[str], info) -> pb.Job:
        """`info(name)`: the model's ModelInfo (its dimension and prompts)."""
        store = await self.store()
        name = resolve_model_name(request.model, names, self.args.default_of("embedding"), "embedding")
        check_kind(name, self.args.model(name).kind, "embedding", "CreateJob")
        model = await info(name)
        spec = self._spec(request, name, model)
        metadata = dict(request.metadata)
        refusal = metadata_refusal(metadata)
        if refusal is not None:
            raise _invalid(refusal, "metadata")
        refusal = request_key_refusal(request.request_id, "request_id")
        if refusal is not None:
            raise _invalid(refusal, "request_id")
        try:
            record = await asyncio.to_thread(store.add_job, owner, "dataset", "", name, metadata, None,
                                             spec.model_dump(), request.request_id)
        except RequestKeyReused as reused:
            raise ServiceError(Reason.REQUEST_ID_REUSED, f"request_id was sent before with other parameters (job "
                               f"{reused.job_id}); a new job needs a new request_id", job=reused.job_id) from None
        except LimitReached as reached:
            raise ServiceError(Reason.JOB_LIMIT_REACHED, f"this key holds as many jobs as args.jobs.limits."
                               f"{reached.bound} allows ({reached.limit})", bound=reached.bound,
                               limit=reached.limit) from None
        return self.message(record)

    def _spec(self, request: pb.CreateJobRequest, name: str, model) -> JobSpec:
        roots = self.settings.dataset_roots
        if not request.input_uri:
            raise _invalid("input_uri is required: the dataset's file or folder", "input_uri")
        if not within(request.input_uri, roots):
            raise ServiceError(Reason.DATASET_NOT_ALLOWED, "input_uri lies outside the service's dataset roots "
                               "(args.jobs.dataset_roots)", field="input_uri")
        if request.output_uri and not within(request.output_uri, roots):
            raise ServiceError(Reason.DATASET_NOT_ALLOWED, "output_uri lies outside the service's dataset roots "
                               "(args.jobs.dataset_roots)", field="output_uri")
        if request.input_format not in FORMATS:
            raise _invalid("input_format must be DATASET_FORMAT_JSONL or DATASET_FORMAT_PARQUET", "input_format")
        if request.encoding not in ENCODINGS:
            raise _invalid("encoding must be a VectorEncoding", "encoding")
        if request.HasField("dimensions") and not 1 <= request.dimensions <= model.dimension:
            raise _invalid(f"dimensions must be 1 to the model's {model.dimension}", "dimensions")
        if request.prompt_name and request.prompt_name not in model.prompts:
            raise _invalid(f"model {name!r} has no prompt {request.prompt_name!r} (its prompts: "
                           f"{sorted(model.prompts)})", "prompt_name")
        for field in ("text_column", "id_column"):
            if len(getattr(request, field)) > 256:
                raise _invalid(f"{field} is longer than 256 characters", field)
        return JobSpec(source="dataset", model=name, input_uri=request.input_uri,
                       input_format=FORMATS[request.input_format], text_column=request.text_column or "text",
                       id_column=request.id_column or "id",
                       dimensions=request.dimensions if request.HasField("dimensions") else None,
                       encoding=ENCODINGS[request.encoding], prompt_name=request.prompt_name or None,
                       output_uri=request.output_uri)

    def message(self, record: JobRecord) -> pb.Job:
        return job_message(record, self.settings.storage_root)

    async def get(self, job_id: str, owner: str) -> pb.Job:
        store = await self.store()
        record = await asyncio.to_thread(store.job, owner, job_id)
        if record is None:
            raise _not_found(job_id)
        return self.message(record)

    async def list(self, request: pb.ListJobsRequest, owner: str) -> pb.ListJobsResponse:
        store = await self.store()
        if request.limit > MAX_PAGE:
            raise _invalid(f"limit must be at most {MAX_PAGE}", "limit")
        records, more = await asyncio.to_thread(store.jobs, owner, request.after or None,
                                                request.limit or DEFAULT_PAGE)
        return pb.ListJobsResponse(jobs=[self.message(r) for r in records], has_more=more)

    async def cancel(self, job_id: str, owner: str) -> pb.Job:
        store = await self.store()
        record = await asyncio.to_thread(store.request_cancel, owner, job_id)
        if record is None:
            raise _not_found(job_id)
        return self.message(record)

    async def watch(self, job_id: str, owner: str) -> AsyncIterator[pb.Job]:
        store = await self.store()
        last = None
        while True:
            record = await asyncio.to_thread(store.job, owner, job_id)
            if record is None:
                raise _not_found(job_id)
            seen = (record.status, record.total, record.completed, record.failed)
            if seen != last:
                last = seen
                yield self.message(record)
            if record.status in FINAL:
                return
            await asyncio.sleep(WATCH_POLL_S)


def job_message(record: JobRecord, storage_uri: str) -> pb.Job:
    spec = record.spec or {}
    errors = [pb.JobError(code=str(e.get("code") or ""), message=str(e.get("message") or ""),
                          line=e["line"]) if e.get("line") is not None else
              pb.JobError(code=str(e.get("code") or ""), message=str(e.get("message") or ""))
              for e in record.errors]
    return pb.Job(
        id=record.id, status=STATUSES[record.status], model=record.model,
        input_uri=spec.get("input_uri", "") if spec.get("source") == "dataset" else record.input_file_id,
        output_uri=output_of(spec, storage_uri, record.id), rows_total=record.total, rows_done=record.completed,
        rows_failed=record.failed, rows_per_second=record.rows_per_s, created_at_ms=record.created_at,
        status_times_ms=record.times, errors=errors, partial=record.status == "cancelled",
        metadata={str(k): str(v) for k, v in record.job_metadata.items()}, expires_at_ms=record.expires_at or 0)
