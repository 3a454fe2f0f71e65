"""Validating a batch: the `validating` step reads the input file, checks each line, and
records the good lines as queued jobs and the bad ones as line errors, in chunks, each chunk
under the step's lease and only while the batch is still validating. A line's job id is fixed
by its batch and line number, so a step taken up again adds nothing twice. In a batch with
`cache` on, a deterministic line whose request the owner's result cache holds is recorded as
a job that has already succeeded (`jobs.cache`), counted on the batch with its chunk, and never
queued. The batch then moves on to `in_progress`, or straight to finalizing when no line was
good; one whose lines were all answered from the cache finalizes at once.
Like every step (see `steps`), it is a unit of work of its own, and commits as it goes.
"""

import logging
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from jobs import cache, files, queries
from jobs.batches.finalizing import finalize
from jobs.batches.lines import InvalidLine, LineChecker, ValidLine, check_file, owner_adapters
from jobs.batches.steps import STEP_LEASE, SessionScope, Step, step_guard, take_step
from jobs.batches.store import STEP_RESET, line_job_id
from jobs.db import insert_ignoring_duplicates
from jobs.models import Batch, BatchStatus, FileObject, Job, JobStatus, Lane, LineError
from jobs.queue import JobQueue
from jobs.registry import resolve_model
from jobs.settings import Settings
from jobs.storage import Storage
from jobs.timeutil import utcnow
from jobs.webhooks.events import batch_ended

log = logging.getLogger(__name__)


def validate_batch(
    scope: SessionScope, storage: Storage, queue: JobQueue, settings: Settings, batch_id: str
) -> None:
    """The batch's `validating` step: each line checked, good lines enqueued as jobs in
    chunks, bad lines recorded with their line number and why. Ends `in_progress`, or
    `failed` when no line was good."""
    with step_guard(scope, settings, batch_id, "validation") as step:
        _validate(scope, storage, queue, settings, step)


def _job_row(batch: Batch, line: ValidLine) -> dict[str, Any]:
    prepared, now = line.prepared, utcnow()
    return {
        "id": line_job_id(batch.id, line.line),
        "owner": batch.owner,
        "model": prepared.spec.name,
        "lora": prepared.lora,
        "lora_id": line.lora_id,
        "status": JobStatus.queued,
        "input": prepared.input,
        "sampling": prepared.sampling.to_dict(),
        "prompt_tokens": prepared.prompt_tokens,
        "attempts": 0,
        "created_at": now,
        "enqueued_at": now,
        "batch_id": batch.id,
        "custom_id": line.custom_id,
        "line": line.line,
        "lane": Lane.file_batch.value,
    }


def _validate(
    scope: SessionScope, storage: Storage, queue: JobQueue, settings: Settings, step: Step
) -> None:
    with scope() as session:
        batch = take_step(session, settings, step, [BatchStatus.validating])
        if batch is None:
            return
        session.expunge(batch)
        file = session.get(FileObject, batch.input_file_id)
        if file is not None:
            session.expunge(file)
    if file is None:
        _fail(scope, step, "file_not_found", "the input file was deleted")
        return
    try:
        stream = files.open_stored(storage, file, "input_file_id")
    except files.ContentUnavailable as gone:  # for good: no try would find it
        _fail(scope, step, gone.code, gone.message)
        return
    total = invalid = 0
    with scope() as session, stream:
        checker = LineChecker(batch.endpoint, settings, owner_adapters(session, batch.owner))
        pending: list[ValidLine | InvalidLine] = []
        for result in check_file(stream, checker, settings.max_request_bytes):
            total += 1
            invalid += isinstance(result, InvalidLine)
            pending.append(result)
            if len(pending) >= settings.batch_chunk_lines:
                if not _enqueue(session, queue, storage, settings, batch, step, pending):
                    return  # cancelled, expired or taken over meanwhile
                pending = []
        if not _enqueue(session, queue, storage, settings, batch, step, pending):
            return
    with scope() as session:
        now = utcnow()
        values: dict[str, Any] = {"total": total, "invalid": invalid, **STEP_RESET}
        if total == invalid:
            values.update(status=BatchStatus.finalizing, finalizing_at=now)
        else:
            values.update(status=BatchStatus.in_progress, in_progress_at=now)
        session.execute(
            update(Batch)
            .where(*step.held(), Batch.status == BatchStatus.validating)
            .values(**values)
        )
        session.commit()
    log.info("batch %s validated: %d lines, %d refused", batch.id, total, invalid)
    # Lines may have run while the rest were checked: the last of them found the batch
    # still validating, so whether it has ended is asked now.
    finalize(scope, storage, settings, batch.id)


