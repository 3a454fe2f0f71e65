"""Job persistence: every change of a job's state is one conditional UPDATE in Postgres.

The conditions make the state machine safe against redelivered messages, dead workers and
racing processes: a job is claimed only while queued, and a result is recorded only by the
holder of the current claim, so it is recorded at most once.
"""

import secrets
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Integer,
    Select,
    String,
    bindparam,
    case,
    cast,
    func,
    literal,
    literal_column,
    select,
    union_all,
    update,
)
from sqlalchemy.orm import Session, aliased

from jobs import cache
from jobs.errors import NotFound
from jobs.models import Batch, BatchStatus, Job, JobStatus, Lane
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


# The lanes a batch is filled from, in that order: interactive, native jobs, file-batch lines.
LANES: tuple[int, ...] = tuple(lane.value for lane in Lane)
# How many owners of each lane a claim looks at, unless told otherwise.
OWNERS_PER_LANE = 16


@dataclass
class OwnerRotation:
    """Where each lane's next look at its owners starts. A look takes at most
    `owners_per_lane` owners, in the order of their names, starting after `start_after[lane]`
    and going round to the first owner; when it took that many, the next one starts after the
    last it took, so that with more owners than one look takes, each owner's turn comes. A
    worker keeps one, in memory."""

    owners_per_lane: int = OWNERS_PER_LANE
    start_after: dict[int, str] = field(default_factory=dict)


def is_queued(session: Session, job_id: str) -> bool:
    return session.scalar(select(Job.status).where(Job.id == job_id)) == JobStatus.queued


def queued_lane(session: Session, job_id: str) -> int | None:
    """The lane of job `job_id` while it is queued; None once it is not (or never was)."""
    return session.scalar(select(Job.lane).where(Job.id == job_id, Job.status == JobStatus.queued))


# "Queued", written into the statement rather than sent as a parameter: the partial indexes
# of queued jobs serve a statement only where its condition implies theirs, which a plan made
# for any value of a parameter cannot (once psycopg prepares a statement it runs five times,
# Postgres may choose such a generic plan, and a probe of the index becomes a read of the
# table).
QUEUED = Job.status == literal_column(f"'{JobStatus.queued.value}'")


def _in_lanes(lanes: Sequence[int]) -> ColumnElement[bool]:
    return Job.lane == lanes[0] if len(lanes) == 1 else Job.lane.in_(lanes)


def count_queued(
    session: Session, model: str, at_most: int = 1, lanes: Sequence[int] | None = None
) -> int:
    """How many jobs of `model` are queued (in `lanes`, or any), counted no further than
    `at_most`: the cost stays that of reading `at_most` index entries however long the queue
    (with the default, 1 or 0: whether any job waits). With `lanes`, it reads the partial
    index of queued jobs by lane, so that a look at an empty interactive lane is one probe
    even behind a million file-batch lines."""
    queued = select(Job.id).where(Job.model == model, QUEUED)
    if lanes is not None:
        queued = queued.where(_in_lanes(lanes))
    subquery = queued.limit(at_most).subquery()
    return int(session.scalar(select(func.count()).select_from(subquery)) or 0)


def _owner_scan(lane: int, part: int, after: bool, upto: bool) -> Select[Any]:
    """A loose index scan: up to `:most` distinct owners with queued jobs of `:model` in
    `lane`, in the order of their names: from the first, or after `:after_<lane>` (`after`),
    or up to it, inclusive (`upto`). One probe of `ix_jobs_queued_lane_owner` per owner,
    however many jobs each has queued: a recursive query whose every step asks for the next
    owner name after the last."""
    bound = bindparam(f"after_{lane}", type_=String)

    def next_owner(last: Any) -> Any:
        probe = select(Job.owner).where(
            Job.model == bindparam("model", type_=String), QUEUED, Job.lane == lane
        )
        if upto:
            probe = probe.where(Job.owner <= bound)
        if last is not None:
            probe = probe.where(Job.owner > last)
        return probe.order_by(Job.owner).limit(1).scalar_subquery()

    first = select(
        next_owner(bound if after else None).label("owner"), literal_column("1").label("n")
    )
    scan = first.cte(f"owners_{lane}_{part}", recursive=True)
    scan = scan.union_all(
        select(next_owner(scan.c.owner), scan.c.n + 1).where(
            scan.c.owner.is_not(None), scan.c.n < bindparam("most", type_=Integer)
        )
    )
    return select(
        literal_column(str(lane)).label("lane"),
        literal_column(str(part)).label("part"),
        scan.c.n,
        scan.c.owner,
    ).where(scan.c.owner.is_not(None))


