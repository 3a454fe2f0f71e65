"""Retrying a batch: a finished batch's lines that did not succeed are copied, as they were
sent, into a new input file, and a new batch is made of it with the same endpoint, metadata,
callback and `max_cost`, marked as the retry of the first.
"""

import tempfile

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs import files
from jobs.batches.store import create_batch
from jobs.errors import Conflict
from jobs.models import Batch, FileObject, Job, JobStatus
from jobs.schemas.batches import BatchCreate
from jobs.settings import Settings
from jobs.storage import Storage


def retry_failed(
    session: Session, storage: Storage, owner: str, batch: Batch, settings: Settings
) -> Batch:
    """A new batch of the lines of `batch` that did not succeed, from a new input file."""
    if not batch.status.finished:
        raise Conflict(f"batch {batch.id} has not ended ({batch.status.value})", param="id")
    source = session.get(FileObject, batch.input_file_id)
    if source is None:
        raise Conflict(f"the input file of batch {batch.id} was deleted", param="id")
    succeeded = set(
        session.scalars(
            select(Job.line).where(Job.batch_id == batch.id, Job.status == JobStatus.succeeded)
        )
    )
    with tempfile.TemporaryFile() as out, files.open_stored(storage, source, "id") as stream:
        kept = 0
        for number, raw in enumerate(files.read_lines(stream, 1 << 62), start=1):
            if raw is None or not raw.strip() or number in succeeded:
                continue
            out.write(raw + b"\n")
            kept += 1
        if not kept:
            raise Conflict(f"batch {batch.id} has no failed lines", param="id")
        file = files.create_file(
            session,
            storage,
            owner,
            f"{batch.id}_retry.jsonl",
            files.INPUT_PURPOSE,
            out,  # type: ignore[arg-type]
            max_bytes=1 << 62,
            max_lines=1 << 62,
        )
    body = BatchCreate(
        input_file_id=file.id,
        endpoint=batch.endpoint,  # type: ignore[arg-type]
        metadata=batch.metadata_,
        callback_url=batch.callback_url,
        max_cost=batch.max_cost,
        cache=batch.cache,
    )
    retry, _ = create_batch(session, owner, body, settings)
    retry.retry_of = batch.id
    session.flush()
    return retry
