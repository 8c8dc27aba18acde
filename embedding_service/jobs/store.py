"""The batch jobs' store: jobs and their files, kept in a real database through SQLAlchemy.

SQLite (a file under the storage root) is the embedded default; any SQLAlchemy URL serves where the store must
outlive the head pod (KubeRay replaces the head on an upgrade), PostgreSQL among them (`postgresql+psycopg://...`,
the postgres extra). Only metadata is kept here; a file's bytes lie under the storage root, at its `location`.

Every job and file belongs to the key that created it: its owner, a digest of the key (never the key). Whatever an
owner asks of a job or file of another owner finds nothing, as a missing one does, so a caller learns nothing of
another tenant's data. The bounds on what one owner may keep (jobs in all, jobs running, a file's size) are checked
in the same transaction that adds the row.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import JSON, BigInteger, Boolean, Integer, String, and_, create_engine, delete, func, or_, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

# A job's statuses, as OpenAI's Batch API names them; the last four are final.
STATUSES = ("validating", "in_progress", "finalizing", "cancelling", "completed", "failed", "expired", "cancelled")
FINAL = frozenset({"completed", "failed", "expired", "cancelled"})


class StoreLimits(BaseModel):
    """What one key may keep in the store."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_jobs_per_key: int = Field(1000, ge=1, description="Jobs one key may have in the store, whatever their status "
                                  "(deleted with their retention).")
    max_running_jobs_per_key: int = Field(4, ge=1, description="Jobs of one key not yet in a final status.")
    max_file_bytes: int = Field(200 * 1024 * 1024, ge=1, description="Bytes of one uploaded file (OpenAI's own "
                                "bound for a batch input file is 200 MB).")
    max_files_per_key: int = Field(1000, ge=1, description="Files one key may have in the store.")


class LimitReached(Exception):
    """An owner's bound (StoreLimits) refuses the row: which bound, and its value."""

    def __init__(self, bound: str, limit: int) -> None:
        super().__init__(f"{bound} is {limit}")
        self.bound, self.limit = bound, limit