@lru_cache(maxsize=64)
def _owners_statement(started: tuple[tuple[int, bool], ...]) -> Select[Any]:
    """The look at the owners of the lanes in `started`, each from its first owner or, where
    it has started before, after the last it took and then round to the first. Built once per
    shape (the values are parameters), so that a claim spends no time building it."""
    scans = []
    for lane, start in started:
        scans.append(_owner_scan(lane, 0, after=start, upto=False))
        if start:  # round to the first owner, up to where this look started
            scans.append(_owner_scan(lane, 1, after=False, upto=True))
    return scans[0] if len(scans) == 1 else union_all(*scans)  # type: ignore[return-value]


def queued_owners(
    session: Session, model: str, lanes: Sequence[int], rotation: OwnerRotation
) -> dict[int, list[str]]:
    """The owners with queued jobs of `model` in each of `lanes`, at most
    `rotation.owners_per_lane` a lane, starting where `rotation` says (and moving it on).
    One statement, of at most two probes per owner returned."""
    most = rotation.owners_per_lane
    starts = {lane: rotation.start_after.get(lane) for lane in lanes}
    statement = _owners_statement(tuple((lane, starts[lane] is not None) for lane in lanes))
    values: dict[str, Any] = {"model": model, "most": most}
    values |= {f"after_{lane}": start for lane, start in starts.items() if start is not None}
    found: dict[int, list[str]] = {lane: [] for lane in lanes}
    for lane, _, _, owner in sorted(tuple(row) for row in session.execute(statement, values)):
        found[lane].append(owner)
    for lane in lanes:
        found[lane] = found[lane][:most]
        if len(found[lane]) == most:
            rotation.start_after[lane] = found[lane][-1]
        else:
            rotation.start_after.pop(lane, None)  # every owner was seen: start at the first
    return found


@dataclass(frozen=True)
class _Take:
    """The oldest `count` queued jobs of one owner in one lane, after those in `seen`."""

    lane: int
    owner: str
    count: int
    seen: tuple[Job, ...] = ()


@lru_cache(maxsize=256)
def _oldest_statement(after_seen: tuple[bool, ...], exclude: bool) -> Select[Any]:
    """The oldest queued jobs of `:model` of each owner `:owner_<i>` in lane `:lane_<i>`, at
    most `:count_<i>`, after `:last_<i>` (bar `:ties_<i>`) where `after_seen[i]`, and not
    `:exclude`; locked, skipping the rows another claimer holds. Per owner, the head of its
    range of `ix_jobs_queued_lane_owner`. Built once per shape, like `_owners_statement`."""
    parts = []
    for i, seen in enumerate(after_seen):
        part = select(Job).where(
            Job.model == bindparam("model", type_=String),
            QUEUED,
            Job.lane == bindparam(f"lane_{i}", type_=Integer),
            Job.owner == bindparam(f"owner_{i}", type_=String),
        )
        if exclude:
            part = part.where(Job.id != bindparam("exclude", type_=String))
        if seen:
            part = part.where(
                Job.created_at >= bindparam(f"last_{i}", type_=Job.created_at.type),
                Job.id.not_in(bindparam(f"ties_{i}", expanding=True, type_=String)),
            )
        parts.append(
            part.order_by(Job.created_at)
            .limit(bindparam(f"count_{i}", type_=Integer))
            .with_for_update(skip_locked=True)
        )
    if len(parts) == 1:
        return parts[0]
    # FOR UPDATE may not stand beside UNION: each part locks its rows in a subquery of its own.
    every = union_all(*(select(part.subquery()) for part in parts)).subquery()
    return select(aliased(Job, every))


def _oldest(session: Session, model: str, takes: list[_Take], exclude: str | None) -> list[Job]:
    """The jobs `takes` ask for, locked (rows another claimer holds are skipped), in one
    statement."""
    if not takes:
        return []
    values: dict[str, Any] = {"model": model, "exclude": exclude}
    for i, take in enumerate(takes):
        values |= {f"lane_{i}": take.lane, f"owner_{i}": take.owner, f"count_{i}": take.count}
        if take.seen:
            # After the last job taken before (those created in the same instant excepted).
            last = max(job.created_at for job in take.seen)
            values[f"last_{i}"] = last
            values[f"ties_{i}"] = [job.id for job in take.seen if job.created_at == last]
    if exclude is None:
        del values["exclude"]
    statement = _oldest_statement(tuple(bool(t.seen) for t in takes), exclude is not None)
    return list(session.scalars(statement, values))


