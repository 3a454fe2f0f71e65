"""SQLAlchemy models: the record of truth for keys and jobs."""

import enum
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    Index,
    Integer,
    Numeric,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from jobs.db import Base
from jobs.timeutil import utcnow


class JobStatus(str, enum.Enum):
    scheduled = "scheduled"
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class Lane(int, enum.Enum):
    """Which work a worker takes first when it fills or refills its batch: a caller who
    waits for the answer, then native jobs, then the lines of file batches."""

    interactive = 0
    native = 1
    file_batch = 2


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


MONEY = Numeric(20, 10)


def _where(condition: str) -> dict[str, Any]:
    """A partial index's condition, for Postgres and SQLite alike."""
    return {"postgresql_where": text(condition), "sqlite_where": text(condition)}


QUEUED = "status = 'queued'"
SCHEDULED = "status = 'scheduled'"
FINISHED = "status IN ('succeeded', 'failed', 'cancelled')"
BATCH_LINE_UNFINISHED = "batch_id IS NOT NULL AND status IN ('scheduled', 'queued', 'running')"


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
        # The claim: a model's queued jobs, oldest first.
        Index("ix_jobs_model_status_created", "model", "status", "created_at"),
        # Expired leases: running jobs by lease.
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
        Index("ix_jobs_batch_line", "batch_id", "line"),
        # Partial indexes, so that maintenance never reads finished rows however long the
        # history: queued jobs by when their message went out (publishing), scheduled jobs
        # by when they are due, and finished jobs by when they ended (retention).
        Index("ix_jobs_queued_enqueued", "model", "enqueued_at", **_where(QUEUED)),
        Index("ix_jobs_scheduled_run_at", "run_at", **_where(SCHEDULED)),
        Index("ix_jobs_finished_at", "finished_at", **_where(FINISHED)),
        # A batch's lines that have not ended: whether a batch is done is one index probe,
        # however many of its lines have ended.
        Index("ix_jobs_batch_unfinished", "batch_id", **_where(BATCH_LINE_UNFINISHED)),
        # The claim by lane and owner: the owners with queued work in a lane (one probe per
        # owner), and each one's oldest queued jobs.
        Index(
            "ix_jobs_queued_lane_owner",
            "model",
            "lane",
            "owner",
            "created_at",
            **_where(QUEUED),
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    model: Mapped[str] = mapped_column(String(64))
    # `lora` as the caller wrote it (an id or a name); `lora_id` the adapter it named then.
    lora: Mapped[str | None] = mapped_column(String(256))
    lora_id: Mapped[str | None] = mapped_column(String(40))
    status: Mapped[JobStatus] = mapped_column(
        Enum(
            JobStatus,
            native_enum=False,
            length=16,
            values_callable=lambda statuses: [status.value for status in statuses],
        ),
        default=JobStatus.queued,
    )
    input: Mapped[dict[str, Any]] = mapped_column(JSON)
    sampling: Mapped[dict[str, Any]] = mapped_column(JSON)
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON)
    callback_url: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(256))

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    run_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    # The claim: a worker owns a running job until its lease expires.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claim_token: Mapped[str | None] = mapped_column(String(40))
    claimed_by: Mapped[str | None] = mapped_column(String(256))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The decode group: the jobs claimed together, which ran in one static batch (or its
    # length groups).
    group_id: Mapped[str | None] = mapped_column(String(40))
    # The Batches-API batch (made from an input file) this job is a line of, and which line.
    batch_id: Mapped[str | None] = mapped_column(String(40))
    custom_id: Mapped[str | None] = mapped_column(String(512))
    line: Mapped[int | None] = mapped_column(Integer)

    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    response_text: Mapped[str | None] = mapped_column(Text)
    response_uri: Mapped[str | None] = mapped_column(Text)
    cost_input: Mapped[Decimal | None] = mapped_column(MONEY)
    cost_output: Mapped[Decimal | None] = mapped_column(MONEY)
    # This job's share of its batch's compute time, by tokens: for pricing by GPU time.
    compute_seconds: Mapped[float | None] = mapped_column(Float)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    # Where the request asked for them: each generated token's log-probability and its best
    # alternatives, as OpenAI's chat `logprobs.content` entries (`jobs.tokenizer.TokenLogprob`).
    logprobs: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON(none_as_null=True))
    # Where the request asked for the cache and is deterministic: its key in `result_cache`
    # (`jobs.cache`), under which its answer is stored when it succeeds.
    cache_key: Mapped[str | None] = mapped_column(String(64))
    # Answered from the cache at submission: it never ran, and costs nothing.
    cached: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Where the request asked for n > 1 samples: samples 1..n-1 (sample 0 is the result
    # above), each `{"text" or "uri", "finish_reason", "completion_tokens", "logprobs"}`.
    choices: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON(none_as_null=True))
    # The lane it is claimed from (`Lane`), and whether its text is streamed while it decodes
    # (`jobs.streams`): set for the sync and streaming interfaces.
    lane: Mapped[int] = mapped_column(
        SmallInteger, default=Lane.native.value, server_default=text("1")
    )
    stream: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class CacheEntry(Base):
    """An answer kept for identical deterministic requests of the same owner (`jobs.cache`).
    A large answer is not copied here: `response_uri` names the stored result of the job that
    produced it, which is copied for each job answered from it."""

    __tablename__ = "result_cache"
    __table_args__ = (Index("ix_result_cache_expires_at", "expires_at"),)

    # Looked up by (owner, key): an owner's cache is never another's.
    owner: Mapped[str] = mapped_column(String(128), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(64))
    # The job whose answer this is.
    job_id: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    response_text: Mapped[str | None] = mapped_column(Text)
    response_uri: Mapped[str | None] = mapped_column(Text)
    finish_reason: Mapped[str] = mapped_column(String(16))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    logprobs: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON(none_as_null=True))


