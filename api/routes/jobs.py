"""Native jobs: the Workers AI request schema, run asynchronously, or streamed to a caller who
waits."""

from functools import partial

from fastapi import APIRouter, BackgroundTasks, Response, status
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import (
    IdempotencyKeyDep,
    OwnerDep,
    QueueDep,
    ScopeDep,
    SessionDep,
    SettingsDep,
    StorageDep,
)
from api.dialects.workers_ai import ResponseEvents
from api.interactive import InteractiveDep, event_stream_response
from jobs import batches, queries, service
from jobs.queue import JobQueue
from jobs.schemas.jobs import JobPublic, job_public
from jobs.schemas.native import JobCreate, StreamableJobCreate
from jobs.settings import Settings
from jobs.storage import Storage

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

STREAM = event_stream_response(
    'With `stream: true`: `data: {"response": ...}` events, then `data: [DONE]`.'
)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    responses={200: STREAM},
)
async def create_job(
    body: StreamableJobCreate,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    owner: OwnerDep,
    queue: QueueDep,
    storage: StorageDep,
    interactive: InteractiveDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> JobPublic | Response:
    """Queue a prompt or chat job and answer its id; with `stream: true`, stream its text."""
    if body.stream:
        submission = await interactive.submit(
            partial(service.prepare_native, body, settings),
            stream=True,
            idempotency_key=idempotency_key,
        )
        return await interactive.stream(submission, ResponseEvents())
    return await run_in_threadpool(
        _queue_job, body, response, session, settings, owner, queue, storage, idempotency_key
    )


def _queue_job(
    body: JobCreate,
    response: Response,
    session: Session,
    settings: Settings,
    owner: str,
    queue: JobQueue,
    storage: Storage,
    idempotency_key: str | None,
) -> JobPublic:
    prepared = service.prepare_native(body, settings)
    job, created = service.submit_job(
        session, queue, owner, prepared, idempotency_key, storage=storage
    )
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return job_public(job, storage)


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job_id: str, session: SessionDep, owner: OwnerDep, storage: StorageDep) -> JobPublic:
    """A job's status, and its result, usage and cost once it has finished."""
    return job_public(queries.get_owned_job(session, owner, job_id), storage)


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(
    job_id: str,
    background: BackgroundTasks,
    session: SessionDep,
    scope: ScopeDep,
    settings: SettingsDep,
    owner: OwnerDep,
    storage: StorageDep,
) -> JobPublic:
    """Cancel a job that has not finished."""
    job = service.cancel_job(session, owner, job_id)
    if job.batch_id is not None:  # it may have been its batch's last line
        background.add_task(batches.finalize, scope, storage, settings, job.batch_id)
    return job_public(job, storage)
