"""OpenAI's Files and Batches routes, as the official SDK calls them: POST/GET /v1/files, GET/DELETE
/v1/files/{id}, GET /v1/files/{id}/content; POST/GET /v1/batches, GET /v1/batches/{id},
POST /v1/batches/{id}/cancel.

They talk to the jobs' store and storage root (embedding_service/jobs/), not to the service over gRPC: the store
is where a batch is created, and the service's job manager starts what it finds there; output files are read
from the storage root as the runner wrote them. Each file and batch belongs to the caller's key (owner_of); another
key's is not found (404). Off (404) unless jobs_storage_root is set.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from embedding_service.jobs.openai_batch import ENDPOINTS
from embedding_service.jobs.spec import JobSpec, deadline_of, metadata_refusal, request_key_refusal
from embedding_service.jobs.storage import StorageRoot
from embedding_service.jobs.store import (
    FileRecord,
    JobRecord,
    JobStore,
    LimitReached,
    RequestKeyReused,
    now_ms,
    owner_of,
    store_url,
)
from embedding_service.wire.bearer import bearer_key
from gateway import errors
from gateway.settings import GatewaySettings
from gateway.uploads import UploadRefused, receive_upload

batches = APIRouter()
UPLOAD_PATH = "/v1/files"


class BatchDesk:
    """The store and storage root, opened on first use (from a thread: both block)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self._opened: tuple[JobStore, StorageRoot] | None = None
        self._lock = asyncio.Lock()

    async def opened(self) -> tuple[JobStore, StorageRoot]:
        settings = self.settings
        if settings.jobs_storage_root is None:
            raise errors.batch_api_off()
        async with self._lock:
            if self._opened is None:
                url = settings.jobs_store_url.get_secret_value() if settings.jobs_store_url else None

                def open_both() -> tuple[JobStore, StorageRoot]:
                    return (JobStore(store_url(settings.jobs_storage_root, url), settings.job_limits),
                            StorageRoot.open(settings.jobs_storage_root, settings.jobs_s3_endpoint))

                self._opened = await asyncio.to_thread(open_both)
        return self._opened

    async def run(self, method, *args):
        store, _ = await self.opened()
        return await asyncio.to_thread(method.__get__(store), *args)


def _desk(request: Request) -> BatchDesk:
    return request.app.state.batches


def _owner(request: Request) -> str:
    """The caller's key (the gateway checked it already; none on a loopback gateway without keys)."""
    return owner_of(bearer_key(request.headers.get("authorization")) or b"")


def _seconds(ms: int | None) -> int | None:
    return None if ms is None else ms // 1000


def _page(data: list[dict], more: bool) -> JSONResponse:
    """OpenAI's cursor page: the SDK asks again `after` the last id while `has_more`."""
    return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                         "last_id": data[-1]["id"] if data else None, "has_more": more})


# ---- files ----------------------------------------------------------------------


def file_object(record: FileRecord) -> dict:
    return {"id": record.id, "object": "file", "bytes": record.bytes, "created_at": _seconds(record.created_at),
            "filename": record.filename, "purpose": record.purpose, "status": "processed",
            "expires_at": _seconds(record.expires_at), "status_details": None}


@batches.post("/v1/files")
async def create_file(request: Request) -> JSONResponse:
    desk = _desk(request)
    store, root = await desk.opened()
    limits = desk.settings.job_limits
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limits.max_file_bytes + 64 * 1024:
        raise errors.file_too_large(limits.max_file_bytes)
    owner = _owner(request)
    location = root.uri_of("files", owner, uuid.uuid4().hex)
    sink = await asyncio.to_thread(root.open_writer, location)
    try:
        try:
            upload = await receive_upload(request.headers.get("content-type", ""), request.stream(),
                                          limits.max_file_bytes, sink)
        finally:
            await asyncio.to_thread(sink.close)
        if upload.purpose != "batch":
            raise errors.invalid_request("purpose must be batch (the files this gateway keeps are batch input)",
                                         "purpose")
        expires = now_ms() + int(desk.settings.files_retention_s * 1000)
        record = await asyncio.to_thread(store.add_file, owner, "batch", upload.filename, upload.size, location,
                                         expires)
    except UploadRefused as refused:
        await asyncio.to_thread(root.delete, location)
        raise refused.error from None
    except LimitReached as reached:
        await asyncio.to_thread(root.delete, location)
        raise errors.key_bound_reached(reached.bound, reached.limit) from None
    except BaseException:
        await asyncio.to_thread(root.delete, location)
        raise
    return JSONResponse(file_object(record))


@batches.get("/v1/files")
async def list_files(request: Request, after: str | None = None, limit: int = Query(10000, ge=1, le=10000),
                     purpose: str | None = None) -> JSONResponse:
    records, more = await _desk(request).run(JobStore.files, _owner(request), after, limit, purpose)
    return _page([file_object(r) for r in records], more)


async def _file(request: Request, file_id: str) -> FileRecord:
    record = await _desk(request).run(JobStore.file, _owner(request), file_id)
    if record is None:
        raise errors.no_such_object("file", file_id)
    return record


@batches.get("/v1/files/{file_id}")
async def retrieve_file(request: Request, file_id: str) -> JSONResponse:
    return JSONResponse(file_object(await _file(request, file_id)))