class LoraAdapter(Base):
    """An uploaded LoRA adapter, checked on upload; its files live in object storage."""

    __tablename__ = "lora_adapters"
    __table_args__ = (UniqueConstraint("owner", "name", name="uq_lora_adapters_owner_name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(128))
    base_model: Mapped[str] = mapped_column(String(64))
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    target_modules: Mapped[list[str]] = mapped_column(JSON)
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_prefix: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class BatchStatus(str, enum.Enum):
    """OpenAI's batch statuses."""

    validating = "validating"
    failed = "failed"
    in_progress = "in_progress"
    finalizing = "finalizing"
    completed = "completed"
    expired = "expired"
    cancelling = "cancelling"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (
            BatchStatus.failed,
            BatchStatus.completed,
            BatchStatus.expired,
            BatchStatus.cancelled,
        )


def _str_enum(kind: type[enum.Enum]) -> Enum:
    return Enum(
        kind,
        native_enum=False,
        length=16,
        values_callable=lambda members: [member.value for member in members],
    )


class FileObject(Base):
    """An uploaded file (an OpenAI batch input) or a batch's output or error file."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(512))
    bytes: Mapped[int] = mapped_column(BigInteger)
    lines: Mapped[int] = mapped_column(Integer, default=0)
    storage_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Batch(Base):
    """A Batches-API batch: the lines of an input file, run as jobs, with output files."""

    __tablename__ = "batches"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key", name="uq_batches_owner_idempotency_key"),
        Index("ix_batches_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(40))
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[BatchStatus] = mapped_column(_str_enum(BatchStatus))
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON)
    callback_url: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(256))
    # Failed lines of an earlier batch that this one runs again.
    retry_of: Mapped[str | None] = mapped_column(String(40))
    max_cost: Mapped[Decimal | None] = mapped_column(MONEY)
    # Its deterministic lines are answered from, and stored in, the owner's result cache.
    cache: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Batch-level errors (OpenAI's `errors`), e.g. why every line was refused.
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)

    total: Mapped[int] = mapped_column(Integer, default=0)
    invalid: Mapped[int] = mapped_column(Integer, default=0)
    # The request counts as the batch's files hold them, set when it ends.
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    # What the batch's lines add up to, counted as each line ends, in the transaction that
    # ends it, and no longer once the batch has ended: a GET reads them, not the lines.
    # Tokens and cost are those of the lines that succeeded.
    lines_succeeded: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lines_failed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    cost: Mapped[Decimal] = mapped_column(MONEY, default=Decimal(0), server_default="0")
    output_file_id: Mapped[str | None] = mapped_column(String(40))
    error_file_id: Mapped[str | None] = mapped_column(String(40))
    # Who is validating or finalizing the batch, until when: a process that dies mid-step
    # lets the lease lapse, and maintenance takes the step up again.
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Times the current step was taken without ending, and why it last failed: a step that
    # keeps failing ends the batch `failed` instead of being tried forever.
    step_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    step_error: Mapped[str | None] = mapped_column(Text)
    # Set by whoever took the current step: only its holder renews, ends or fails the step.
    step_token: Mapped[str | None] = mapped_column(String(32))

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    in_progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finalizing_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelling_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class LineError(Base):
    """A line of a batch's input that did not become a job, and why."""

    __tablename__ = "batch_line_errors"

    batch_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    line: Mapped[int] = mapped_column(Integer, primary_key=True)
    custom_id: Mapped[str | None] = mapped_column(String(512))
    code: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    param: Mapped[str | None] = mapped_column(String(256))


class EventStatus(str, enum.Enum):
    """A webhook event's delivery: pending until a 2xx (delivered), or until its retries are
    spent or its receiver answered 410 (failed)."""

    pending = "pending"
    delivered = "delivered"
    failed = "failed"


class WebhookSecret(Base):
    """An owner's signing secret; after a rotation the previous one also signs, until
    `previous_until`."""

    __tablename__ = "webhook_secrets"

    owner: Mapped[str] = mapped_column(String(128), primary_key=True)
    secret: Mapped[str] = mapped_column(String(128))
    previous_secret: Mapped[str | None] = mapped_column(String(128))
    previous_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


PENDING_EVENT = "status = 'pending'"
ENDED_EVENT = "status IN ('delivered', 'failed')"


class WebhookEvent(Base):
    """The outbox: an event written in the transaction that ended its object, delivered to
    `url` until a 2xx."""

    __tablename__ = "webhook_events"
    __table_args__ = (
        Index("ix_webhook_events_owner_created", "owner", "created_at", "id"),
        Index("ix_webhook_events_object", "object_id"),
        # Delivery: pending events by when they are next due, never delivered ones unread.
        Index("ix_webhook_events_due", "next_attempt_at", **_where(PENDING_EVENT)),
        # Retention: ended events by age, never a pending one read.
        Index("ix_webhook_events_ended", "created_at", **_where(ENDED_EVENT)),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    type: Mapped[str] = mapped_column(String(32))
    object_id: Mapped[str] = mapped_column(String(40))
    url: Mapped[str] = mapped_column(Text)
    status: Mapped[EventStatus] = mapped_column(_str_enum(EventStatus))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When its message went out, and who is delivering it until when.
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    delivery_token: Mapped[str | None] = mapped_column(String(32))
    # The body as first sent: every attempt and redelivery sends the same bytes.
    payload: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebhookAttempt(Base):
    """One try at delivering an event: when, what came back (or why nothing did), how long."""

    __tablename__ = "webhook_attempts"

    event_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    status_code: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    # The first 1 KB of the answer, or the error.
    response: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)


ACTIVE_SCHEDULE = "NOT paused"


class Schedule(Base):
    """A job or batch body run again at each fire time of a cron expression in a time zone."""

    __tablename__ = "schedules"
    __table_args__ = (
        # Firing: active schedules by when they are next due.
        Index("ix_schedules_next_run", "next_run_at", **_where(ACTIVE_SCHEDULE)),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(256))
    cron: Mapped[str] = mapped_column(String(256))
    timezone: Mapped[str] = mapped_column(String(64))
    # "job" (a native job body) or "batch" (a POST /v1/batches body).
    kind: Mapped[str] = mapped_column(String(8))
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    callback_url: Mapped[str | None] = mapped_column(Text)
    max_cost: Mapped[Decimal | None] = mapped_column(MONEY)
    paused: Mapped[bool] = mapped_column(default=False)
    next_run_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_run_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ScheduleRun(Base):
    """One fire of a schedule: the job or batch it made, or why it could not start. Its key
    (schedule, fire time) makes each fire one run, however many processes fire it."""

    __tablename__ = "schedule_runs"
    # Retention: runs by when they were made.
    __table_args__ = (Index("ix_schedule_runs_created", "created_at"),)

    schedule_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    fire_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    job_id: Mapped[str | None] = mapped_column(String(40))
    batch_id: Mapped[str | None] = mapped_column(String(40))
    # "started" (a job or batch was made) or "failed" (with the reason).
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
