"""Job persistence: every change of a job's state is one conditional UPDATE in Postgres.

The conditions make the state machine safe against redelivered messages, dead workers and
racing processes: a job is claimed only while queued, and a result is recorded only by the
holder of the current claim, so it is recorded at most once.
"""

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, case, func, select, update
from sqlalchemy.orm import Session, load_only

from jobs.errors import NotFound
from jobs.models import Job, JobStatus
from jobs.timeutil import utcnow


def get_owned_job(session: Session, owner: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.owner != owner:
        raise NotFound(f"no job {job_id}", param="id")
    return job


def find_by_idempotency_key(session: Session, owner: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == key))


def mark_enqueued(session: Session, job_ids: list[str]) -> None:
    """Note when the jobs' messages went out (flushed; the caller commits)."""
    session.execute(update(Job).where(Job.id.in_(job_ids)).values(enqueued_at=utcnow()))


def cancel(session: Session, job: Job) -> Job:
    """Cancel a job that has not finished; a running job's result is then never recorded.
    A conditional UPDATE, flushed; the unit of work commits it."""
    if not job.status.finished:
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status.not_in(_FINISHED))
            .values(status=JobStatus.cancelled, finished_at=utcnow(), claim_token=None)
        )
        session.refresh(job)
    return job


_FINISHED = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


@dataclass(frozen=True)
class Claim:
    job: Job
    token: str


def is_queued(session: Session, job_id: str) -> bool:
    return session.scalar(select(Job.status).where(Job.id == job_id)) == JobStatus.queued


def count_queued(session: Session, model: str) -> int:
    return int(
        session.scalar(
            select(func.count()).where(Job.model == model, Job.status == JobStatus.queued)
        )
        or 0
    )


def claim_batch(
    session: Session,
    model: str,
    worker_id: str,
    lease_seconds: int,
    limit: int,
    first_id: str | None = None,
    choose: Callable[[list[Job]], list[Job]] | None = None,
) -> list[Claim]:
    """Claim queued jobs of `model`: of the `limit` oldest (`first_id` first), those that
    `choose` picks, or all of them.

    Rows locked by another claimer are skipped (Postgres `SKIP LOCKED`), so concurrent
    workers never claim the same job. Each claim counts as an attempt, and the jobs claimed
    together share a decode group id (`grp_...`). Its own transaction, committed here: a
    claim is a step of the job's state machine, visible to every worker at once.
    """
    order: list[Any] = [Job.created_at]
    if first_id is not None:
        order.insert(0, case((Job.id == first_id, 0), else_=1))
    candidates = session.scalars(
        select(Job)
        .where(Job.model == model, Job.status == JobStatus.queued)
        .order_by(*order)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    chosen = choose(list(candidates)) if choose is not None else list(candidates)
    now = utcnow()
    group_id = "grp_" + secrets.token_hex(8)
    claims = []
    for job in chosen:
        token = secrets.token_hex(16)
        result = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == JobStatus.queued)
            .values(
                status=JobStatus.running,
                claim_token=token,
                claimed_by=worker_id,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                attempts=Job.attempts + 1,
                started_at=now,
                group_id=group_id,
            )
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            session.refresh(job)
            claims.append(Claim(job, token))
    session.commit()
    return claims


def renew_leases(session: Session, claims: list[Claim], lease_seconds: int) -> None:
    """Extend the leases of claims still held. Its own transaction, committed here."""
    expires = utcnow() + timedelta(seconds=lease_seconds)
    for claim in claims:
        session.execute(
            update(Job)
            .where(Job.id == claim.job.id, Job.claim_token == claim.token)
            .values(lease_expires_at=expires)
        )
    session.commit()


def lost_claims(session: Session, claims: list[Claim]) -> set[str]:
    """The ids of the jobs among `claims` that no longer run under them: cancelled (a job or
    its batch), or given to another worker after the lease lapsed."""
    if not claims:
        return set()
    held = set(
        session.execute(
            select(Job.id, Job.claim_token).where(
                Job.id.in_([claim.job.id for claim in claims]), Job.status == JobStatus.running
            )
        ).tuples()
    )
    return {claim.job.id for claim in claims if (claim.job.id, claim.token) not in held}


@dataclass(frozen=True)
class Outcome:
    completion_tokens: int
    finish_reason: str
    response_text: str | None
    response_uri: str | None
    cost_input: Decimal
    cost_output: Decimal
    compute_seconds: float


def _held(claim: Claim) -> tuple[ColumnElement[bool], ...]:
    """The job is running under this very claim."""
    return (
        Job.id == claim.job.id,
        Job.claim_token == claim.token,
        Job.status == JobStatus.running,
    )


