"""Firing schedules: each due schedule, in a transaction of its own, makes the run of its
latest fire time and moves on to its next one.

One run per fire time, however many processes fire (every `mbatch beat`, every worker's
maintenance pass):
- a schedule is fired under its row lock, taken with SKIP LOCKED, and only while it is still
  due: a process that comes second skips it, or finds it no longer due once the first has
  committed (Postgres re-reads a row it locks after waiting);
- the run row's key is (schedule, fire time), so a second insert of it is refused;
- the job or batch is made under the idempotency key `sch:<id>:<fire time>`, so a second
  attempt returns the first one's;
and the run row, the job (or batch) and the schedule's next fire time commit together.

A schedule that missed fires (nothing was running) fires once, for the latest of them, and
is next due at its first fire after now.
"""

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from pydantic import ValidationError
from sqlalchemy import Select, not_, select, update
from sqlalchemy.orm import Session

from jobs import batches
from jobs.db import add_once
from jobs.errors import MbatchError, describe, main_error
from jobs.models import Schedule, ScheduleRun
from jobs.queue import JobQueue
from jobs.schedules import cron, store
from jobs.schemas.schedules import within
from jobs.service import job_id_for, submit_job
from jobs.settings import Settings
from jobs.storage import Storage
from jobs.timeutil import aware, utcnow

log = logging.getLogger(__name__)

SessionScope = Callable[[], AbstractContextManager[Session]]
# Schedules fired per call; the rest are due still, and the next call takes them.
FIRE_LIMIT = 100
# A fire that failed unexpectedly (an outage, a bug) is tried again after this long.
RETRY_AFTER = timedelta(seconds=60)
STARTED, FAILED = "started", "failed"


def run_key(schedule_id: str, fire_time: datetime) -> str:
    """The idempotency key of the job or batch a fire makes."""
    return f"sch:{schedule_id}:{fire_time.astimezone(UTC).isoformat()}"


def due_query(now: datetime) -> Select[str]:
    """The ids of the schedules due at `now`, the longest due first: read through the
    partial index of active schedules, so paused ones and those due later cost nothing."""
    return (
        select(Schedule.id)
        .where(not_(Schedule.paused), Schedule.next_run_at <= now)
        .order_by(Schedule.next_run_at)
        .limit(FIRE_LIMIT)
    )


def fire_due(
    scope: SessionScope,
    storage: Storage,
    queue: JobQueue,
    settings: Settings,
    now: datetime | None = None,
) -> int:
    """Fire the schedules that are due at `now` (default: the time), each fire time once;
    how many runs were made (failed ones included)."""
    now = now or utcnow()
    with scope() as session:
        due = list(session.scalars(due_query(now)))
    made = 0
    for schedule_id in due:
        try:
            made += _fire(scope, storage, queue, settings, schedule_id, now)
        except Exception:  # an outage, a bug: logged, and the others fire anyway
            log.exception("could not fire schedule %s; trying again later", schedule_id)
            _postpone(scope, schedule_id, now)
    return made


def _postpone(scope: SessionScope, schedule_id: str, now: datetime) -> None:
    """A schedule whose fire failed for no reason of its own is tried again after a pause,
    behind the schedules that are due: one that keeps failing neither fires every second nor
    holds up the others. Its missed fire still runs once (for its latest slot)."""
    try:
        with scope() as session:
            session.execute(
                update(Schedule)
                .where(Schedule.id == schedule_id, Schedule.next_run_at <= now)
                .values(next_run_at=now + RETRY_AFTER)
            )
    except Exception:  # the database is away too: the schedule is still due, and waits
        log.warning("could not postpone schedule %s", schedule_id, exc_info=True)


