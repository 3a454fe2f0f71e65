"""Native jobs: the Workers AI request schema, run asynchronously."""

from fastapi import APIRouter, BackgroundTasks, Response, status

from api.deps import (
    IdempotencyKeyDep,
    OwnerDep,
    QueueDep,
    ScopeDep,
    SessionDep,
    SettingsDep,
    StorageDep,
)
from jobs import batches, queries, service
from jobs.schemas.jobs import JobPublic, job_public
from jobs.schemas.native import JobCreate

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobPublic)
def create_job(
    body: JobCreate,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    owner: OwnerDep,
    queue: QueueDep,
    storage: StorageDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> JobPublic:
    """Queue a prompt or chat job; answers at once with its id."""
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
