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

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    Integer,
    String,
    UniqueConstraint,
    and_,
    create_engine,
    delete,
    event,
    func,
    inspect,
    or_,
    select,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from embedding_service.config import JobLimits, JobsSettings

# A job's statuses, as OpenAI's Batch API names them; the last four are final.
STATUSES = ("validating", "in_progress", "finalizing", "cancelling", "completed", "failed", "expired", "cancelled")
FINAL = frozenset({"completed", "failed", "expired", "cancelled"})


class LimitReached(Exception):
    """An owner's bound (StoreLimits) refuses the row: which bound, and its value."""

    def __init__(self, bound: str, limit: int) -> None:
        super().__init__(f"{bound} is {limit}")
        self.bound, self.limit = bound, limit


class RequestKeyReused(Exception):
    """A create's idempotency key names a job the owner made with other parameters: a second request under a key
    already spent, not the first sent again."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"the key was used for job {job_id}, made with other parameters")
        self.job_id = job_id


def owner_of(api_key: str | bytes, tenant: str | bytes = b"") -> str:
    """The owner a key's jobs and files are kept under: a digest of the key, so the store never holds a key. A
    caller may name a tenant of its own (the gateway names the key its caller gave it): the owner is then the
    key's and the tenant's together, so no key reaches another key's jobs, whatever tenant it names."""
    key = api_key.encode() if isinstance(api_key, str) else api_key
    if tenant:
        key += b"\x00" + (tenant.encode() if isinstance(tenant, str) else tenant)
    return hashlib.sha256(key).hexdigest()[:32]


def open_store(jobs: JobsSettings) -> JobStore:
    """The store jobs.* names: the URL in the environment variable jobs.store_url_env (a secret), else SQLite under
    the storage root."""
    import os

    url = os.environ.get(jobs.store_url_env) if jobs.store_url_env else None
    if jobs.store_url_env and not url:
        raise RuntimeError(f"jobs.store_url_env names {jobs.store_url_env}, which is not set on this node")
    return JobStore(store_url(jobs.storage_root, url), jobs.limits)


