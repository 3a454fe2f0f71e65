"""Retention: what has finished is kept `retention_days` (OpenAI keeps batch files 30 days), then
deleted with its stored objects, a bounded amount per maintenance pass.

What goes, once older than the limit:
- finished jobs, by `finished_at`, with their stored results; a batch's lines go with their
  batch, so a line is kept, whatever its age, while its batch has not finished or ended within
  the limit;
- finished batches, by the time they ended, once their lines are gone: their line errors,
  then the batch with its output and error files;
- input files, by `created_at`, that no unfinished batch reads;
- webhook events that ended (delivered, or failed for good) with their attempts, once
  created before the limit and not attempted since (a redelivery keeps an event);
- schedules' runs, by when they were made (the jobs and batches they made go as above).
Nothing unfinished is ever deleted, and adapters are not deleted here. Result cache entries go
once they expire, whatever `retention_days` (they own no object: a large answer is the stored
result of the job that produced it, and goes with that job).

Each chunk (at most `chunk_rows` rows of one kind) is its own transaction: the rows are chosen
and locked (`SKIP LOCKED`, so that the maintainers of several workers share the work), one of
their objects is looked up (a storage that is down raises there, while the rows can still
stay), the rows are deleted and committed, and only then are their objects deleted. So a row
never names an object that is gone, and a crash or an outage between the two steps leaves
objects that no row names (logged): storage spent, never a job or a file lost.

Jobs are found through the partial index on finished jobs' `finished_at` (migration 0008), and
a batch's lines and line errors through their batch's key, so no query reads the queue or
scans the jobs table. Old batches and input files are found by a read of the batches and files
tables, which grow with batches and uploads, never with lines. A pass with nothing to delete
is seven short queries.
"""

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    select,
    tuple_,
)
from sqlalchemy.orm import InstrumentedAttribute, Session

from jobs.batches.steps import SessionScope
from jobs.files import INPUT_PURPOSE
from jobs.models import (
    Batch,
    BatchStatus,
    CacheEntry,
    EventStatus,
    FileObject,
    Job,
    JobStatus,
    LineError,
    ScheduleRun,
    WebhookAttempt,
    WebhookEvent,
)
from jobs.outages import unavailable
from jobs.settings import Settings
from jobs.storage import Storage
from jobs.timeutil import utcnow

log = logging.getLogger(__name__)

# Rows of one kind per chunk (one transaction), and chunks of each kind per pass.
CHUNK_ROWS = 1000
CHUNKS_PER_PASS = 10
# No chunk is started once the pass has taken this long: deleting stored objects one by one
# is slow, and the maintenance pass has other work to do on time.
PASS_SECONDS = 10.0

FINISHED_JOBS = [status for status in JobStatus if status.finished]
FINISHED_BATCHES = [status for status in BatchStatus if status.finished]
UNFINISHED_BATCHES = [status for status in BatchStatus if not status.finished]
ENDED_EVENTS = [EventStatus.delivered, EventStatus.failed]


def _one_of(column: InstrumentedAttribute[Any], values: Sequence[Any]) -> ColumnElement[bool]:
    """`column IN (...)` with the values written into the statement rather than bound, so
    that Postgres matches it to a partial index's predicate in whatever plan it keeps."""
    return column.in_(
        bindparam(f"{column.key}_in", list(values), unique=True, literal_execute=True)
    )


def _batch_ended_at() -> ColumnElement[datetime]:
    """When a finished batch ended: the time of its final status (its creation if unset)."""
    ended = case(
        {
            BatchStatus.completed: Batch.completed_at,
            BatchStatus.failed: Batch.failed_at,
            BatchStatus.expired: Batch.expired_at,
            BatchStatus.cancelled: Batch.cancelled_at,
        },
        value=Batch.status,
    )
    return func.coalesce(ended, Batch.created_at)


def _batch_past(cutoff: datetime) -> ColumnElement[bool]:
    """A batch that finished before `cutoff`. It was created before it too: said as well, so
    that an index on `created_at` can narrow the search."""
    return and_(
        _one_of(Batch.status, FINISHED_BATCHES),
        Batch.created_at < cutoff,
        _batch_ended_at() < cutoff,
    )


@dataclass
class Chunk:
    """What one chunk deleted: rows of its kind, and the stored objects they named."""

    rows: int = 0
    keys: list[str] = field(default_factory=list)


