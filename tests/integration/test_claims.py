"""The job state machine in Postgres: claims, recording once, and finding dead workers' jobs."""

import threading
import time
from datetime import datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from jobs import queries
from jobs.db import get_session_factory, session_scope
from jobs.maintenance import maintain
from jobs.models import Job, JobStatus
from jobs.queries import Claim, Outcome
from jobs.queue import InProcessQueue
from jobs.settings import Settings
from jobs.timeutil import utcnow
from tests.factories import make_job
from worker.batch_choice import BatchChoice
from worker.services import Services

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
    assert queries.release_expired(db, max_attempts=3, now=later) == [job.id]
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
    wakes = queries.due_for_publish(db, requeue_after_seconds=3600, jobs_per_message=4, now=later)
    assert [(w.job_id, w.model, w.covers) for w in wakes] == [(scheduled.id, MODEL, [scheduled.id])]
    db.refresh(scheduled)
    assert scheduled.status == JobStatus.queued and scheduled.enqueued_at == later


def claimed_rows(db: Session, ids: list[str]) -> dict[str, Job]:
    db.expire_all()
    return {job.id: job for job in db.query(Job).filter(Job.id.in_(ids))}


def test_the_message_job_is_claimed_first_in_the_same_batch_and_whole(
    db: Session, api_settings: Settings
) -> None:
    jobs = [make_job(db, api_settings, prompt=f"job {n}", seed=n + 1) for n in range(5)]
    newest = jobs[-1]
    claims = queries.claim_batch(db, MODEL, "w1", 60, 3, first_id=newest.id)
    # The message's job first, though the newest, then the oldest others.
    assert [c.job.id for c in claims] == [newest.id, jobs[0].id, jobs[1].id]
    assert len({c.job.group_id for c in claims}) == 1
    assert claims[0].job.group_id is not None and claims[0].job.group_id.startswith("grp_")
    for claim, job in zip(claims, [newest, jobs[0], jobs[1]], strict=True):
        # The rows come back whole from the claim itself: what the worker reads is there.
        assert claim.job.status == JobStatus.running and claim.job.attempts == 1
        assert claim.job.claim_token == claim.token and claim.job.claimed_by == "w1"
        assert claim.job.input == job.input and claim.job.sampling == job.sampling
        assert claim.job.prompt_tokens == job.prompt_tokens > 0
        assert claim.job.lora_id is None and claim.job.batch_id is None
        assert claim.job.lease_expires_at is not None and claim.job.started_at is not None
    untouched = claimed_rows(db, [jobs[2].id, jobs[3].id])
    assert {j.status for j in untouched.values()} == {JobStatus.queued}
    assert {j.attempts for j in untouched.values()} == {0}


def test_a_message_whose_job_is_gone_claims_the_oldest(db: Session, api_settings: Settings) -> None:
    jobs = [make_job(db, api_settings) for _ in range(3)]
    [taken] = queries.claim_batch(db, MODEL, "w1", 60, 1, first_id=jobs[1].id)
    claims = queries.claim_batch(db, MODEL, "w2", 60, 5, first_id=jobs[1].id)
    assert taken.job.id == jobs[1].id
    assert [c.job.id for c in claims] == [jobs[0].id, jobs[2].id]


def test_each_claimed_job_has_its_own_token_and_one_attempt(
    db: Session, api_settings: Settings
) -> None:
    jobs = [make_job(db, api_settings) for _ in range(4)]
    claims = queries.claim_batch(db, MODEL, "w1", 60, 4)
    assert len({c.token for c in claims}) == 4
    rows = claimed_rows(db, [j.id for j in jobs])
    assert {c.job.id: c.token for c in claims} == {i: j.claim_token for i, j in rows.items()}
    assert {j.attempts for j in rows.values()} == {1}
    # A claim's token holds only its own job.
    first, second = claims[0], claims[1]
    assert not queries.record_success(db, Claim(first.job, second.token), OUTCOME)
    assert queries.record_success(db, first, OUTCOME)