def _answer_from_cache(
    session: Session, storage: Storage, batch: Batch, jobs: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Record the chunk's lines that the owner's result cache answers as succeeded jobs,
    each with its own copy of a large answer, and count those this take added on the batch
    (under its row's lock, taken by the caller). Returns the lines left to queue."""
    cache.set_keys(session, jobs)
    keys = [job["cache_key"] for job in jobs if job["cache_key"] is not None]
    hits = cache.find_hits(session, storage, batch.owner, keys)
    if not hits:
        return jobs
    now = utcnow()
    answered = {
        job["id"]: (
            hits[job["cache_key"]],
            {**job, **hits[job["cache_key"]].job_values(job["id"], now)},
        )
        for job in jobs
        if job["cache_key"] in hits
    }
    added = cache.insert_new_jobs(session, [row for _, row in answered.values()])
    for job_id in sorted(added):
        answered[job_id][0].store_copy(storage, job_id)
    rows = [answered[job_id][1] for job_id in added]
    queries.count_lines_ended(
        session,
        batch.id,
        succeeded=len(rows),
        prompt_tokens=sum(row["prompt_tokens"] for row in rows),
        completion_tokens=sum(row["completion_tokens"] for row in rows),
    )
    return [job for job in jobs if job["id"] not in answered]


def _enqueue(
    session: Session,
    queue: JobQueue,
    storage: Storage,
    settings: Settings,
    batch: Batch,
    step: Step,
    results: list[ValidLine | InvalidLine],
) -> bool:
    """Record one chunk of checked lines, if the batch is still validating and the step
    still ours (its lease renewed with it); then wake the workers, one message per batch's
    worth of jobs (a message only says there is work)."""
    status = session.scalar(select(Batch.status).where(*step.held()).with_for_update())
    if status != BatchStatus.validating:
        session.rollback()
        return False
    jobs = [_job_row(batch, r) for r in results if isinstance(r, ValidLine)]
    if batch.cache:
        jobs = _answer_from_cache(session, storage, batch, jobs)
    errors = [
        {
            "batch_id": batch.id,
            "line": r.line,
            "custom_id": r.custom_id,
            "code": r.code,
            "message": r.message,
            "param": r.param,
        }
        for r in results
        if isinstance(r, InvalidLine)
    ]
    insert_ignoring_duplicates(session, Job.__table__, jobs)
    insert_ignoring_duplicates(session, LineError.__table__, errors)
    session.execute(
        update(Batch).where(*step.held()).values(lease_expires_at=utcnow() + STEP_LEASE)
    )
    session.commit()
    for model in {job["model"] for job in jobs}:
        ids = [job["id"] for job in jobs if job["model"] == model]
        for job_id in ids[:: settings.max_batch_size]:
            try:
                queue.publish(job_id, resolve_model(model).queue)
            except Exception:  # the broker is away: maintenance publishes queued jobs later
                log.exception("could not publish batch %s's jobs", batch.id)
                break
    return True


def _fail(scope: SessionScope, step: Step, code: str, message: str) -> None:
    """The batch cannot be validated, and no try would change that: it ends `failed`."""
    with scope() as session:
        failed = session.execute(
            update(Batch)
            .where(*step.held(), Batch.status == BatchStatus.validating)
            .values(
                status=BatchStatus.failed,
                failed_at=utcnow(),
                errors=[{"code": code, "message": message}],
                **STEP_RESET,
            )
            .returning(Batch.owner, Batch.callback_url)
        ).one_or_none()
        if failed is not None:
            # The webhook event commits with the ending it tells of (an outbox).
            batch_ended(
                session, failed.owner, step.batch_id, BatchStatus.failed.value, failed.callback_url
            )
        session.commit()