def store_url(storage_root: str, url: str | None) -> str:
    """The store's SQLAlchemy URL: `url` when given (from a secret), else SQLite at <storage_root>/jobs.db."""
    if url:
        return url
    if "://" in storage_root:
        raise ValueError("an object-store storage root needs the store's URL (SQLite needs a local folder)")
    import os

    os.makedirs(storage_root, exist_ok=True)
    return f"sqlite:///{os.path.abspath(storage_root)}/jobs.db"


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
    # One job per owner and idempotency key (NULL, no key, repeats freely in SQLite and PostgreSQL).
    __table_args__ = (UniqueConstraint("owner", "request_key"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(256))
    spec: Mapped[dict] = mapped_column(JSON, default=dict)
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
    rows_per_s: Mapped[float] = mapped_column(Float, default=0.0)
    # When the job entered each status it went through: {status: ms since the epoch}.
    times: Mapped[dict] = mapped_column(JSON, default=dict)
    request_key: Mapped[str | None] = mapped_column(String(128), nullable=True)


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
    spec: dict  # what the runner runs (jobs/spec.py JobSpec, as JSON)
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
    rows_per_s: float = 0.0
    times: dict = field(default_factory=dict)


def _file_row(owner: str, purpose: str, filename: str, size: int, location: str, expires_at: int | None) -> _FileRow:
    return _FileRow(id=f"file-{uuid.uuid4().hex}", owner=owner, purpose=purpose, filename=filename, bytes=size,
                    created_at=now_ms(), expires_at=expires_at, location=location)


def _record(cls, row) -> Any:
    return cls(**{f.name: getattr(row, f.name) for f in fields(cls)})


# What the job's runner may change of a job (never its owner, input or creation).
_PROGRESS = frozenset({"status", "total", "completed", "failed", "output_file_id", "error_file_id", "errors",
                       "expires_at", "model", "rows_per_s"})


# Columns added to a table after its first release, with what adds them to a store that predates them (create_all
# makes missing tables only): the column, then its statements.
_ADDED_COLUMNS = {
    "batch_jobs": [("request_key", ("ALTER TABLE batch_jobs ADD COLUMN request_key VARCHAR(128)",
                                    "CREATE UNIQUE INDEX IF NOT EXISTS uq_batch_jobs_owner_request_key "
                                    "ON batch_jobs (owner, request_key)"))],
}


def _add_missing_columns(engine: Engine) -> None:
    """Brings a store made by an earlier release up to the current tables. Several processes open the store at
    once: a column another added meanwhile is taken as added."""
    for table, columns in _ADDED_COLUMNS.items():
        for column, statements in columns:
            if column in {c["name"] for c in inspect(engine).get_columns(table)}:
                continue
            try:
                with engine.begin() as connection:
                    for statement in statements:
                        connection.execute(text(statement))
            except (OperationalError, ProgrammingError):
                if column not in {c["name"] for c in inspect(engine).get_columns(table)}:
                    raise


def _sqlite_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


class JobStore:
    def __init__(self, url: str, limits: JobLimits | None = None) -> None:
        """`url`: an SQLAlchemy URL (`sqlite:///<storage root>/jobs.db`, `postgresql+psycopg://...`)."""
        self.limits = limits or JobLimits()
        self.engine: Engine = create_engine(url, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            # Several processes share the file (gateway, router, job manager, runners): readers never block the
            # writer, and a writer waits for another rather than failing.
            event.listen(self.engine, "connect", _sqlite_pragmas)
        _Base.metadata.create_all(self.engine)
        _add_missing_columns(self.engine)

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
        row = _file_row(owner, purpose, filename, size, location, expires_at)
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
                expires_at: int | None = None, spec: dict | None = None, request_key: str | None = None) -> JobRecord:
        """A new job; or, when the owner made one with `request_key` already (a create sent again), that one.
        RequestKeyReused: the key's job was made with other parameters."""
        limits = self.limits
        stamp = now_ms()
        row = _JobRow(id=f"batch_{uuid.uuid4().hex}", owner=owner, endpoint=endpoint, input_file_id=input_file_id,
                      model=model, spec=dict(spec or {}), status="validating", created_at=stamp, updated_at=stamp,
                      expires_at=expires_at,
                      job_metadata=dict(metadata or {}), total=0, completed=0, failed=0, errors=[],
                      cancel_requested=False, rows_per_s=0.0, times={"validating": stamp},
                      request_key=request_key or None)
        try:
            with self._session() as session:
                made = self._made(session, owner, request_key, row)
                if made is not None:
                    return made
                mine = select(func.count()).select_from(_JobRow).where(_JobRow.owner == owner)
                if session.scalar(mine) >= limits.max_jobs_per_key:
                    raise LimitReached("max_jobs_per_key", limits.max_jobs_per_key)
                if session.scalar(mine.where(_JobRow.status.not_in(FINAL))) >= limits.max_running_jobs_per_key:
                    raise LimitReached("max_running_jobs_per_key", limits.max_running_jobs_per_key)
                session.add(row)
                session.flush()
                return _record(JobRecord, row)
        except IntegrityError:  # the same key's create, committed by another process meanwhile
            if not request_key:
                raise
            with self._session() as session:
                made = self._made(session, owner, request_key, row)
                if made is None:
                    raise
                return made

    @staticmethod
    def _made(session: Session, owner: str, request_key: str | None, asked: _JobRow) -> JobRecord | None:
        """The job the owner's create with this key made already, when `asked` is that create sent again."""
        if not request_key:
            return None
        row = session.scalar(select(_JobRow).where(_JobRow.owner == owner, _JobRow.request_key == request_key))
        if row is None:
            return None
        # (not the model column: a batch's is set once its file is read)
        if (row.endpoint, row.input_file_id, row.spec, row.job_metadata) != (
                asked.endpoint, asked.input_file_id, asked.spec, asked.job_metadata):
            raise RequestKeyReused(row.id)
        return _record(JobRecord, row)

    def job(self, owner: str, job_id: str) -> JobRecord | None:
        """The owner's job, or None: missing, or another owner's."""
        with self._session() as session:
            row = session.get(_JobRow, job_id)
            return _record(JobRecord, row) if row is not None and row.owner == owner else None

    def jobs(self, owner: str, after: str | None = None, limit: int = 20) -> tuple[list[JobRecord], bool]:
        """The owner's jobs, newest first, after the job `after`, at most `limit`; and whether more follow."""
        return self._page(_JobRow, JobRecord, owner, [_JobRow.owner == owner], after, limit)

    def unfinished(self) -> list[JobRecord]:
        """Every owner's jobs not in a final status, oldest first: the job manager's work."""
        with self._session() as session:
            rows = session.scalars(select(_JobRow).where(_JobRow.status.not_in(FINAL))
                                   .order_by(_JobRow.created_at, _JobRow.id)).all()
            return [_record(JobRecord, r) for r in rows]

    def job_by_id(self, job_id: str) -> JobRecord | None:
        """A job whoever owns it: for the service's own processes (the runner), never for a caller."""
        with self._session() as session:
            row = session.get(_JobRow, job_id)
            return _record(JobRecord, row) if row is not None else None

    def add_output_file(self, owner: str, filename: str, size: int, location: str,
                        expires_at: int | None = None) -> FileRecord:
        """A file the service wrote for the owner (a batch's output or errors): outside the owner's bounds, which
        are for what a caller uploads. One record per file: a job's files written again (its runner lost while it
        finalized, and resumed) keep the record they had, with the new size."""
        with self._session() as session:
            row = session.scalars(select(_FileRow).where(
                _FileRow.owner == owner, _FileRow.purpose == "batch_output", _FileRow.location == location)).first()
            if row is None:
                row = _file_row(owner, "batch_output", filename, size, location, expires_at)
                session.add(row)
            else:
                row.bytes, row.expires_at = size, expires_at
            session.flush()
            return _record(FileRecord, row)

    def request_cancel(self, owner: str, job_id: str) -> JobRecord | None:
        """Marks the owner's job to be cancelled (cancelling, unless it is final already); None when the owner has
        no such job."""
        with self._session() as session:
            row = session.get(_JobRow, job_id, with_for_update=True)
            if row is None or row.owner != owner:
                return None
            if row.status not in FINAL:
                row.cancel_requested = True
                row.updated_at = now_ms()
                row.times = {**row.times, "cancelling": row.updated_at}
                row.status = "cancelling"
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
            row.updated_at = now_ms()
            if progress.get("status", row.status) != row.status:
                row.times = {**row.times, progress["status"]: row.updated_at}
            for key, value in progress.items():
                setattr(row, key, value)
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
