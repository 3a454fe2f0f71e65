"""The job state machine in Postgres: claims, recording once, and finding dead workers' jobs."""

from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal

import pytest
from sqlalchemy.orm import Session

from jobs import queries
from jobs.db import get_session_factory
from jobs.models import Job, JobStatus
from jobs.queries import Outcome
from jobs.settings import Settings
from jobs.timeutil import utcnow
from tests.factories import make_job

OUTCOME = Outcome(
    completion_tokens=3,
    finish_reason="length",
    response_text="abc",
    response_uri=None,
    cost_input=Decimal("0.000001"),
    cost_output=Decimal("0.000002"),
    compute_seconds=0.5,
)
MODEL = "tiny-random-mistral"


@pytest.fixture
def db(api_settings: Settings) -> Iterator[Session]:
    session = get_session_factory(api_settings.database_url)()
    # Earlier tests leave unfinished jobs in this database; start from none.
    unfinished = (JobStatus.queued, JobStatus.running, JobStatus.scheduled)
    session.query(Job).filter(Job.status.in_(unfinished)).update({"status": JobStatus.cancelled})
    session.commit()
    yield session
    session.close()


def test_a_result_is_recorded_once(db: Session, api_settings: Settings) -> None:
    job = make_job(db, api_settings)
    [claim] = queries.claim_batch(db, MODEL, "w1", 60, 10, first_id=job.id)
    assert queries.record_success(db, claim, OUTCOME)
    # The same message again: nothing to claim, and the old claim cannot record again.
    assert queries.claim_batch(db, MODEL, "w1", 60, 10, first_id=job.id) == []
    assert not queries.record_success(db, claim, OUTCOME)
    db.refresh(job)
    assert job.status == JobStatus.succeeded and job.attempts == 1


def test_two_claimers_never_share_a_job(db: Session, api_settings: Settings) -> None:
    jobs = [make_job(db, api_settings) for _ in range(6)]
    other = get_session_factory(api_settings.database_url)()
    try:
        first = queries.claim_batch(db, MODEL, "w1", 60, 4)
        second = queries.claim_batch(other, MODEL, "w2", 60, 4)
    finally:
        other.close()
    claimed = [c.job.id for c in first + second]
    assert sorted(claimed) == sorted(j.id for j in jobs)
    assert len(first) == 4 and len(second) == 2


def test_the_message_job_comes_first(db: Session, api_settings: Settings) -> None:
    jobs = [make_job(db, api_settings) for _ in range(3)]
    claims = queries.claim_batch(db, MODEL, "w1", 60, 2, first_id=jobs[2].id)
    assert [c.job.id for c in claims] == [jobs[2].id, jobs[0].id]


def test_a_dead_workers_job_is_found_and_run_again(db: Session, api_settings: Settings) -> None:
    job = make_job(db, api_settings)
    [dead] = queries.claim_batch(db, MODEL, "dead-worker", 60, 1)
    later = utcnow() + timedelta(seconds=61)
    assert [j.id for j in queries.expired_claims(db, later)] == [job.id]
    assert [j.id for j in queries.release_expired(db, max_attempts=3, now=later)] == [job.id]
    [again] = queries.claim_batch(db, MODEL, "live-worker", 60, 1)
    assert again.job.id == job.id and again.job.attempts == 2
    # The dead worker's late result is refused; the live one's is kept.
    assert not queries.record_success(db, dead, OUTCOME)
    assert queries.record_success(db, again, OUTCOME)


def test_a_job_that_keeps_killing_workers_fails_after_max_attempts(
    db: Session, api_settings: Settings
) -> None:
    job = make_job(db, api_settings)
    for attempt in range(1, 4):
        [claim] = queries.claim_batch(db, MODEL, f"w{attempt}", 1, 1)
        later = utcnow() + timedelta(seconds=2)
        queries.release_expired(db, max_attempts=3, now=later)
    db.refresh(job)
    assert job.status == JobStatus.failed
    assert job.error_code == "worker_lost" and job.attempts == 3


def test_cancel_wins_over_a_running_claim(db: Session, api_settings: Settings) -> None:
    job = make_job(db, api_settings)
    [claim] = queries.claim_batch(db, MODEL, "w1", 60, 1)
    queries.cancel(db, job)
    assert not queries.record_success(db, claim, OUTCOME)
    db.refresh(job)
    assert job.status == JobStatus.cancelled and job.response_text is None


def test_due_scheduled_and_unpublished_jobs_are_published(
    db: Session, api_settings: Settings
) -> None:
    scheduled = make_job(db, api_settings, run_at=(utcnow() + timedelta(seconds=30)).isoformat())
    assert scheduled.status == JobStatus.scheduled
    later = utcnow() + timedelta(seconds=31)
    due = queries.due_for_publish(db, requeue_after_seconds=3600, now=later)
    assert scheduled.id in {j.id for j in due}
    db.refresh(scheduled)
    assert scheduled.status == JobStatus.queued
