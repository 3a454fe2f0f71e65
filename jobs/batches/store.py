"""The batch rows: creating a batch (idempotent on its key), getting and listing an owner's
batches, cancelling one, and what a batch's lines add up to (request counts, usage, spent cost,
job counts by status). It also fixes the names every step shares: a line's job id, which job
statuses have not ended, and the step fields that start afresh whenever a batch changes status.
"""

import hashlib
import secrets
from datetime import timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from jobs import files
from jobs.db import add_once
from jobs.errors import Conflict, InvalidParameter, NotFound
from jobs.models import Batch, BatchStatus, FileObject, Job, JobStatus
from jobs.schemas.batches import BatchCreate, RequestCounts
from jobs.settings import Settings
from jobs.timeutil import utcnow

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
    query = select(Batch).where(Batch.owner == owner)
    if after is not None:
        anchor = session.scalar(select(Batch).where(Batch.id == after, Batch.owner == owner))
        if anchor is None:
            raise InvalidParameter("after", after, "no batch of yours has this id")
        query = query.where(
            or_(
                Batch.created_at < anchor.created_at,
                and_(Batch.created_at == anchor.created_at, Batch.id < anchor.id),
            )
        )
    rows = list(
        session.scalars(query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1))
    )
    return rows[:limit], len(rows) > limit


def job_counts(session: Session, batch_id: str) -> dict[JobStatus, int]:
    rows = session.execute(
        select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)
    ).all()
    return {status: count for status, count in rows}


def request_counts(session: Session, batch: Batch) -> RequestCounts:
    if batch.status.finished:
        return RequestCounts(total=batch.total, completed=batch.completed, failed=batch.failed)
    counts = job_counts(session, batch.id)
    return RequestCounts(
        total=batch.total,
        completed=counts.get(JobStatus.succeeded, 0),
        failed=batch.invalid + counts.get(JobStatus.failed, 0) + counts.get(JobStatus.cancelled, 0),
    )


def spent(session: Session, batch_id: str) -> tuple[int, int, Decimal]:
    """Prompt tokens, completion tokens and exact cost of the batch's succeeded lines."""
    prompt, completion, cost_in, cost_out = session.execute(
        select(
            func.coalesce(func.sum(Job.prompt_tokens), 0),
            func.coalesce(func.sum(Job.completion_tokens), 0),
            func.coalesce(func.sum(Job.cost_input), 0),
            func.coalesce(func.sum(Job.cost_output), 0),
        ).where(Job.batch_id == batch_id, Job.status == JobStatus.succeeded)
    ).one()
    return int(prompt or 0), int(completion or 0), Decimal(cost_in or 0) + Decimal(cost_out or 0)


def usage(session: Session, batch_id: str) -> dict[str, Any]:
    """Tokens and cost of the batch's lines that have finished."""
    prompt, completion, cost = spent(session, batch_id)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "estimated_cost": float(cost),
    }


def stop_jobs(session: Session, batch_id: str, code: str, message: str) -> None:
    """Cancel the batch's jobs that have not finished; a running one's result is dropped."""
    session.execute(
        update(Job)
        .where(Job.batch_id == batch_id, Job.status.in_(UNFINISHED))
        .values(
            status=JobStatus.cancelled,
            finished_at=utcnow(),
            claim_token=None,
            error_code=code,
            error_message=message,
        )
    )


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
