"""Finalizing a batch: once its lines have all ended (or it was cancelled or expired), its
output and error files are written, in line order, under the step's lease, and the batch gets
its final status and counts. A line whose stored result is lost becomes an error line rather
than failing the file; `finalize_if_done` is what the worker calls after each static batch.
Like every step (see `steps`), it is a unit of work of its own, and commits as it goes.
"""

import hashlib
import heapq
import json
import logging
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from jobs import files
from jobs.batches.output_format import error_line, output_line
from jobs.batches.steps import SessionScope, Step, StepTakenOver, renew_step, step_guard, take_step
from jobs.batches.store import STEP_RESET, has_unfinished_lines, line_job_id, spent
from jobs.models import Batch, BatchStatus, Job, JobStatus, LineError
from jobs.schemas.jobs import RESULT_UNAVAILABLE, choice_texts, response_text
from jobs.settings import Settings
from jobs.storage import Storage
from jobs.timeutil import utcnow
from jobs.webhooks.events import batch_ended

log = logging.getLogger(__name__)

RENEW_EVERY_LINES = 1000


def _file_id(batch_id: str, kind: str) -> str:
    return "file-" + hashlib.sha256(f"{batch_id}\x00{kind}".encode()).hexdigest()[:24]


def finalize(scope: SessionScope, storage: Storage, settings: Settings, batch_id: str) -> bool:
    """Write the output and error files of a batch whose lines have all ended, and give it
    its final status. False where there is nothing to do yet."""
    done = False
    with step_guard(scope, settings, batch_id, "finalizing") as step:
        done = _finalize(scope, storage, settings, step)
    return done


def finalize_if_done(
    scope: SessionScope, storage: Storage, settings: Settings, batch_ids: Iterable[str]
) -> None:
    for batch_id in set(batch_ids):
        finalize(scope, storage, settings, batch_id)


def _begin_finalizing(session: Session, batch_id: str) -> None:
    """An in-progress batch whose lines have all ended moves on to `finalizing`. Looked at
    under the batch row's lock: of two workers that record its last two lines at once, the
    second looks after the first has, sees both lines ended, and the batch moves on at once
    rather than at the next maintenance pass."""
    if has_unfinished_lines(session, batch_id):
        return  # the common case, after each static batch: no lock taken
    batch = session.scalar(
        select(Batch)
        .where(Batch.id == batch_id, Batch.status == BatchStatus.in_progress)
        .with_for_update()
    )
    if batch is not None and not has_unfinished_lines(session, batch_id):
        batch.status, batch.finalizing_at = BatchStatus.finalizing, utcnow()
    session.commit()


def _finalize(scope: SessionScope, storage: Storage, settings: Settings, step: Step) -> bool:
    with scope() as session:
        _begin_finalizing(session, step.batch_id)
        batch = take_step(session, settings, step, [BatchStatus.finalizing, BatchStatus.cancelling])
        if batch is None:
            return False
        session.expunge(batch)
    if batch.status == BatchStatus.cancelling:
        final = BatchStatus.cancelled
    elif batch.expired_at is not None:
        final = BatchStatus.expired
    elif batch.total and batch.invalid == batch.total:
        final = BatchStatus.failed
    else:
        final = BatchStatus.completed

    with scope() as session:
        lost: list[tuple[int, dict[str, Any]]] = []
        output = _output_lines(session, storage, batch, lost)
        output_id, completed = _write_file(session, storage, scope, step, batch, "output", output)
        errors = _error_lines(session, batch, lost)
        error_id, failed = _write_file(session, storage, scope, step, batch, "errors", errors)
        prompt_tokens, completion_tokens, cost = spent(session, batch.id)
        values: dict[str, Any] = {
            "status": final,
            f"{final.value}_at": utcnow(),
            "output_file_id": output_id,
            "error_file_id": error_id,
            "completed": completed,
            "failed": failed,
            # Frozen exact, from the lines, whatever the running counters say.
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "cost": cost,
            **STEP_RESET,
        }
        if final == BatchStatus.failed:
            first = session.scalars(
                select(LineError)
                .where(LineError.batch_id == batch.id)
                .order_by(LineError.line)
                .limit(100)
            ).all()
            values["errors"] = [
                {"code": e.code, "message": e.message, "param": e.param, "line": e.line}
                for e in first
            ]
        ended = session.execute(
            update(Batch)
            .where(*step.held(), Batch.status.in_([BatchStatus.finalizing, BatchStatus.cancelling]))
            .values(**values)
        )
        if ended.rowcount == 1:  # type: ignore[attr-defined]
            # The webhook event commits with the ending it tells of (an outbox).
            batch_ended(session, batch.owner, batch.id, final.value, batch.callback_url)
        session.commit()
    if ended.rowcount != 1:  # type: ignore[attr-defined]
        log.warning("batch %s: finalizing was taken over; its files are the other's", batch.id)
        return False
    log.info("batch %s %s: %d completed, %d failed", batch.id, final.value, completed, failed)
    return True