@batches.get("/v1/files/{file_id}/content")
async def file_content(request: Request, file_id: str) -> StreamingResponse:
    record = await _file(request, file_id)
    _, root = await _desk(request).opened()

    async def chunks() -> AsyncIterator[bytes]:
        stream = await asyncio.to_thread(root.filesystem.open_input_stream, root.path_of(record.location))
        try:
            while block := await asyncio.to_thread(stream.read, 1 << 20):
                yield block
        finally:
            await asyncio.to_thread(stream.close)

    return StreamingResponse(chunks(), media_type="application/octet-stream",
                             headers={"content-length": str(record.bytes)})


@batches.delete("/v1/files/{file_id}")
async def delete_file(request: Request, file_id: str) -> JSONResponse:
    desk = _desk(request)
    record = await desk.run(JobStore.delete_file, _owner(request), file_id)
    if record is None:
        raise errors.no_such_object("file", file_id)
    _, root = await desk.opened()
    await asyncio.to_thread(root.delete, record.location)
    return JSONResponse({"id": record.id, "object": "file", "deleted": True})


# ---- batches ----------------------------------------------------------------------


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: StrictStr
    endpoint: StrictStr
    completion_window: Literal["24h"]
    metadata: dict[StrictStr, StrictStr] | None = Field(None)


def batch_object(record: JobRecord) -> dict:
    times = record.times or {}
    errors_data = {"object": "list", "data": record.errors} if record.errors else None
    body: dict[str, Any] = {
        "id": record.id, "object": "batch", "endpoint": record.endpoint, "errors": errors_data,
        "input_file_id": record.input_file_id, "completion_window": "24h", "status": record.status,
        "output_file_id": record.output_file_id, "error_file_id": record.error_file_id,
        "created_at": _seconds(record.created_at),
        "in_progress_at": _seconds(times.get("in_progress")),
        "expires_at": _seconds(deadline_of(record.spec, record.created_at)),
        "finalizing_at": _seconds(times.get("finalizing")), "completed_at": _seconds(times.get("completed")),
        "failed_at": _seconds(times.get("failed")), "expired_at": _seconds(times.get("expired")),
        "cancelling_at": _seconds(times.get("cancelling")), "cancelled_at": _seconds(times.get("cancelled")),
        "request_counts": {"total": record.total, "completed": record.completed, "failed": record.failed},
        "metadata": record.job_metadata or None,
    }
    if record.model:
        body["model"] = record.model
    return body


@batches.post("/v1/batches")
async def create_batch(request: Request) -> JSONResponse:
    try:
        body = CreateBatch.model_validate_json(await request.body())
    except ValueError as error:
        raise errors.invalid_request(f"invalid batch request: {error}") from None
    if body.endpoint not in ENDPOINTS:
        raise errors.invalid_request(f"endpoint must be one of {', '.join(ENDPOINTS)}", "endpoint",
                                     "invalid_endpoint")
    metadata = body.metadata or {}
    refusal = metadata_refusal(metadata)
    if refusal is not None:
        raise errors.invalid_request(refusal, "metadata")
    owner = _owner(request)
    desk = _desk(request)
    source = await desk.run(JobStore.file, owner, body.input_file_id)
    if source is None:
        raise errors.no_such_object("file", body.input_file_id)
    if source.purpose != "batch":
        raise errors.invalid_request("input_file_id must name a file uploaded with purpose batch", "input_file_id")
    spec = JobSpec(source="openai", model="", input_uri=source.location, endpoint=body.endpoint,
                   completion_window_s=desk.settings.batch_completion_window_s)
    # Stripe's and OpenAI's header: a create sent again with the same key returns the batch the first made.
    request_key = request.headers.get("idempotency-key") or None
    refusal = request_key_refusal(request_key, "Idempotency-Key")
    if refusal is not None:
        raise errors.invalid_request(refusal)
    try:
        record = await desk.run(JobStore.add_job, owner, body.endpoint, source.id, "", metadata, None,
                                spec.model_dump(), request_key)
    except RequestKeyReused as reused:
        raise errors.idempotency_key_reused(reused.job_id) from None
    except LimitReached as reached:
        raise errors.key_bound_reached(reached.bound, reached.limit) from None
    return JSONResponse(batch_object(record))


@batches.get("/v1/batches/{batch_id}")
async def retrieve_batch(request: Request, batch_id: str) -> JSONResponse:
    record = await _desk(request).run(JobStore.job, _owner(request), batch_id)
    if record is None:
        raise errors.no_such_object("batch", batch_id)
    return JSONResponse(batch_object(record))


@batches.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(request: Request, batch_id: str) -> JSONResponse:
    record = await _desk(request).run(JobStore.request_cancel, _owner(request), batch_id)
    if record is None:
        raise errors.no_such_object("batch", batch_id)
    return JSONResponse(batch_object(record))


@batches.get("/v1/batches")
async def list_batches(request: Request, after: str | None = None,
                       limit: int = Query(20, ge=1, le=100)) -> JSONResponse:
    records, more = await _desk(request).run(JobStore.jobs, _owner(request), after, limit)
    return _page([batch_object(r) for r in records], more)
