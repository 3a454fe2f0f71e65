"""The batch rows: creating a batch (idempotent on its key), getting and listing an owner's
batches, cancelling one, and what a batch's lines add up to (the exact sums, once, as it
ends; whether a line has yet to end; the counters on its row are moved by `jobs.queries` as
each line ends). It also fixes the names every step shares: a line's job id, which job
statuses have not ended, and the step fields that start afresh whenever a batch changes
status.
"""

import hashlib
import secrets
from datetime import timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, Exists, exists, func, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from jobs import files, queries
from jobs.db import add_once, newest_first
from jobs.errors import Conflict, InvalidParameter, NotFound
from jobs.models import Batch, BatchStatus, FileObject, Job, JobStatus
from jobs.schemas.batches import BatchCreate
from jobs.settings import Settings
from jobs.timeutil import utcnow
from jobs.webhooks.addresses import check_callback_url

WINDOW_SECONDS = {"24h": 24 * 3600}
UNFINISHED = (JobStatus.scheduled, JobStatus.queued, JobStatus.running)
# Fields that start afresh whenever a batch moves to another step.
STEP_RESET: dict[str, Any] = {
    "lease_expires_at": None,
    "step_token": None,
    "step_attempts": 0,
    "step_error": None,
}


def line_job_id(batch_id: str, line: int) -> str:
    digest = hashlib.sha256(f"{batch_id}\x00{line}".encode()).hexdigest()
    return "job_" + digest[:24]


def input_file(session: Session, owner: str, file_id: str) -> FileObject:
    try:
        file = files.get_file(session, owner, file_id)
    except NotFound:
        raise NotFound(f"no file {file_id}", param="input_file_id") from None
    if file.purpose != files.INPUT_PURPOSE:
        raise InvalidParameter("input_file_id", file_id, 'not a file of purpose "batch"')
    return file


def create_batch(
    session: Session,
    owner: str,
    body: BatchCreate,
    settings: Settings,
    idempotency_key: str | None = None,
) -> tuple[Batch, bool]:
    """Record a batch in `validating`; returns it and whether it is new (an idempotency key
    seen before returns the batch it made)."""
    key = idempotency_key or body.idempotency_key
    if key is not None and (found := _by_key(session, owner, key)) is not None:
        return found, False
    if body.callback_url is not None:
        check_callback_url(body.callback_url, settings.webhook_allow_private)
    file = input_file(session, owner, body.input_file_id)
    window = settings.batch_window_seconds or WINDOW_SECONDS[body.completion_window]
    now = utcnow()
    batch = Batch(
        id="batch_" + secrets.token_hex(12),
        owner=owner,
        endpoint=body.endpoint,
        input_file_id=file.id,
        completion_window=body.completion_window,
        status=BatchStatus.validating,
        metadata_=body.metadata,
        callback_url=body.callback_url,
        idempotency_key=key,
        max_cost=body.max_cost,
        cache=body.cache,
        total=file.lines,
        invalid=0,
        completed=0,
        failed=0,
        created_at=now,
        expires_at=now + timedelta(seconds=window),
    )
    return add_once(session, batch, lambda: _by_key(session, owner, key) if key else None)


def _by_key(session: Session, owner: str, key: str) -> Batch | None:
    return session.scalar(select(Batch).where(Batch.owner == owner, Batch.idempotency_key == key))


def get_batch(session: Session, owner: str, batch_id: str) -> Batch:
    batch = session.scalar(select(Batch).where(Batch.id == batch_id, Batch.owner == owner))
    if batch is None:
        raise NotFound(f"no batch {batch_id}", param="batch_id")
    return batch


def list_batches(
    session: Session, owner: str, after: str | None, limit: int
) -> tuple[list[Batch], bool]:
    """Newest first; `after` is the id of the last batch of the page before."""
    return newest_first(session, select(Batch).where(Batch.owner == owner), after, limit, "batch")


def spent(session: Session, batch_id: str) -> tuple[int, int, Decimal]:
    """Prompt tokens, completion tokens and exact cost of the batch's succeeded lines, added
    up from the lines themselves: once, as the batch ends, to freeze its counters exact."""
    prompt, completion, cost_in, cost_out = session.execute(
        select(
            func.coalesce(func.sum(Job.prompt_tokens), 0),
            func.coalesce(func.sum(Job.completion_tokens), 0),
            func.coalesce(func.sum(Job.cost_input), 0),
            func.coalesce(func.sum(Job.cost_output), 0),
        ).where(Job.batch_id == batch_id, Job.status == JobStatus.succeeded)
    ).one()
    return int(prompt or 0), int(completion or 0), Decimal(cost_in or 0) + Decimal(cost_out or 0)


def has_unfinished_lines(session: Session, batch_id: str) -> bool:
    """Whether a line of the batch has yet to end: one probe of the partial index of such
    lines, however many have ended."""
    return bool(session.scalar(select(unfinished_lines(batch_id))))


def unfinished_lines(batch_id: ColumnElement[str] | InstrumentedAttribute[str] | str) -> Exists:
    """EXISTS a line of `batch_id` (a value, or a column to correlate with) that has not
    ended; its conditions are those of the partial index `ix_jobs_batch_unfinished`."""
    return exists().where(
        Job.batch_id.is_not(None), Job.batch_id == batch_id, Job.status.in_(UNFINISHED)
    )


def stop_jobs(session: Session, batch_id: str, code: str, message: str) -> None:
    """Cancel the batch's jobs that have not finished; a running one's result is dropped.
    The caller has updated the batch's row first (see `queries.lock_batches`)."""
    stopped = session.execute(
        update(Job)
        .where(Job.batch_id == batch_id, Job.status.in_(UNFINISHED))
        .values(
            status=JobStatus.cancelled,
            finished_at=utcnow(),
            claim_token=None,
            error_code=code,
            error_message=message,
        )
        .execution_options(synchronize_session=False)
    )
    queries.count_lines_ended(session, batch_id, failed=stopped.rowcount)  # type: ignore[attr-defined]


def cancel_batch(session: Session, batch: Batch) -> Batch:
    """Stop a batch: it is `cancelling` until its files are written, then `cancelled`."""
    if batch.status.finished:
        raise Conflict(f"batch {batch.id} has already ended ({batch.status.value})", param="id")
    # A finalizing batch has no line left to stop: it ends as it would have.
    stoppable = [BatchStatus.validating, BatchStatus.in_progress]
    stopped = session.execute(
        update(Batch)
        .where(Batch.id == batch.id, Batch.status.in_(stoppable))
        .values(status=BatchStatus.cancelling, cancelling_at=utcnow(), **STEP_RESET)
    )
    if stopped.rowcount == 1:  # type: ignore[attr-defined]
        stop_jobs(session, batch.id, "batch_cancelled", "the batch was cancelled")
    session.flush()
    session.refresh(batch)
    return batch