def _write_file(
    session: Session,
    storage: Storage,
    scope: SessionScope,
    step: Step,
    batch: Batch,
    kind: str,
    lines: Iterable[dict[str, Any]],
) -> tuple[str | None, int]:
    """One of the batch's files. Writing a large batch's file out takes longer than a lease
    lasts, so the step's lease is renewed as it goes."""
    count = 0
    with tempfile.TemporaryFile() as out:
        for line in lines:
            out.write(json.dumps(line, ensure_ascii=False).encode() + b"\n")
            count += 1
            if count % RENEW_EVERY_LINES == 0 and not renew_step(scope, step):
                raise StepTakenOver(f"batch {batch.id}: {step.name} was taken over")
        if not count:
            return None, 0
        out.seek(0)
        file_id = _file_id(batch.id, kind)
        files.save_output(
            session, storage, batch.owner, file_id, f"{batch.id}_{kind}.jsonl", out, count
        )
        session.commit()
    return file_id, count


def _jobs_of(session: Session, batch_id: str, *condition: Any) -> Iterator[Job]:
    query = (
        select(Job)
        .where(Job.batch_id == batch_id, *condition)
        .order_by(Job.line)
        .execution_options(yield_per=500)
    )
    yield from session.scalars(query)


def succeeded_line(job: Job, storage: Storage, endpoint: str) -> dict[str, Any]:
    """A succeeded line's output line; where its stored result is gone or unreadable, the
    error line it becomes (an outage still raises: the caller waits it out)."""
    try:
        text = response_text(job, storage) or ""
        others = choice_texts(job, storage)
    except KeyError:
        message = "the result was recorded but its stored copy is gone"
        line = job.line or 0
        return error_line(job.id, job.custom_id, line, RESULT_UNAVAILABLE, message)
    return output_line(job, text, endpoint, others)


def ended_line(job: Job) -> dict[str, Any]:
    """The error line of a line that ended without succeeding: failed, cancelled or expired."""
    return error_line(
        job.id,
        job.custom_id,
        job.line or 0,
        job.error_code or "failed",
        job.error_message or "the request failed",
    )


def refused_line(batch_id: str, refused: LineError) -> dict[str, Any]:
    """The error line of a line refused at validation, which never became a job."""
    return error_line(
        line_job_id(batch_id, refused.line),
        refused.custom_id,
        refused.line,
        refused.code,
        refused.message,
        refused.param,
    )


def _output_lines(
    session: Session, storage: Storage, batch: Batch, lost: list[tuple[int, dict[str, Any]]]
) -> Iterator[dict[str, Any]]:
    """The output file's lines; a line whose stored result is gone or unreadable is added to
    `lost`, as the error line it becomes, rather than failing the whole file."""
    for job in _jobs_of(session, batch.id, Job.status == JobStatus.succeeded):
        line = succeeded_line(job, storage, batch.endpoint)
        if line["error"] is not None:
            lost.append((job.line or 0, line))
            continue
        yield line


def _error_lines(
    session: Session, batch: Batch, lost: list[tuple[int, dict[str, Any]]]
) -> Iterator[dict[str, Any]]:
    """The error file's lines, in line order: refused lines, lines that did not succeed,
    and lines whose result was lost (read after the output file was written)."""
    refused = (
        (e.line, refused_line(batch.id, e))
        for e in session.scalars(
            select(LineError).where(LineError.batch_id == batch.id).order_by(LineError.line)
        )
    )
    ended = (
        (job.line or 0, ended_line(job))
        for job in _jobs_of(session, batch.id, Job.status != JobStatus.succeeded)
    )
    by_line = heapq.merge(refused, ended, lost, key=lambda pair: pair[0])
    return (line for _, line in by_line)