def queued_candidates(
    session: Session,
    model: str,
    limit: int,
    lanes: Sequence[int] = LANES,
    lane_min: int | None = None,
    rotation: OwnerRotation | None = None,
    exclude: str | None = None,
) -> list[Job]:
    """Queued jobs of `model` to choose a batch among, locked for this transaction (rows
    another claimer holds are skipped): about `limit` of them, from each lane in `lanes`
    (in that order of priority) and each owner with work there, oldest first per owner.

    The first lane with work may fill all `limit`; each lane after it gets at least
    `lane_min` (all `limit` by default), and more when the lanes before it fall short. In a
    lane, the owners share its part evenly, at least one job each, and owners with more jobs
    fill in for those with fewer. Returned by lane, then owner (in the order the look took
    them), then age.

    Bounded whatever the queue's length: the owners of every lane in one statement (a loose
    index scan of `ix_jobs_queued_lane_owner`, at most `rotation.owners_per_lane` a lane,
    taking turns across claims where there are more), their oldest jobs in a second (the
    head of each owner's range of the same index), and, where some owners fell short, those
    of the others who had more in a third. SQLite runs the same statements, without the
    locks."""
    rotation = rotation if rotation is not None else OwnerRotation()
    owners = queued_owners(session, model, lanes, rotation)
    busy = [lane for lane in lanes if owners[lane]]
    floor = limit if lane_min is None else min(lane_min, limit)
    takes: list[_Take] = []
    skipped: list[int] = []
    for index, lane in enumerate(busy):
        share = limit if index == 0 else floor
        if share <= 0:
            skipped.append(lane)
            continue
        each = max(1, -(-share // len(owners[lane])))
        takes += [_Take(lane, owner, each) for owner in owners[lane]]
    found = _oldest(session, model, takes, exclude)
    short = limit - len(found)
    if short > 0:
        mine: dict[tuple[int, str], list[Job]] = {}
        for job in found:
            mine.setdefault((job.lane, job.owner), []).append(job)
        # Owners that gave all they were asked for may have more; skipped lanes, everything.
        more = [take for take in takes if len(mine.get((take.lane, take.owner), [])) == take.count]
        more += [_Take(lane, owner, 0) for lane in skipped for owner in owners[lane]]
        if more:
            each = max(1, -(-short // len(more)))
            again = [
                _Take(t.lane, t.owner, each, tuple(mine.get((t.lane, t.owner), []))) for t in more
            ]
            found += _oldest(session, model, again, exclude)
    rank = {
        (lane, owner): (lanes.index(lane), n)
        for lane in busy
        for n, owner in enumerate(owners[lane])
    }
    return sorted(found, key=lambda job: (rank[job.lane, job.owner], job.created_at, job.id))


def claim_batch(
    session: Session,
    model: str,
    worker_id: str,
    lease_seconds: int,
    limit: int,
    first_id: str | None = None,
    choose: Callable[[list[Job]], list[Job]] | None = None,
    lanes: Sequence[int] = LANES,
    lane_min: int | None = None,
    rotation: OwnerRotation | None = None,
) -> list[Claim]:
    """Claim queued jobs of `model`: of about `limit` candidates (`first_id` first, then
    `queued_candidates` of `lanes`: by lane, owner and age), those that `choose` picks, or
    the first `limit` of them.

    Rows locked by another claimer are skipped (Postgres `SKIP LOCKED`), so concurrent
    workers never claim the same job. Each claim counts as an attempt, and the jobs claimed
    together share a decode group id (`grp_...`). Its own transaction, committed here: a
    claim is a step of the job's state machine, visible to every worker at once.

    A bounded number of statements whatever the queue's length: the message's job by primary
    key, the candidates through `ix_jobs_queued_lane_owner` (two or three statements, see
    `queued_candidates`), then one UPDATE of the chosen rows that gives each its own token
    and returns the claimed rows whole.
    """
    candidates: list[Job] = []
    if first_id is not None:
        first = select(Job).where(
            Job.id == first_id, Job.model == model, Job.status == JobStatus.queued
        )
        if set(lanes) != set(LANES):
            first = first.where(_in_lanes(lanes))
        # The message's own job waits for a lock another holds rather than skip it: the
        # submission that published the message may still hold its row for a moment (it
        # notes when the message went out), and a job skipped then would have no message
        # left to wake a worker for it. Another claimer that takes it commits it running,
        # which this statement then sees, and leaves.
        candidates.extend(session.scalars(first.with_for_update()).all())
    if limit > len(candidates):
        candidates.extend(
            queued_candidates(
                session,
                model,
                limit - len(candidates),
                lanes=lanes,
                lane_min=lane_min,
                rotation=rotation,
                exclude=first_id,
            )
        )
    chosen = choose(candidates) if choose is not None else candidates[:limit]
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