def owner_of(api_key: str) -> str:
    """The owner a key's jobs and files are kept under: a digest of the key, so the store never holds a key."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:32]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class _Base(DeclarativeBase):
    pass


class _FileRow(_Base):
    __tablename__ = "batch_files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(512))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    location: Mapped[str] = mapped_column(String(2048))


class _JobRow(_Base):
    __tablename__ = "batch_jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(256))
    status: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    updated_at: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    job_metadata: Mapped[dict] = mapped_column(JSON, default=dict)
    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    output_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    errors: Mapped[list] = mapped_column(JSON, default=list)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)


@dataclass(frozen=True)
class FileRecord:
    id: str
    owner: str
    purpose: str
    filename: str
    bytes: int
    created_at: int  # ms since the epoch
    expires_at: int | None
    location: str


@dataclass(frozen=True)
class JobRecord:
    id: str
    owner: str
    endpoint: str
    input_file_id: str
    model: str
    status: str
    created_at: int  # ms since the epoch
    updated_at: int
    expires_at: int | None
    job_metadata: dict = field(default_factory=dict)
    total: int = 0
    completed: int = 0
    failed: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list = field(default_factory=list)
    cancel_requested: bool = False


def _record(cls, row) -> Any:
    return cls(**{f.name: getattr(row, f.name) for f in fields(cls)})


# What the job's runner may change of a job (never its owner, input or creation).
_PROGRESS = frozenset({"status", "total", "completed", "failed", "output_file_id", "error_file_id", "errors",
                       "expires_at"})


class JobStore:
    def __init__(self, url: str, limits: StoreLimits | None = None) -> None:
        """`url`: an SQLAlchemy URL (`sqlite:///<storage root>/jobs.db`, `postgresql+psycopg://...`)."""
        self.limits = limits or StoreLimits()
        self.engine: Engine = create_engine(url, pool_pre_ping=True)
        _Base.metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with Session(self.engine) as session, session.begin():
            yield session

    # ---- files -------------------------------------------------------------

    def add_file(self, owner: str, purpose: str, filename: str, size: int, location: str,
                 expires_at: int | None = None) -> FileRecord:
        limits = self.limits
        if size > limits.max_file_bytes:
            raise LimitReached("max_file_bytes", limits.max_file_bytes)
        row = _FileRow(id=f"file-{uuid.uuid4().hex}", owner=owner, purpose=purpose, filename=filename, bytes=size,
                       created_at=now_ms(), expires_at=expires_at, location=location)
        with self._session() as session:
            held = session.scalar(select(func.count()).select_from(_FileRow).where(_FileRow.owner == owner))
            if held >= limits.max_files_per_key:
                raise LimitReached("max_files_per_key", limits.max_files_per_key)
            session.add(row)
            session.flush()
            return _record(FileRecord, row)

    def file(self, owner: str, file_id: str) -> FileRecord | None:
        """The owner's file, or None: missing, or another owner's."""
        with self._session() as session:
            row = session.get(_FileRow, file_id)
            return _record(FileRecord, row) if row is not None and row.owner == owner else None

    def files(self, owner: str, after: str | None = None, limit: int = 20,
              purpose: str | None = None) -> tuple[list[FileRecord], bool]:
        """The owner's files, newest first, after the file `after` (a cursor), at most `limit`; and whether more
        follow."""
        where = [_FileRow.owner == owner] + ([_FileRow.purpose == purpose] if purpose else [])
        return self._page(_FileRow, FileRecord, owner, where, after, limit)

    def delete_file(self, owner: str, file_id: str) -> FileRecord | None:
        """The owner's file, deleted; None when the owner has no such file."""
        with self._session() as session:
            row = session.get(_FileRow, file_id)
            if row is None or row.owner != owner:
                return None
            record = _record(FileRecord, row)
            session.delete(row)
            return record

    # ---- jobs --------------------------------------------------------------

    def add_job(self, owner: str, endpoint: str, input_file_id: str, model: str, metadata: dict | None = None,
                expires_at: int | None = None) -> JobRecord:
        limits = self.limits
        stamp = now_ms()
        row = _JobRow(id=f"batch_{uuid.uuid4().hex}", owner=owner, endpoint=endpoint, input_file_id=input_file_id,
                      model=model, status="validating", created_at=stamp, updated_at=stamp, expires_at=expires_at,
                      job_metadata=dict(metadata or {}), total=0, completed=0, failed=0, errors=[],
                      cancel_requested=False)
        with self._session() as session:
            mine = select(func.count()).select_from(_JobRow).where(_JobRow.owner == owner)
            if session.scalar(mine) >= limits.max_jobs_per_key:
                raise LimitReached("max_jobs_per_key", limits.max_jobs_per_key)
            if session.scalar(mine.where(_JobRow.status.not_in(FINAL))) >= limits.max_running_jobs_per_key:
                raise LimitReached("max_running_jobs_per_key", limits.max_running_jobs_per_key)
            session.add(row)
            session.flush()
            return _record(JobRecord, row)

    def job(self, owner: str, job_id: str) -> JobRecord | None:
        """The owner's job, or None: missing, or another owner's."""
        with self._session() as session:
            row = session.get(_JobRow, job_id)
            return _record(JobRecord, row) if row is not None and row.owner == owner else None

    def jobs(self, owner: str, after: str | None = None, limit: int = 20) -> tuple[list[JobRecord], bool]:
        """The owner's jobs, newest first, after the job `after`, at most `limit`; and whether more follow."""
        return self._page(_JobRow, JobRecord, owner, [_JobRow.owner == owner], after, limit)

    def request_cancel(self, owner: str, job_id: str) -> JobRecord | None:
        """Marks the owner's job to be cancelled (cancelling, unless it is final already); None when the owner has
        no such job."""
        with self._session() as session:
            row = session.get(_JobRow, job_id, with_for_update=True)
            if row is None or row.owner != owner:
                return None
            if row.status not in FINAL:
                row.cancel_requested = True
                row.status = "cancelling"
                row.updated_at = now_ms()
            return _record(JobRecord, row)

    def update_job(self, job_id: str, **progress: Any) -> JobRecord:
        """The job's runner records its progress (its status, counts, output files, errors): a final status is never
        left, and a job being cancelled only ends cancelled, failed or completed."""
        unknown = set(progress) - _PROGRESS
        if unknown:
            raise ValueError(f"not a job's progress: {sorted(unknown)}")
        status = progress.get("status")
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        with self._session() as session:
            row = session.get(_JobRow, job_id, with_for_update=True)
            if row is None:
                raise KeyError(job_id)
            if row.status in FINAL:
                return _record(JobRecord, row)
            if row.cancel_requested and status is not None and status not in ("cancelled", "failed", "completed"):
                progress = {k: v for k, v in progress.items() if k != "status"}
            for key, value in progress.items():
                setattr(row, key, value)
            row.updated_at = now_ms()
            return _record(JobRecord, row)

    # ---- retention -----------------------------------------------------------

    def expire(self, now: int | None = None) -> tuple[list[FileRecord], list[JobRecord]]:
        """Deletes the files and final jobs whose retention ended, and returns them (their bytes are the caller's
        to delete)."""
        now = now_ms() if now is None else now
        with self._session() as session:
            files = session.scalars(select(_FileRow).where(_FileRow.expires_at.is_not(None),
                                                           _FileRow.expires_at <= now)).all()
            jobs = session.scalars(select(_JobRow).where(_JobRow.expires_at.is_not(None), _JobRow.expires_at <= now,
                                                         _JobRow.status.in_(FINAL))).all()
            gone = [_record(FileRecord, r) for r in files], [_record(JobRecord, r) for r in jobs]
            if files:
                session.execute(delete(_FileRow).where(_FileRow.id.in_([r.id for r in files])))
            if jobs:
                session.execute(delete(_JobRow).where(_JobRow.id.in_([r.id for r in jobs])))
            return gone

    # ---- paging ------------------------------------------------------------

    def _page(self, table, record, owner: str, where: list, after: str | None, limit: int) -> tuple[list, bool]:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        with self._session() as session:
            if after is not None:
                cursor = session.get(table, after)
                if cursor is None or cursor.owner != owner:
                    return [], False  # another owner's id tells nothing either
                where = [*where, or_(table.created_at < cursor.created_at,
                                     and_(table.created_at == cursor.created_at, table.id < cursor.id))]
            rows = session.scalars(select(table).where(*where).order_by(table.created_at.desc(), table.id.desc())
                                   .limit(limit + 1)).all()
            return [_record(record, r) for r in rows[:limit]], len(rows) > limit
