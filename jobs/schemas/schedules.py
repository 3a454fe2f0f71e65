"""Schedules: a native job or a batch body, run again at each fire time of a cron expression."""

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
)

from jobs.errors import MbatchError
from jobs.models import Schedule, ScheduleRun
from jobs.schemas.base import Money, RequestModel
from jobs.schemas.batches import BatchCreate
from jobs.schemas.native import JobCreate
from jobs.timeutil import aware


def within(prefix: str, exc: MbatchError) -> MbatchError:
    """`exc` about a field of the body under `prefix`, named from the request's top
    (`job.max_tokens`, not `max_tokens`)."""
    if exc.param is not None and not exc.param.startswith(f"{prefix}."):
        if exc.message.startswith(exc.param):
            exc.message = f"{prefix}.{exc.message}"
        exc.param = f"{prefix}.{exc.param}"
    return exc


class ScheduleCreate(RequestModel):
    """`POST /v1/schedules`: a cron in a time zone, and either a native job body (`job`) or a
    `POST /v1/batches` body (`batch`) that each fire runs again."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=256)]
    # 5 fields (minute hour day month weekday), or 6 with seconds first.
    cron: Annotated[str, Field(min_length=1, max_length=256)]
    timezone: Annotated[str, Field(min_length=1, max_length=64)] = "UTC"
    job: JobCreate | None = None
    batch: BatchCreate | None = None
    # Given to each job or batch a fire makes.
    callback_url: Annotated[str, Field(max_length=2048)] | None = None
    # Each run's limit: a batch's own max_cost; a job whose worst case costs more is refused.
    max_cost: Annotated[Money, Field(gt=0, max_digits=20, decimal_places=10)] | None = None
    paused: bool = False

    @field_validator("job", "batch", mode="wrap")
    @classmethod
    def _name_nested(
        cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Any:
        # The body's own checks raise our errors with the body's field names; the caller
        # sent them one level down.
        try:
            return handler(value)
        except MbatchError as exc:
            raise within(str(info.field_name), exc) from None


class ScheduleUpdate(RequestModel):
    """`PATCH /v1/schedules/{id}`: the fields given change; the others stay."""

    model_config = ConfigDict(extra="forbid")

    cron: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    timezone: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    paused: bool | None = None


class SchedulePublic(BaseModel):
    id: str
    object: Literal["schedule"] = "schedule"
    name: str
    cron: str
    timezone: str
    job: dict[str, Any] | None
    batch: dict[str, Any] | None
    callback_url: str | None
    max_cost: float | None
    paused: bool
    # When it fires next (null while paused), and the fire time of its last run.
    next_run_at: datetime | None
    last_run_at: datetime | None
    created_at: datetime

    @classmethod
    def of(cls, schedule: Schedule) -> "SchedulePublic":
        return cls(
            id=schedule.id,
            name=schedule.name,
            cron=schedule.cron,
            timezone=schedule.timezone,
            job=schedule.body if schedule.kind == "job" else None,
            batch=schedule.body if schedule.kind == "batch" else None,
            callback_url=schedule.callback_url,
            max_cost=_money(schedule.max_cost),
            paused=schedule.paused,
            next_run_at=aware(schedule.next_run_at),
            last_run_at=aware(schedule.last_run_at),
            created_at=aware(schedule.created_at) or schedule.created_at,
        )


def _money(value: Decimal | None) -> float | None:
    return float(value) if value is not None else None


class ScheduleList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SchedulePublic]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ScheduleDeleted(BaseModel):
    id: str
    object: Literal["schedule"] = "schedule"
    deleted: bool = True


class ScheduleRunPublic(BaseModel):
    object: Literal["schedule.run"] = "schedule.run"
    schedule_id: str
    fire_time: datetime
    # "started": it made `job_id` or `batch_id`; "failed": it could not start, see `error`.
    status: str
    job_id: str | None
    batch_id: str | None
    error: str | None
    created_at: datetime

    @classmethod
    def of(cls, run: ScheduleRun) -> "ScheduleRunPublic":
        return cls(
            schedule_id=run.schedule_id,
            fire_time=aware(run.fire_time) or run.fire_time,
            status=run.status,
            job_id=run.job_id,
            batch_id=run.batch_id,
            error=run.error,
            created_at=aware(run.created_at) or run.created_at,
        )


class ScheduleRunList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ScheduleRunPublic]
    has_more: bool
