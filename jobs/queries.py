"""Job persistence: every change of a job's state is one conditional UPDATE in Postgres.

The conditions make the state machine safe against redelivered messages, dead workers and
racing processes: a job is claimed only while queued, and a result is recorded only by the
holder of the current claim, so it is recorded at most once.
"""

import secrets
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, Select, String, case, cast, func, literal, select, update
from sqlalchemy.orm import Session

from jobs import cache
from jobs.errors import NotFound
from jobs.models import Batch, BatchStatus, Job, JobStatus
from jobs.registry import MODELS
from jobs.settings import CACHE_TTL_SECONDS
from jobs.timeutil import utcnow
from jobs.tokenizer import TokenLogprob
from jobs.webhooks.events import Ending, emit, job_ended


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
        lock_batches(session, [job.batch_id])
        cancelled = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status.not_in(_FINISHED))
            .values(status=JobStatus.cancelled, finished_at=utcnow(), claim_token=None)
        )
        if cancelled.rowcount == 1:  # type: ignore[attr-defined]
            count_lines_ended(session, job.batch_id, failed=1)
            job_ended(session, job.owner, job.id, JobStatus.cancelled.value, job.callback_url)
        session.refresh(job)
    return job


_FINISHED = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)
_BATCH_ENDED = [status for status in BatchStatus if status.finished]


def lock_batches(session: Session, batch_ids: Iterable[str | None]) -> None:
    """Lock the rows of the batches whose lines are about to end, in id order. Every path
    that ends a batch's lines takes the batch's row before the lines' (a batch cancelled,
    expired or over its `max_cost` updates its own row first), so that none of them waits on
    another in a cycle."""
    ids = sorted({batch_id for batch_id in batch_ids if batch_id is not None})
    if ids:
        session.execute(
            select(Batch.id).where(Batch.id.in_(ids)).order_by(Batch.id).with_for_update()
        )


def count_lines_ended(
    session: Session,
    batch_id: str | None,
    *,
    succeeded: int = 0,
    failed: int = 0,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    cost: Decimal = Decimal(0),
) -> None:
    """Add lines that just ended to their batch's counters, in the transaction that ended
    them; a batch that has ended keeps the counts it ended with."""
    if batch_id is None or not (succeeded or failed):
        return
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.status.not_in(_BATCH_ENDED))
        .values(
            lines_succeeded=Batch.lines_succeeded + succeeded,
            lines_failed=Batch.lines_failed + failed,
            prompt_tokens=Batch.prompt_tokens + prompt_tokens,
            completion_tokens=Batch.completion_tokens + completion_tokens,
            cost=Batch.cost + cost,
        )
        .execution_options(synchronize_session=False)
    )


@dataclass(frozen=True)
class Claim:
    job: Job
    token: str


def is_queued(session: Session, job_id: str) -> bool:
    return session.scalar(select(Job.status).where(Job.id == job_id)) == JobStatus.queued


