"""The schedule rows: creating one (every check a run would meet, made at once), getting,
listing, changing and deleting an owner's schedules, and listing a schedule's runs. The body
a schedule keeps is read back with `job_body` / `batch_body`, as its POST would read it."""

import json
import secrets
from datetime import datetime
from decimal import Decimal

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from jobs import batches
from jobs.db import newest_first
from jobs.errors import InvalidParameter, MbatchError, NotFound
from jobs.loras import adapter_for_job
from jobs.models import Schedule, ScheduleRun
from jobs.pricing import price
from jobs.schedules import cron
from jobs.schemas.batches import BatchCreate
from jobs.schemas.native import JobCreate
from jobs.schemas.schedules import ScheduleCreate, ScheduleUpdate, within
from jobs.service import PreparedJob, prepare_native
from jobs.settings import Settings
from jobs.timeutil import aware, utcnow
from jobs.webhooks.addresses import check_callback_url

JOB, BATCH = "job", "batch"
# Fields of the bodies that a schedule sets itself, for every run: giving them in the body
# would be ambiguous (or, for an idempotency key, would make every run the first one).
_SET_BY_SCHEDULE = {
    JOB: {
        "callback_url": "set callback_url on the schedule; each run inherits it",
        "idempotency_key": "each run's key is the schedule id and its fire time",
        "run_at": "a schedule's runs start at their fire times",
    },
    BATCH: {
        "callback_url": "set callback_url on the schedule; each run inherits it",
        "max_cost": "set max_cost on the schedule; each run's batch gets it",
        "idempotency_key": "each run's key is the schedule id and its fire time",
        "dry_run": "a schedule runs its batch; estimate one with POST /v1/batches",
    },
}


def job_body(schedule: Schedule) -> JobCreate:
    """The schedule's job body, read as `POST /v1/jobs` reads one (from JSON)."""
    return JobCreate.model_validate_json(json.dumps(schedule.body))


def batch_body(schedule: Schedule) -> BatchCreate:
    """The schedule's batch body with the schedule's callback_url and max_cost, as
    `POST /v1/batches` reads one."""
    body = BatchCreate.model_validate_json(json.dumps(schedule.body))
    return body.model_copy(
        update={"callback_url": schedule.callback_url, "max_cost": schedule.max_cost}
    )


def check_job_cost(prepared: PreparedJob, max_cost: Decimal | None) -> None:
    """InvalidParameter("max_cost") if the job could cost more than `max_cost`: its prompt,
    and every token max_tokens allows in each of its n samples, at the model's price."""
    if max_cost is None:
        return
    sampling = prepared.sampling
    worst = price(prepared.spec, prepared.prompt_tokens, sampling.max_tokens * sampling.n).total
    if worst > max_cost:
        raise InvalidParameter(
            "max_cost",
            max_cost,
            f"a run of this job may cost up to {worst} (its prompt and max_tokens "
            f"{sampling.max_tokens} for each of {sampling.n} samples at "
            f"{prepared.spec.name}'s price)",
        )


def prepare_job(
    session: Session, owner: str, body: JobCreate, settings: Settings, max_cost: Decimal | None
) -> PreparedJob:
    """The checks `POST /v1/jobs` makes of a job (its adapter included), and the run's
    max_cost; errors name the fields under `job`."""
    try:
        prepared = prepare_native(body, settings)
        if prepared.lora is not None:
            adapter_for_job(session, owner, prepared.spec, prepared.lora)
    except MbatchError as exc:
        raise within(JOB, exc) from None
    check_job_cost(prepared, max_cost)
    return prepared


def _check_body(session: Session, owner: str, body: ScheduleCreate, settings: Settings) -> str:
    """Which kind of run the schedule makes, its body checked as its own POST would check
    it; errors name the fields from the request's top."""
    if body.job is None and body.batch is None:
        raise InvalidParameter("job", None, "give either job (a native job) or batch")
    if body.job is not None and body.batch is not None:
        raise InvalidParameter("batch", "...", "give either job or batch, not both")
    kind, given = (JOB, body.job) if body.job is not None else (BATCH, body.batch)
    assert given is not None
    for field, reason in _SET_BY_SCHEDULE[kind].items():
        if getattr(given, field) not in (None, False):
            raise InvalidParameter(f"{kind}.{field}", getattr(given, field), reason)
    if body.job is not None:
        prepare_job(session, owner, body.job, settings, body.max_cost)
    elif body.batch is not None:
        try:
            # As POST /v1/batches answers it: another owner's file is one that does not exist.
            batches.input_file(session, owner, body.batch.input_file_id)
        except MbatchError as exc:
            raise within(BATCH, exc) from None
    return kind


