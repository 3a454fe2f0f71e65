"""Schedules: a job or batch run again at each fire time of a cron expression."""

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, status

from api.deps import OwnerDep, SessionDep, SettingsDep
from jobs import schedules
from jobs.schemas.schedules import (
    ScheduleCreate,
    ScheduleDeleted,
    ScheduleList,
    SchedulePublic,
    ScheduleRunList,
    ScheduleRunPublic,
    ScheduleUpdate,
)

router = APIRouter(prefix="/v1/schedules", tags=["schedules"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=SchedulePublic)
def create_schedule(
    body: ScheduleCreate, session: SessionDep, settings: SettingsDep, owner: OwnerDep
) -> SchedulePublic:
    """Run a job or batch body at each fire time of a cron expression in a time zone."""
    return SchedulePublic.of(schedules.create_schedule(session, owner, body, settings))


@router.get("", response_model=ScheduleList)
def list_schedules(
    session: SessionDep,
    owner: OwnerDep,
    after: Annotated[str, Query(max_length=64)] | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> ScheduleList:
    """Your schedules, newest first; pass the last id of a page as `after` for the next."""
    page, has_more = schedules.list_schedules(session, owner, after, limit)
    return ScheduleList(
        data=[SchedulePublic.of(s) for s in page],
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=has_more,
    )


@router.get("/{schedule_id}", response_model=SchedulePublic)
def get_schedule(schedule_id: str, session: SessionDep, owner: OwnerDep) -> SchedulePublic:
    """A schedule, with when it fires next and when it last fired."""
    return SchedulePublic.of(schedules.get_schedule(session, owner, schedule_id))


@router.patch("/{schedule_id}", response_model=SchedulePublic)
def update_schedule(
    schedule_id: str,
    body: ScheduleUpdate,
    session: SessionDep,
    settings: SettingsDep,
    owner: OwnerDep,
) -> SchedulePublic:
    """Change a schedule's cron, time zone, or whether it is paused."""
    schedule = schedules.get_schedule(session, owner, schedule_id)
    return SchedulePublic.of(schedules.update_schedule(session, schedule, body, settings))


@router.delete("/{schedule_id}", response_model=ScheduleDeleted)
def delete_schedule(schedule_id: str, session: SessionDep, owner: OwnerDep) -> ScheduleDeleted:
    """Delete a schedule; the jobs and batches it made stay."""
    schedules.delete_schedule(session, schedules.get_schedule(session, owner, schedule_id))
    return ScheduleDeleted(id=schedule_id)


@router.get("/{schedule_id}/runs", response_model=ScheduleRunList)
def list_runs(
    schedule_id: str,
    session: SessionDep,
    owner: OwnerDep,
    after: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> ScheduleRunList:
    """The jobs and batches a schedule made, newest fire time first; `after` is a fire time."""
    schedule = schedules.get_schedule(session, owner, schedule_id)
    page, has_more = schedules.list_runs(session, schedule, after, limit)
    return ScheduleRunList(data=[ScheduleRunPublic.of(r) for r in page], has_more=has_more)