def count_queued(session: Session, model: str, at_most: int = 1) -> int:
    """How many jobs of `model` are queued, counted no further than `at_most`: the cost stays
    that of reading `at_most` index entries however long the queue (with the default, 1 or 0:
    whether any job waits)."""
    queued = (
        select(Job.id)
        .where(Job.model == model, Job.status == JobStatus.queued)
        .limit(at_most)
        .subquery()
    )
    return int(session.scalar(select(func.count()).select_from(queued)) or 0)


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

    Three statements whatever the queue's length: the message's job by primary key, the
    oldest others through the `(model, status, created_at)` index, then one UPDATE of the
    chosen rows that gives each its own token and returns the claimed rows whole.
    """
    candidates: list[Job] = []
    others = select(Job).where(Job.model == model, Job.status == JobStatus.queued)
    if first_id is not None:
        candidates.extend(
            session.scalars(
                others.where(Job.id == first_id).with_for_update(skip_locked=True)
            ).all()
        )
        others = others.where(Job.id != first_id)
    if limit > len(candidates):
        candidates.extend(
            session.scalars(
                others.order_by(Job.created_at)
                .limit(limit - len(candidates))
                .with_for_update(skip_locked=True)
            ).all()
        )
    chosen = choose(candidates) if choose is not None else candidates
    if not chosen:
        session.commit()
        return []
    tokens = {job.id: secrets.token_hex(16) for job in chosen}
    now = utcnow()
    claimed = session.scalars(
        update(Job)
        .where(Job.id.in_(tokens), Job.status == JobStatus.queued)
        .values(
            status=JobStatus.running,
            claim_token=case(tokens, value=Job.id),
            claimed_by=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempts=Job.attempts + 1,
            started_at=now,
            group_id="grp_" + secrets.token_hex(8),
        )
        .returning(Job)
        # The returned rows replace what the SELECT loaded into the session.
        .execution_options(synchronize_session=False, populate_existing=True)
    ).all()
    session.commit()
    by_id = {job.id: job for job in claimed}
    return [Claim(by_id[job.id], tokens[job.id]) for job in chosen if job.id in by_id]


def renew_leases(session: Session, claims: list[Claim], lease_seconds: int) -> None:
    """Extend the leases of claims still held, in one short statement. Should it ever meet a
    set-based release in a deadlock, Postgres ends one of them, and either runs again at its
    next tick, before the lease it renews could lapse. Its own transaction, committed here."""
    if not claims:
        return
    # Tokens are random per job, so a row whose id and token are both among the claims'
    # is one of the claims.
    session.execute(
        update(Job)
        .where(
            Job.id.in_([claim.job.id for claim in claims]),
            Job.claim_token.in_([claim.token for claim in claims]),
        )
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
    )
    session.commit()


def lost_claims(session: Session, claims: list[Claim]) -> set[str]:
    """The ids of the jobs among `claims` that no longer run under them: cancelled (a job or
    its batch), or given to another worker after the lease lapsed."""
    if not claims:
        return set()
    held = {
        (job_id, token)
        for job_id, token in session.execute(
            select(Job.id, Job.claim_token).where(
                Job.id.in_([claim.job.id for claim in claims]), Job.status == JobStatus.running
            )
        )
    }
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
    # Each token's logprobs, where the request asked for them.
    logprobs: list[TokenLogprob] | None = None
    # Samples 1..n-1 of a job that asked for n > 1 (`Job.choices`); None for one sample.
    choices: list[dict[str, Any]] | None = None


def _held(claim: Claim) -> tuple[ColumnElement[bool], ...]:
    """The job is running under this very claim."""
    return (
        Job.id == claim.job.id,
        Job.claim_token == claim.token,
        Job.status == JobStatus.running,
    )


def _finish(
    session: Session,
    claim: Claim,
    values: dict[str, Any],
    outcome: Outcome | None = None,
    cache_ttl_seconds: float = CACHE_TTL_SECONDS,
) -> bool:
    """End a running job under its current claim, succeeded with `outcome` or as `values`
    say, and count it on its batch in the same transaction (and, for a job that asked for
    the cache, store its answer there); False where the claim is no longer current (the job
    was cancelled, recorded already, or given to another worker)."""
    batch_id = claim.job.batch_id
    lock_batches(session, [batch_id])
    result = session.execute(
        update(Job)
        .where(*_held(claim))
        .values(**values, finished_at=utcnow(), claim_token=None, lease_expires_at=None)
    )
    ended = bool(result.rowcount == 1)  # type: ignore[attr-defined]
    if ended:
        # The webhook event is written with the ending it tells of (an outbox).
        status = values["status"].value
        job_ended(session, claim.job.owner, claim.job.id, status, claim.job.callback_url)
    if ended and outcome is not None:
        count_lines_ended(
            session,
            batch_id,
            succeeded=1,
            prompt_tokens=claim.job.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
            cost=outcome.cost_input + outcome.cost_output,
        )
    if ended and outcome is not None and claim.job.sampling.get("n", 1) == 1:
        # A job of n samples is not cached: an entry holds one answer.
        cache.remember(
            session,
            claim.job,
            response_text=outcome.response_text,
            response_uri=outcome.response_uri,
            finish_reason=outcome.finish_reason,
            completion_tokens=outcome.completion_tokens,
            logprobs=outcome.logprobs,
            ttl_seconds=cache_ttl_seconds,
        )
    if ended and outcome is None:
        count_lines_ended(session, batch_id, failed=1)
    session.commit()
    return ended


def record_success(
    session: Session,
    claim: Claim,
    outcome: Outcome,
    cache_ttl_seconds: float = CACHE_TTL_SECONDS,
) -> bool:
    """Record a result once: only the current claim of a running job can; False otherwise.
    A job that asked for the cache stores its answer there for `cache_ttl_seconds`, in the
    same transaction. Its own transaction, committed here, like every step of the job's
    state machine."""
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
            "logprobs": outcome.logprobs,
            "choices": outcome.choices,
        },
        outcome,
        cache_ttl_seconds,
    )


def record_failure(session: Session, claim: Claim, code: str, message: str) -> bool:
    """End a job failed, under its current claim. Its own transaction, committed here."""
    return _finish(
        session,
        claim,
        {"status": JobStatus.failed, "error_code": code, "error_message": message},
    )


def _give_back(session: Session, claim: Claim, max_attempts: int, code: str, message: str) -> bool:
    """Queue a claimed job again, or fail it once it is out of attempts; True if queued.
    Its own transaction, committed here."""
    if claim.job.attempts >= max_attempts:
        _finish(
            session,
            claim,
            {"status": JobStatus.failed, "error_code": code, "error_message": message},
        )
        return False
    result = session.execute(
        update(Job)
        .where(*_held(claim))
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


def release_expired(session: Session, max_attempts: int, now: datetime | None = None) -> list[str]:
    """Put jobs with an expired claim back in the queue, or fail those out of attempts.

    Two set-based UPDATEs, whatever the number of jobs, through the `(status,
    lease_expires_at)` index; one transaction, committed here. Each rechecks the lease as it
    takes the row, so a worker that renewed its lease meanwhile keeps its job. Returns the
    ids of the jobs queued again: never published (`enqueued_at` NULL), they are the first
    that `due_for_publish` wakes workers for.
    """
    now = now or utcnow()
    expired = (
        Job.status == JobStatus.running,
        Job.lease_expires_at < now,
        Job.claim_token.is_not(None),
    )
    released = update(Job).execution_options(synchronize_session=False)
    out_of_attempts = (*expired, Job.attempts >= max_attempts)
    # Rare (a job whose worker died on it every time): its batch's row is taken first, before
    # any job's row, as every path that ends a batch's lines does.
    lock_batches(session, session.scalars(select(Job.batch_id).where(*out_of_attempts)))
    requeued = session.scalars(
        released.where(*expired, Job.attempts < max_attempts)
        .values(status=JobStatus.queued, enqueued_at=None, claim_token=None, lease_expires_at=None)
        .returning(Job.id)
    ).all()
    failed = session.execute(
        released.where(*out_of_attempts)
        .values(
            status=JobStatus.failed,
            error_code="worker_lost",
            error_message=literal("the worker running this job stopped ")
            + cast(Job.attempts, String)
            + " times",
            finished_at=utcnow(),
            claim_token=None,
            lease_expires_at=None,
        )
        .returning(Job.batch_id, Job.id, Job.owner, Job.callback_url)
    ).all()
    for batch_id, lines in Counter(row.batch_id for row in failed).items():
        count_lines_ended(session, batch_id, failed=lines)
    emit(
        session,
        [
            Ending(row.owner, "job.failed", row.id, row.callback_url)
            for row in failed
            if row.callback_url
        ],
    )
    session.commit()
    return list(requeued)


# The most messages one maintenance pass publishes for a model. A worker runs a batch per
# message, a few batches between two passes (a batch of a 7B model takes seconds; a pass
# comes every maintenance_interval_seconds), and every worker runs the pass: what the passes
# publish together grows with the number of workers, and each pass marks at most this many
# batches' worth of rows.
MESSAGES_PER_MODEL = 8
MODEL_NAMES = tuple(spec.name for spec in MODELS)


@dataclass(frozen=True)
class Wake:
    """A message to publish for `model`: it stands for the queued jobs in `covers`, which
    were marked enqueued with it, and names the first of them."""

    model: str
    covers: list[str]

    @property
    def job_id(self) -> str:
        return self.covers[0]


def due_for_publish(
    session: Session,
    requeue_after_seconds: float,
    jobs_per_message: int,
    now: datetime | None = None,
    messages_per_model: int = MESSAGES_PER_MODEL,
    start_limit: int = 1000,
) -> list[Wake]:
    """Start the scheduled jobs that are due, and take the messages to publish for queued
    jobs that have no live message. Its own transaction, committed here.

    A queued job has no live message once it was never published (`enqueued_at` NULL: a
    broker that was down, a job given back) or was published more than
    `requeue_after_seconds` ago (a broker restart can drop messages). A message only wakes a
    worker, which then claims a whole batch of whatever is queued: so one message stands for
    `jobs_per_message` (the batch size) such jobs, and each model gets at most
    `messages_per_model` messages a pass, never-published jobs first, then the longest
    published. The jobs a message stands for are marked enqueued now, with it, so that they
    are not published again for another `requeue_after_seconds`, by this pass or any other
    maintainer's (marking skips rows another has locked, and rechecks that they are still
    unpublished). The caller publishes each `Wake`, and gives back with `forget_enqueued`
    those it could not publish.

    Every statement reads a partial index (queued jobs by model and `enqueued_at`, scheduled
    jobs by `run_at`), so a pass never reads a finished row, and reads at most
    `messages_per_model * jobs_per_message` entries a model however long the queue. At most
    `start_limit` scheduled jobs start a pass, the longest due first.
    """
    now = now or utcnow()
    due = (
        select(Job.id)
        .where(Job.status == JobStatus.scheduled, Job.run_at <= now)
        .order_by(Job.run_at)
        .limit(start_limit)
        .with_for_update(skip_locked=True)
    )
    session.execute(
        update(Job)
        .where(Job.id.in_(due), Job.status == JobStatus.scheduled)
        .values(status=JobStatus.queued, enqueued_at=None)
        .execution_options(synchronize_session=False)
    )
    stale = now - timedelta(seconds=requeue_after_seconds)
    wanted = messages_per_model * jobs_per_message
    wakes: list[Wake] = []
    for model in MODEL_NAMES:
        queued = select(Job.id).where(Job.model == model, Job.status == JobStatus.queued)
        ids = _mark_enqueued(session, queued.where(Job.enqueued_at.is_(None)).limit(wanted), now)
        if len(ids) < wanted:
            published_long_ago = (
                queued.where(Job.enqueued_at < stale)
                .order_by(Job.enqueued_at)
                .limit(wanted - len(ids))
            )
            ids += _mark_enqueued(session, published_long_ago, now)
        wakes += [
            Wake(model, covers)
            for covers in (
                ids[i : i + jobs_per_message] for i in range(0, len(ids), jobs_per_message)
            )
        ]
    session.commit()
    return wakes


def _mark_enqueued(session: Session, candidates: Select[str], now: datetime) -> list[str]:
    """Mark the `candidates` enqueued at `now`, but those another transaction holds; their
    ids."""
    return list(
        session.scalars(
            update(Job)
            .where(Job.id.in_(candidates.with_for_update(skip_locked=True)))
            .values(enqueued_at=now)
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        )
    )


def forget_enqueued(session: Session, job_ids: list[str]) -> None:
    """Jobs whose message could not be published after all: unpublished again, so that the
    next pass publishes them first. Its own transaction, committed here."""
    session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.status == JobStatus.queued)
        .values(enqueued_at=None)
        .execution_options(synchronize_session=False)
    )
    session.commit()


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