def test_choose_picks_among_the_candidates(db: Session, api_settings: Settings) -> None:
    jobs = [make_job(db, api_settings) for _ in range(4)]
    seen: list[list[str]] = []

    def every_other(candidates: list[Job]) -> list[Job]:
        seen.append([c.id for c in candidates])
        return candidates[::2]

    claims = queries.claim_batch(db, MODEL, "w1", 60, 4, first_id=jobs[3].id, choose=every_other)
    assert seen == [[jobs[3].id, jobs[0].id, jobs[1].id, jobs[2].id]]
    assert [c.job.id for c in claims] == [jobs[3].id, jobs[1].id]
    rows = claimed_rows(db, [j.id for j in jobs])
    assert [rows[j.id].status for j in jobs] == [
        JobStatus.queued,
        JobStatus.running,
        JobStatus.queued,
        JobStatus.running,
    ]
    assert queries.claim_batch(db, MODEL, "w1", 60, 4, choose=lambda _: []) == []


def test_concurrent_claimers_never_share_a_job(db: Session, api_settings: Settings) -> None:
    """Threads with sessions of their own claim at once, some for the same message, until the
    queue is empty: every job is claimed exactly once, with one attempt."""
    jobs = [make_job(db, api_settings, seed=n + 1) for n in range(48)]
    start = threading.Barrier(6)
    batches: list[list[list[Claim]]] = [[] for _ in range(6)]
    errors: list[BaseException] = []

    def message_job(n: int) -> str:
        return jobs[-1 - n // 2].id  # two claimers per message, as for a repeated one

    def claimer(n: int) -> None:
        session = get_session_factory(api_settings.database_url)()
        try:
            start.wait()
            first: str | None = message_job(n)
            while claims := queries.claim_batch(session, MODEL, f"w{n}", 60, 5, first_id=first):
                batches[n].append(claims)
                first = None
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            session.close()

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    claims = [c for mine in batches for batch in mine for c in batch]
    ids = [c.job.id for c in claims]
    assert sorted(ids) == sorted(j.id for j in jobs)  # each once, none left
    rows = claimed_rows(db, ids)
    assert {i: j.claim_token for i, j in rows.items()} == {c.job.id: c.token for c in claims}
    assert {j.attempts for j in rows.values()} == {1}
    # A claimer that got its message's job got it first in its batch.
    for n, mine in enumerate(batches):
        if mine and message_job(n) in [c.job.id for c in mine[0]]:
            assert mine[0][0].job.id == message_job(n)


def test_expired_leases_are_released_in_one_pass(db: Session, api_settings: Settings) -> None:
    """Jobs with attempts left are queued again (unpublished, attempts kept), those out of
    attempts fail, and a job whose worker renewed its lease meanwhile stays with it."""
    again, spent, renewed = (make_job(db, api_settings) for _ in range(3))
    claims = {c.job.id: c for c in queries.claim_batch(db, MODEL, "w1", 1, 3)}
    db.execute(update(Job).where(Job.id == spent.id).values(attempts=3))
    db.commit()
    queries.renew_leases(db, [claims[renewed.id]], lease_seconds=3600)
    later = utcnow() + timedelta(seconds=2)
    assert {j.id for j in queries.expired_claims(db, later)} == {again.id, spent.id}
    assert queries.release_expired(db, max_attempts=3, now=later) == [again.id]
    rows = claimed_rows(db, [again.id, spent.id, renewed.id])
    assert rows[again.id].status == JobStatus.queued and rows[again.id].attempts == 1
    assert rows[again.id].enqueued_at is None and rows[again.id].claim_token is None
    assert rows[again.id].lease_expires_at is None
    failed = rows[spent.id]
    assert failed.status == JobStatus.failed and failed.error_code == "worker_lost"
    assert failed.error_message == "the worker running this job stopped 3 times"
    assert failed.finished_at is not None and failed.claim_token is None
    kept = rows[renewed.id]
    assert kept.status == JobStatus.running and kept.claim_token == claims[renewed.id].token
    # Nothing is released twice, and the renewed claim still records its result.
    assert queries.release_expired(db, max_attempts=3, now=later) == []
    assert queries.record_success(db, claims[renewed.id], OUTCOME)
    assert not queries.record_success(db, claims[again.id], OUTCOME)


def unpublish(db: Session, jobs: list[Job], enqueued_at: datetime | None = None) -> None:
    db.execute(update(Job).where(Job.id.in_([j.id for j in jobs])).values(enqueued_at=enqueued_at))
    db.commit()


def test_one_message_wakes_a_batch_worth_of_unpublished_jobs(
    db: Session, api_settings: Settings
) -> None:
    jobs = [make_job(db, api_settings) for _ in range(10)]
    fresh = make_job(db, api_settings)  # published just now: its message is live
    unpublish(db, jobs[:7])
    unpublish(db, jobs[7:], utcnow() - timedelta(seconds=120))  # published long ago
    wakes = queries.due_for_publish(db, requeue_after_seconds=60, jobs_per_message=4)
    assert [len(w.covers) for w in wakes] == [4, 4, 2]
    assert {w.model for w in wakes} == {MODEL}
    assert all(w.job_id == w.covers[0] for w in wakes)
    covered = [i for w in wakes for i in w.covers]
    assert set(covered[:7]) == {j.id for j in jobs[:7]}  # never published first
    assert sorted(covered) == sorted(j.id for j in jobs) and fresh.id not in covered
    # Marked with their messages: the next pass has nothing to publish.
    assert queries.due_for_publish(db, requeue_after_seconds=60, jobs_per_message=4) == []
    # A message that could not go out after all leaves its jobs to the next pass.
    queries.forget_enqueued(db, wakes[2].covers)
    [again] = queries.due_for_publish(db, requeue_after_seconds=60, jobs_per_message=4)
    assert sorted(again.covers) == sorted(wakes[2].covers)


def test_a_pass_publishes_a_bounded_number_of_messages_a_model(
    db: Session, api_settings: Settings
) -> None:
    jobs = [make_job(db, api_settings) for _ in range(13)]
    unpublish(db, jobs)
    first = queries.due_for_publish(db, 60, jobs_per_message=2, messages_per_model=3)
    assert [len(w.covers) for w in first] == [2, 2, 2]
    second = queries.due_for_publish(db, 60, jobs_per_message=2, messages_per_model=3)
    third = queries.due_for_publish(db, 60, jobs_per_message=2, messages_per_model=3)
    assert [len(w.covers) for w in second] == [2, 2, 2] and [len(w.covers) for w in third] == [1]
    covered = [i for wakes in (first, second, third) for w in wakes for i in w.covers]
    assert sorted(covered) == sorted(j.id for j in jobs)


class BrokenQueue:
    def __init__(self, works: int) -> None:
        self.works = works
        self.published: list[str] = []

    def publish(self, job_id: str, queue: str) -> None:
        if len(self.published) == self.works:
            raise ConnectionError("broker down")
        self.published.append(job_id)


def test_maintenance_publishes_per_batch_and_keeps_what_did_not_go_out(
    db: Session, api_settings: Settings
) -> None:
    settings = api_settings.model_copy(update={"max_batch_size": 4, "requeue_after_seconds": 60})
    jobs = [make_job(db, api_settings) for _ in range(9)]
    unpublish(db, jobs)
    broken = BrokenQueue(works=1)
    assert maintain(db, broken, settings) == 1
    # The two messages that failed are due again at once; the one that went out is not.
    queue = InProcessQueue()
    assert maintain(db, queue, settings) == 2
    assert maintain(db, queue, settings) == 0
    assert len(set(broken.published + queue.published)) == 3
    # A dead worker's job is given back and published in the same pass.
    [claim] = queries.claim_batch(db, MODEL, "dead", 1, 1)
    time.sleep(1.1)
    assert maintain(db, queue, settings) == 1 and queue.published[-1] == claim.job.id


def straggler_wait(
    api_settings: Settings, monkeypatch: pytest.MonkeyPatch, **tuning: Any
) -> tuple[float, list[int]]:
    """How long the straggler wait took, and what each of its looks at the queue counted."""
    settings = api_settings.model_copy(update=tuning)
    counts: list[int] = []
    count_queued = queries.count_queued

    def counting(session: Session, model: str, at_most: int = 1) -> int:
        counts.append(count_queued(session, model, at_most))
        return counts[-1]

    monkeypatch.setattr(queries, "count_queued", counting)
    scope = partial(session_scope, settings.database_url)
    choice = BatchChoice(Services(settings, scope, None, InProcessQueue()), MODEL, "w1")  # type: ignore[arg-type]
    started = time.monotonic()
    choice.wait_for_stragglers()
    return time.monotonic() - started, counts


def test_counting_the_queue_is_bounded(db: Session, api_settings: Settings) -> None:
    for _ in range(5):
        make_job(db, api_settings)
    assert queries.count_queued(db, MODEL, at_most=3) == 3
    assert queries.count_queued(db, MODEL, at_most=32) == 5
    assert queries.count_queued(db, MODEL) == 1
    assert queries.count_queued(db, "mistral-7b-instruct-v0.1") == 0


def test_the_straggler_wait_looks_at_the_queue_a_bounded_number_of_times(
    db: Session, api_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_job(db, api_settings)
    # Nothing arrives: it ends once the queue stayed quiet for batch_quiet_ms.
    took, counts = straggler_wait(
        api_settings, monkeypatch, batch_wait_ms=2000, batch_quiet_ms=100, max_batch_size=4
    )
    assert counts == [1, 1] and 0.1 <= took < 1.0
    # A full batch ends it at once.
    for _ in range(3):
        make_job(db, api_settings)
    took, counts = straggler_wait(
        api_settings, monkeypatch, batch_wait_ms=2000, batch_quiet_ms=100, max_batch_size=4
    )
    assert counts == [4] and took < 0.5
    # Jobs keep arriving: it waits batch_wait_ms, looking now and then, not every 20 ms.
    stop = threading.Event()

    def arrivals() -> None:
        session = get_session_factory(api_settings.database_url)()
        try:
            while not stop.wait(0.05):
                make_job(session, api_settings)
        finally:
            session.close()

    arriving = threading.Thread(target=arrivals)
    arriving.start()
    try:
        took, counts = straggler_wait(
            api_settings, monkeypatch, batch_wait_ms=1000, batch_quiet_ms=300, max_batch_size=1000
        )
    finally:
        stop.set()
        arriving.join()
    # Every 150 ms (batch_quiet_ms / 2): some 7 looks in the second, where 20 ms made 50.
    assert 1.0 <= took < 2.0
    assert 3 <= len(counts) <= 8, counts


def test_the_message_job_is_claimed_while_its_submission_still_holds_its_row(
    db: Session, api_settings: Settings
) -> None:
    """The submission publishes the message, then notes when it went out, an UPDATE of the
    job's row: a worker as quick as the message must wait for that row, not skip it (no other
    message would come for the job)."""
    job = make_job(db, api_settings)
    db.commit()
    holder = get_session_factory(api_settings.database_url)()
    queries.mark_enqueued(holder, [job.id])  # the row is locked until `holder` commits
    holder.flush()
    threading.Timer(0.5, holder.commit).start()
    claimer = get_session_factory(api_settings.database_url)()
    try:
        claims = queries.claim_batch(claimer, MODEL, "quick-worker", 30, 1, first_id=job.id)
    finally:
        claimer.close()
        holder.close()
    assert [claim.job.id for claim in claims] == [job.id]