def _finish(
    session: Session, claim: Claim, values: dict[str, Any], *conditions: ColumnElement[bool]
) -> bool:
    """End a running job under its current claim; False where the claim is no longer current
    (the job was cancelled, recorded already, or given to another worker)."""
    result = session.execute(
        update(Job)
        .where(*_held(claim), *conditions)
        .values(**values, finished_at=utcnow(), claim_token=None, lease_expires_at=None)
    )
    session.commit()
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def record_success(session: Session, claim: Claim, outcome: Outcome) -> bool:
    """Record a result once: only the current claim of a running job can; False otherwise.
    Its own transaction, committed here, like every step of the job's state machine."""
    return _finish(
        session,
        claim,
        {
            "status": JobStatus.succeeded,
            "completion_tokens": outcome.completion_tokens,
            "finish_reason": outcome.finish_reason,
            "response_text": outcome.response_text,
            "response_uri": outcome.response_uri,
            "cost_input": outcome.cost_input,
            "cost_output": outcome.cost_output,
            "compute_seconds": outcome.compute_seconds,
        },
    )


def record_failure(session: Session, claim: Claim, code: str, message: str) -> bool:
    """End a job failed, under its current claim. Its own transaction, committed here."""
    return _finish(
        session,
        claim,
        {"status": JobStatus.failed, "error_code": code, "error_message": message},
    )


def _give_back(
    session: Session,
    claim: Claim,
    max_attempts: int,
    code: str,
    message: str,
    expired_before: datetime | None = None,
) -> bool:
    """Queue a claimed job again, or fail it once it is out of attempts; True if queued.

    With `expired_before`, only while the lease is still expired then: a worker that renewed
    it in the meantime keeps its job. Its own transaction, committed here.
    """
    lease = () if expired_before is None else (Job.lease_expires_at < expired_before,)
    if claim.job.attempts >= max_attempts:
        _finish(
            session,
            claim,
            {"status": JobStatus.failed, "error_code": code, "error_message": message},
            *lease,
        )
        return False
    result = session.execute(
        update(Job)
        .where(*_held(claim), *lease)
        .values(status=JobStatus.queued, enqueued_at=None, claim_token=None, lease_expires_at=None)
    )
    session.commit()
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def expired_claims(session: Session, now: datetime | None = None) -> list[Job]:
    """Running jobs whose worker stopped renewing its lease: it died, or lost its database."""
    return list(
        session.scalars(
            select(Job).where(
                Job.status == JobStatus.running, Job.lease_expires_at < (now or utcnow())
            )
        )
    )


def release_expired(session: Session, max_attempts: int, now: datetime | None = None) -> list[Job]:
    """Put jobs with an expired claim back in the queue, or fail those out of attempts.

    Returns the jobs that are queued again, for publishing. Each job's move is its own
    conditional UPDATE, committed here.
    """
    now = now or utcnow()
    return [
        job
        for job in expired_claims(session, now)
        if job.claim_token is not None
        and _give_back(
            session,
            Claim(job, job.claim_token),
            max_attempts,
            "worker_lost",
            f"the worker running this job stopped {job.attempts} times",
            expired_before=now,
        )
    ]


def due_for_publish(
    session: Session, requeue_after_seconds: int, now: datetime | None = None, limit: int = 1000
) -> list[Job]:
    """Queued jobs whose message may be lost, and scheduled jobs whose time has come.

    A queued job counts once it was never published or was published long ago: a broker
    restart can drop messages, and a spare message costs nothing, since claims decide. At
    most `limit` a pass, oldest first, and only their ids and models are loaded. Its own
    transaction (due jobs queued), committed here.
    """
    now = now or utcnow()
    session.execute(
        update(Job)
        .where(Job.status == JobStatus.scheduled, Job.run_at <= now)
        .values(status=JobStatus.queued, enqueued_at=None)
    )
    stale = now - timedelta(seconds=requeue_after_seconds)
    jobs = list(
        session.scalars(
            select(Job)
            .options(load_only(Job.id, Job.model))
            .where(
                Job.status == JobStatus.queued,
                (Job.enqueued_at.is_(None)) | (Job.enqueued_at < stale),
            )
            .order_by(Job.created_at)
            .limit(limit)
        )
    )
    session.commit()
    return jobs


def release_claims(
    session: Session, claims: list[Claim], max_attempts: int, reason: str
) -> list[Job]:
    """Give claimed jobs back after a failure that was not theirs alone: queued again, or
    failed when out of attempts. Returns the jobs queued again. Each job's move is its own
    transaction, committed here."""
    return [
        claim.job
        for claim in claims
        if _give_back(session, claim, max_attempts, "engine_error", reason)
    ]


def return_claims(session: Session, claims: list[Claim], delay_seconds: float) -> int:
    """Give claimed jobs back after our own storage or database was away while they ran:
    the claim is not counted as an attempt, since nothing about the jobs failed, and an
    outage that outlasts their attempts must not fail them. They wait `delay_seconds`
    (`scheduled`, which maintenance starts when due), so that a long outage is waited out
    at a steady pace rather than decoded again and again. Returns how many were given back.
    Its own transaction, committed here."""
    returned = 0
    run_at = utcnow() + timedelta(seconds=delay_seconds)
    for claim in claims:
        result = session.execute(
            update(Job)
            .where(*_held(claim))
            .values(
                status=JobStatus.scheduled,
                run_at=run_at,
                enqueued_at=None,
                claim_token=None,
                lease_expires_at=None,
                attempts=Job.attempts - 1,
            )
        )
        returned += result.rowcount  # type: ignore[attr-defined]
    session.commit()
    return returned