def _fire(
    scope: SessionScope,
    storage: Storage,
    queue: JobQueue,
    settings: Settings,
    schedule_id: str,
    now: datetime,
) -> int:
    """Fire one schedule if it is still due and no one else is firing it; 1 if this call
    made its run."""
    with scope() as session:
        schedule = session.scalar(
            select(Schedule)
            .where(Schedule.id == schedule_id, not_(Schedule.paused), Schedule.next_run_at <= now)
            .with_for_update(skip_locked=True)
        )
        if schedule is None:  # fired, paused or deleted meanwhile, or being fired elsewhere
            return 0
        tz = cron.zone(schedule.timezone)
        due_at = aware(schedule.next_run_at)
        assert due_at is not None
        # The latest slot, not the one it was due at: missed fires run once.
        fire_time = cron.latest_fire(schedule.cron, tz, now)
        if fire_time is None or fire_time < due_at:
            fire_time = due_at
        schedule.last_run_at = fire_time
        schedule.next_run_at = cron.next_fire(schedule.cron, tz, max(now, fire_time))
        run, created = add_once(
            session,
            ScheduleRun(
                schedule_id=schedule.id,
                fire_time=fire_time,
                owner=schedule.owner,
                status=STARTED,
                created_at=utcnow(),
            ),
            lambda: session.get(ScheduleRun, (schedule.id, fire_time)),
        )
        if not created:  # this fire time has its run: only the schedule moves on
            return 0
        key = run_key(schedule.id, fire_time)
        try:
            if schedule.kind == store.JOB:
                _start_job(session, queue, settings, schedule, run, key)
                log.info("schedule %s fired for %s: %s", schedule.id, fire_time, run.job_id)
                return 1
            batch_id = _start_batch(session, settings, schedule, run, key)
        except (MbatchError, ValidationError) as exc:
            # It cannot start (its file or adapter was deleted, it would cost too much): a
            # failed run, with why; the schedule fires again at its next time.
            run.status, run.error = FAILED, _reason(schedule.kind, exc)
            run.job_id = run.batch_id = None
            log.info("schedule %s could not start its run of %s: %s", schedule.id, fire_time, exc)
            return 1
    log.info("schedule %s fired for %s: %s", schedule_id, fire_time, batch_id)
    # Committed: the batch's lines are checked and queued at once, not after the grace
    # period maintenance waits before it takes up a validation (a crash leaves it to that),
    # and beside the loop, so that a large file does not hold up the other schedules.
    if batch_id is not None:
        threading.Thread(
            target=batches.validate_batch,
            args=(scope, storage, queue, settings, batch_id),
            name=f"validate-{batch_id}",
            daemon=True,
        ).start()
    return 1


def _reason(kind: str, exc: MbatchError | ValidationError) -> str:
    if isinstance(exc, ValidationError):  # a body kept from before a change of its schema
        return "invalid_parameter: " + describe(main_error(exc.errors()), prefix=kind)[1]
    return f"{exc.code}: {exc.message}"


def _start_job(
    session: Session,
    queue: JobQueue,
    settings: Settings,
    schedule: Schedule,
    run: ScheduleRun,
    key: str,
) -> None:
    """Submit the run's job; `submit_job` commits it with the run and the schedule's move,
    then publishes it."""
    prepared = store.prepare_job(
        session, schedule.owner, store.job_body(schedule), settings, schedule.max_cost
    )
    run.job_id = job_id_for(schedule.owner, key)
    submit_job(
        session, queue, schedule.owner, replace(prepared, callback_url=schedule.callback_url), key
    )


def _start_batch(
    session: Session, settings: Settings, schedule: Schedule, run: ScheduleRun, key: str
) -> str | None:
    """Record the run's batch (committed by the caller); its id when it is new."""
    # The callback URL was checked when the schedule was made, and delivery checks the
    # address it connects to: a run does not wait on a DNS lookup (job runs do not either).
    body = store.batch_body(schedule).model_copy(update={"callback_url": None})
    try:
        batch, created = batches.create_batch(session, schedule.owner, body, settings, key)
    except MbatchError as exc:
        raise within(store.BATCH, exc) from None
    batch.callback_url = schedule.callback_url
    run.batch_id = batch.id
    return batch.id if created else None
