"""Batches: the lines of an input file run as jobs (the OpenAI Batch API)."""

from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Query, Response
from fastapi.responses import StreamingResponse

from api.deps import (
    IdempotencyKeyDep,
    OwnerDep,
    QueueDep,
    ScopeDep,
    SessionDep,
    SettingsDep,
    StorageDep,
)
from jobs import batches, files
from jobs.schemas.batches import BatchCreate, BatchEstimate, BatchList, BatchPublic

router = APIRouter(prefix="/v1/batches", tags=["batches"])

JSONL = "application/jsonl"
# The output's document: JSONL, not JSON, and the cursor header that comes with it.
OUTPUT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The finished lines, one JSON object per line.",
        "content": {JSONL: {"schema": {"type": "string"}}},
        "headers": {
            batches.RESUME_HEADER: {
                "description": "Pass as `after` next time: every line up to it has finished.",
                "schema": {"type": "integer", "minimum": 0},
            }
        },
    }
}


@router.post("", response_model=BatchPublic | BatchEstimate)
def create_batch(
    body: BatchCreate,
    response: Response,
    background: BackgroundTasks,
    session: SessionDep,
    scope: ScopeDep,
    settings: SettingsDep,
    owner: OwnerDep,
    queue: QueueDep,
    storage: StorageDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> BatchPublic | BatchEstimate:
    """Start a batch from an uploaded file, or with `dry_run` only count its tokens and cost."""
    if body.dry_run:
        file = batches.input_file(session, owner, body.input_file_id)
        with files.open_stored(storage, file, "input_file_id") as stream:
            return batches.estimate(session, stream, owner, file.id, body.endpoint, settings)
    batch, created = batches.create_batch(session, owner, body, settings, idempotency_key)
    if created:
        background.add_task(batches.validate_batch, scope, storage, queue, settings, batch.id)
    else:
        response.headers["Idempotent-Replayed"] = "true"
    return BatchPublic.of(batch)


@router.get("", response_model=BatchList)
def list_batches(
    session: SessionDep,
    owner: OwnerDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> BatchList:
    """Your batches, newest first; pass the last id of a page as `after` for the next."""
    page, has_more = batches.list_batches(session, owner, after, limit)
    return BatchList(
        data=[BatchPublic.of(b) for b in page],
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=has_more,
    )


@router.get("/{batch_id}", response_model=BatchPublic)
def get_batch(batch_id: str, session: SessionDep, owner: OwnerDep) -> BatchPublic:
    """A batch's status, request counts, usage and files."""
    return BatchPublic.of(batches.get_batch(session, owner, batch_id))


@router.get("/{batch_id}/output", response_class=StreamingResponse, responses=OUTPUT_RESPONSES)
def get_batch_output(
    batch_id: str,
    session: SessionDep,
    scope: ScopeDep,
    owner: OwnerDep,
    storage: StorageDep,
    after: Annotated[int, Query(ge=0, le=batches.MAX_LINE)] = 0,
    limit: Annotated[int | None, Query(ge=1, le=batches.MAX_LINE)] = None,
) -> StreamingResponse:
    """The lines finished so far past line `after`, as JSONL, in any state of the batch.

    Lines finish out of order: pass the `x-mbatch-resume-after` header back as `after` to miss
    none, and drop the lines past it that come again by their `id`."""
    batch = batches.get_batch(session, owner, batch_id)
    finished = batches.finished_lines(scope, storage, batch, after, limit)
    return StreamingResponse(
        finished.chunks,
        media_type=JSONL,
        headers={batches.RESUME_HEADER: str(finished.resume_after)},
    )


@router.post("/{batch_id}/cancel", response_model=BatchPublic)
def cancel_batch(
    batch_id: str,
    background: BackgroundTasks,
    session: SessionDep,
    scope: ScopeDep,
    settings: SettingsDep,
    owner: OwnerDep,
    storage: StorageDep,
) -> BatchPublic:
    """Stop a batch; it is `cancelled`, with the lines that finished, once its files are written."""
    batch = batches.cancel_batch(session, batches.get_batch(session, owner, batch_id))
    background.add_task(batches.finalize, scope, storage, settings, batch.id)
    return BatchPublic.of(batch)


@router.post("/{batch_id}/retry", response_model=BatchPublic)
def retry_batch(
    batch_id: str,
    background: BackgroundTasks,
    session: SessionDep,
    scope: ScopeDep,
    settings: SettingsDep,
    owner: OwnerDep,
    queue: QueueDep,
    storage: StorageDep,
) -> BatchPublic:
    """A new batch of the lines of an ended batch that did not succeed."""
    source = batches.get_batch(session, owner, batch_id)
    retry = batches.retry_failed(session, storage, owner, source, settings)
    background.add_task(batches.validate_batch, scope, storage, queue, settings, retry.id)
    return BatchPublic.of(retry)