# Chooses, locks and deletes at most `limit` rows of one kind older than the cutoff.
Take = Callable[[Session, Storage, datetime, int], Chunk]


def _reachable(storage: Storage, keys: list[str]) -> None:
    """Look one of the objects up before their rows go: a storage that is down raises here,
    and the chunk rolls back with nothing deleted."""
    if keys:
        storage.exists(keys[0])


def _take_jobs(session: Session, storage: Storage, cutoff: datetime, limit: int) -> Chunk:
    """Finished jobs that ended before the cutoff, unless their batch keeps them."""
    kept_by_batch = exists().where(Batch.id == Job.batch_id, ~_batch_past(cutoff))
    rows = session.execute(
        select(Job.id, Job.response_uri, Job.choices)
        .where(_one_of(Job.status, FINISHED_JOBS), Job.finished_at < cutoff, ~kept_by_batch)
        .order_by(Job.finished_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    # The first answer's object, and those of its further samples (n > 1) kept in storage.
    keys = [uri for _, uri, _ in rows if uri]
    keys += [choice["uri"] for _, _, choices in rows for choice in choices or [] if "uri" in choice]
    _reachable(storage, keys)
    if rows:
        ids = [id_ for id_, _, _ in rows]
        session.execute(delete(Job).where(Job.id.in_(ids), _one_of(Job.status, FINISHED_JOBS)))
    return Chunk(len(rows), keys)


def _take_line_errors(session: Session, storage: Storage, cutoff: datetime, limit: int) -> Chunk:
    """The line errors of batches that finished before the cutoff."""
    key = (LineError.batch_id, LineError.line)
    chosen = select(*key).where(LineError.batch_id.in_(select(Batch.id).where(_batch_past(cutoff))))
    return _delete_chosen(session, LineError, key, chosen.limit(limit))


def _take_batches(session: Session, storage: Storage, cutoff: datetime, limit: int) -> Chunk:
    """Batches that finished before the cutoff and have no line or line error left, with
    their output and error files."""
    batches = session.execute(
        select(Batch.id, Batch.output_file_id, Batch.error_file_id)
        .where(
            _batch_past(cutoff),
            ~exists().where(Job.batch_id == Batch.id),
            ~exists().where(LineError.batch_id == Batch.id),
        )
        .order_by(Batch.created_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    file_ids = [file_id for _, *outputs in batches for file_id in outputs if file_id]
    files = _locked_files(session, FileObject.id.in_(file_ids), len(file_ids)) if file_ids else []
    keys = [key for _, key in files]
    _reachable(storage, keys)
    if files:
        session.execute(delete(FileObject).where(FileObject.id.in_([id_ for id_, _ in files])))
    if batches:
        session.execute(delete(Batch).where(Batch.id.in_([id_ for id_, *_ in batches])))
    return Chunk(len(batches), keys)


def _take_input_files(session: Session, storage: Storage, cutoff: datetime, limit: int) -> Chunk:
    """Input files uploaded before the cutoff that no unfinished batch reads."""
    in_use = exists().where(
        Batch.input_file_id == FileObject.id, _one_of(Batch.status, UNFINISHED_BATCHES)
    )
    files = _locked_files(
        session,
        and_(FileObject.purpose == INPUT_PURPOSE, FileObject.created_at < cutoff, ~in_use),
        limit,
    )
    keys = [key for _, key in files]
    _reachable(storage, keys)
    if files:
        session.execute(delete(FileObject).where(FileObject.id.in_([id_ for id_, _ in files])))
    return Chunk(len(files), keys)


def _locked_files(
    session: Session, condition: ColumnElement[bool], limit: int
) -> list[tuple[str, str]]:
    rows = session.execute(
        select(FileObject.id, FileObject.storage_key)
        .where(condition)
        .order_by(FileObject.created_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [(file_id, key) for file_id, key in rows]


def _take_events(session: Session, storage: Storage, cutoff: datetime, limit: int) -> Chunk:
    """Webhook events that ended before the cutoff, with their attempts: found through the
    partial index of ended events by `created_at`, each checked by its attempts' key."""
    attempted_since = exists().where(
        WebhookAttempt.event_id == WebhookEvent.id, WebhookAttempt.at >= cutoff
    )
    ids = list(
        session.scalars(
            select(WebhookEvent.id)
            .where(
                _one_of(WebhookEvent.status, ENDED_EVENTS),
                WebhookEvent.created_at < cutoff,
                ~attempted_since,
            )
            .order_by(WebhookEvent.created_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )
    if ids:
        session.execute(delete(WebhookAttempt).where(WebhookAttempt.event_id.in_(ids)))
        session.execute(delete(WebhookEvent).where(WebhookEvent.id.in_(ids)))
    return Chunk(len(ids))


def _take_schedule_runs(session: Session, storage: Storage, cutoff: datetime, limit: int) -> Chunk:
    """Schedules' runs made before the cutoff, by their index on `created_at`."""
    key = (ScheduleRun.schedule_id, ScheduleRun.fire_time)
    chosen = select(*key).where(ScheduleRun.created_at < cutoff).order_by(ScheduleRun.created_at)
    return _delete_chosen(session, ScheduleRun, key, chosen.limit(limit))


def _delete_chosen(
    session: Session, model: Any, key: tuple[Any, ...], chosen: Select[Any, Any]
) -> Chunk:
    """Lock the rows `chosen` selects (their `key` columns), skipping rows others hold, and
    delete them by that key."""
    rows = session.execute(chosen.with_for_update(skip_locked=True)).all()
    if rows:
        session.execute(delete(model).where(tuple_(*key).in_([tuple(row) for row in rows])))
    return Chunk(len(rows))


def _take_expired_cache_entries(
    session: Session, storage: Storage, now: datetime, limit: int
) -> Chunk:
    """Result cache entries that expired before `now`, by their index on `expires_at`."""
    key = (CacheEntry.owner, CacheEntry.key)
    chosen = select(*key).where(CacheEntry.expires_at <= now).order_by(CacheEntry.expires_at)
    return _delete_chosen(session, CacheEntry, key, chosen.limit(limit))


# In this order: a batch goes once its lines (taken with the jobs) and line errors are gone.
TAKES: dict[str, Take] = {
    "jobs": _take_jobs,
    "line_errors": _take_line_errors,
    "batches": _take_batches,
    "files": _take_input_files,
    "webhook_events": _take_events,
    "schedule_runs": _take_schedule_runs,
}
# Taken with `now` for the cutoff: what expired, rather than what is older than the limit.
EXPIRED_TAKES: dict[str, Take] = {"result_cache": _take_expired_cache_entries}


def _delete_objects(storage: Storage, keys: Iterable[str]) -> int:
    """Delete the objects of rows already deleted; those an error leaves are logged, since
    no row names them any more."""
    keys = list(keys)
    for done, key in enumerate(keys):
        try:
            storage.delete(key)
        except Exception:
            left = keys[done:]
            log.warning(
                "retention: %d stored objects of deleted rows are left in storage: %s",
                len(left),
                " ".join(left),
            )
            raise
    return len(keys)


def purge(
    scope: SessionScope,
    storage: Storage,
    settings: Settings,
    now: datetime | None = None,
    chunk_rows: int = CHUNK_ROWS,
    max_chunks: int = CHUNKS_PER_PASS,
) -> Counter[str]:
    """Delete what finished more than `retention_days` before `now` (see the module), at
    most `max_chunks` chunks of `chunk_rows` rows of each kind. Returns the rows deleted by
    kind, and the stored objects (`objects`). An outage ends the pass early, with a warning:
    the next pass takes up where this one stopped."""
    now = now or utcnow()
    cutoff = now - timedelta(days=settings.retention_days)
    takes = [(kind, take, cutoff) for kind, take in TAKES.items()]
    takes += [(kind, take, now) for kind, take in EXPIRED_TAKES.items()]
    deadline = time.monotonic() + PASS_SECONDS
    deleted: Counter[str] = Counter()
    try:
        for kind, take, before in takes:
            for _ in range(max_chunks):
                if time.monotonic() > deadline:
                    break
                with scope() as session:
                    chunk = take(session, storage, before, chunk_rows)
                # Committed: the rows are gone, and their objects are named by none.
                deleted[kind] += chunk.rows
                deleted["objects"] += _delete_objects(storage, chunk.keys)
                if chunk.rows < chunk_rows:
                    break
    except Exception as exc:
        down = unavailable(exc)
        if down is None:
            raise
        log.warning("retention stopped: %s is unavailable; the next pass goes on", down)
    return +deleted