def create_schedule(
    session: Session,
    owner: str,
    body: ScheduleCreate,
    settings: Settings,
    now: datetime | None = None,
) -> Schedule:
    """Record a schedule (flushed), due at its first fire after `now` unless paused."""
    expr, timezone = cron.check_timing(
        body.cron, body.timezone, settings.schedule_min_interval_seconds
    )
    kind = _check_body(session, owner, body, settings)
    if body.callback_url is not None:
        check_callback_url(body.callback_url, settings.webhook_allow_private)
    given = body.job if body.job is not None else body.batch
    assert given is not None
    now = now or utcnow()
    schedule = Schedule(
        id="sch_" + secrets.token_hex(12),
        owner=owner,
        name=body.name,
        cron=expr,
        timezone=timezone,
        kind=kind,
        # What the caller gave, so that each fire reads it as the POST would have.
        body=given.model_dump(mode="json", exclude_unset=True),
        callback_url=body.callback_url,
        max_cost=body.max_cost,
        paused=body.paused,
        next_run_at=None if body.paused else cron.next_fire(expr, cron.zone(timezone), now),
        created_at=now,
    )
    session.add(schedule)
    session.flush()
    return schedule


def get_schedule(session: Session, owner: str, schedule_id: str) -> Schedule:
    schedule = session.scalar(
        select(Schedule).where(Schedule.id == schedule_id, Schedule.owner == owner)
    )
    if schedule is None:
        raise NotFound(f"no schedule {schedule_id}", param="schedule_id")
    return schedule


def list_schedules(
    session: Session, owner: str, after: str | None, limit: int
) -> tuple[list[Schedule], bool]:
    """Newest first; `after` is the id of the last schedule of the page before."""
    query = select(Schedule).where(Schedule.owner == owner)
    return newest_first(session, query, after, limit, "schedule")


def update_schedule(
    session: Session,
    schedule: Schedule,
    body: ScheduleUpdate,
    settings: Settings,
    now: datetime | None = None,
) -> Schedule:
    """Change the cron, the zone or whether it is paused (flushed). A schedule changed or
    resumed is next due at its first fire after `now`: fires missed while it was paused do
    not run."""
    for field in ("cron", "timezone", "paused"):
        if field in body.model_fields_set and getattr(body, field) is None:
            raise InvalidParameter(field, None, "must not be null; leave it out to keep it")
    expr, timezone = schedule.cron, schedule.timezone
    if body.cron is not None or body.timezone is not None:
        # Only a new timing is checked: pausing a schedule made under an older, lower
        # minimum interval still works.
        expr, timezone = cron.check_timing(
            body.cron if body.cron is not None else schedule.cron,
            body.timezone if body.timezone is not None else schedule.timezone,
            settings.schedule_min_interval_seconds,
        )
    paused = body.paused if body.paused is not None else schedule.paused
    retimed = expr != schedule.cron or timezone != schedule.timezone
    resumed = schedule.paused and not paused
    schedule.cron, schedule.timezone, schedule.paused = expr, timezone, paused
    if paused:
        schedule.next_run_at = None
    elif retimed or resumed or schedule.next_run_at is None:
        schedule.next_run_at = cron.next_fire(expr, cron.zone(timezone), now or utcnow())
    session.flush()
    return schedule


def delete_schedule(session: Session, schedule: Schedule) -> None:
    """The schedule and its record of runs (flushed); the jobs and batches it made stay."""
    session.execute(delete(ScheduleRun).where(ScheduleRun.schedule_id == schedule.id))
    session.delete(schedule)
    session.flush()


def list_runs(
    session: Session, schedule: Schedule, after: datetime | None, limit: int
) -> tuple[list[ScheduleRun], bool]:
    """Newest fire first; `after` is the fire time of the last run of the page before."""
    query = select(ScheduleRun).where(ScheduleRun.schedule_id == schedule.id)
    if after is not None:
        query = query.where(ScheduleRun.fire_time < (aware(after) or after))
    rows = list(session.scalars(query.order_by(ScheduleRun.fire_time.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
