"""A batch's output while it runs: the lines that have finished so far, in line order, past a
cursor, rendered as the batch's files will hold them (a succeeded line as its output line, any
other ended or refused line as its error line), in any state of the batch.

Lines finish out of order, so with them comes a resume cursor: the greatest line number L such
that every line up to L has finished. A client that asks again from L misses no line; the lines
past L that it already has come again, and it drops them by their `id`. The cursor is read in
the same snapshot as the lines. The lines are read through the `(batch_id, line)` indexes from
the cursor on, a few hundred rows at a time, so a poll costs what it sends, not the size of the
batch; only finding the first unfinished line walks that index from line 1 (about 10 ms at
30,000 finished lines).
"""

import heapq
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, func, select, union_all
from sqlalchemy.orm import Session, defer

from jobs.batches.finalizing import ended_line, refused_line, succeeded_line
from jobs.batches.steps import SessionScope
from jobs.batches.store import UNFINISHED
from jobs.models import Batch, Job, JobStatus, LineError
from jobs.schemas.openai import CHAT_ENDPOINT
from jobs.storage import Storage

RESUME_HEADER = "x-mbatch-resume-after"
# The largest line number there can be (`line` is a 32-bit integer column): a bound for the
# cursor and the limit that the database can always compare with.
MAX_LINE = 2**31 - 1
ENDED = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)
ROWS_PER_FETCH = 500
# Lines are sent in pieces of about this size: one piece per line would cost a thread hop and
# a network write each.
CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class FinishedLines:
    """The lines to send, as JSONL pieces, and the cursor to resume from."""

    resume_after: int
    chunks: Iterator[bytes]


def finished_lines(
    scope: SessionScope, storage: Storage, batch: Batch, after: int, limit: int | None
) -> FinishedLines:
    """The batch's finished lines numbered above `after`, at most `limit` of them, and the
    resume cursor. The first piece is read here, so that a database or storage outage is
    still the whole answer rather than a stream cut short."""
    resume: list[int] = []  # set by the stream's first step, before it sends a line
    chunks = _stream(scope, storage, batch.id, batch.endpoint, after, limit, resume)
    first = next(chunks, b"")
    return FinishedLines(resume[0], itertools.chain((first,) if first else (), chunks))


def _stream(
    scope: SessionScope,
    storage: Storage,
    batch_id: str,
    endpoint: str,
    after: int,
    limit: int | None,
    resume: list[int],
) -> Iterator[bytes]:
    # A session of its own, as the request's is closed before the body is sent; entered by
    # the first read, so that it is closed however the iteration ends, a client that goes
    # away mid-stream included.
    with scope() as session:
        _read_one_snapshot(session)
        resume.append(resume_after(session, batch_id, after, limit))
        pending = bytearray()
        for line in _rendered(session, storage, batch_id, endpoint, after, limit):
            pending += json.dumps(line, ensure_ascii=False).encode() + b"\n"
            if len(pending) >= CHUNK_BYTES:
                yield bytes(pending)
                pending.clear()
        if pending:
            yield bytes(pending)


def _read_one_snapshot(session: Session) -> None:
    """Every statement of the session's transaction reads one snapshot, so the cursor agrees
    with the lines sent: Postgres's REPEATABLE READ (read only). A SQLite transaction reads
    one snapshot already."""
    if session.get_bind().dialect.name == "postgresql":
        session.connection(
            execution_options={"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}
        )


def resume_after(session: Session, batch_id: str, after: int, limit: int | None) -> int:
    """The greatest line number L such that every line up to L has finished (0 if the first
    has not), and no greater than the last line sent where `limit` cuts the answer short.

    Lines are recorded (as jobs or as refused lines) in chunks, in line order, so the lines
    recorded are those up to the last one recorded; blank input lines have a number and no
    row, and are no lines. So L is just below the first unfinished job, or the last line
    recorded where every recorded line has finished."""
    first_unfinished = session.scalar(
        select(func.min(Job.line)).where(Job.batch_id == batch_id, Job.status.in_(UNFINISHED))
    )
    if first_unfinished is not None:
        resume = first_unfinished - 1
    else:
        last_job = session.scalar(select(func.max(Job.line)).where(Job.batch_id == batch_id))
        last_refused = session.scalar(
            select(func.max(LineError.line)).where(LineError.batch_id == batch_id)
        )
        resume = max(last_job or 0, last_refused or 0)
    if limit is not None:
        last_sent = _last_line_sent(session, batch_id, after, limit)
        if last_sent is not None:
            resume = min(resume, last_sent)
    return resume


def _last_line_sent(session: Session, batch_id: str, after: int, limit: int) -> int | None:
    """The number of the `limit`-th finished line above `after`; None where there are fewer,
    and the answer is not cut short."""
    # Each branch a subquery of its own: SQLite refuses a LIMIT inside a bare UNION branch.
    jobs = _ended_jobs(select(Job.line.label("line")), batch_id, after, limit).subquery()
    refused = _refused(select(LineError.line.label("line")), batch_id, after, limit).subquery()
    lines = union_all(select(jobs.c.line), select(refused.c.line)).subquery()
    return session.scalar(select(lines.c.line).order_by(lines.c.line).offset(limit - 1).limit(1))


def _ended_jobs(query: Select[Any], batch_id: str, after: int, limit: int | None) -> Select[Any]:
    # A range of the (batch_id, line) index, in its order.
    query = query.where(Job.batch_id == batch_id, Job.line > after, Job.status.in_(ENDED))
    query = query.order_by(Job.line)
    return query if limit is None else query.limit(limit)


def _refused(query: Select[Any], batch_id: str, after: int, limit: int | None) -> Select[Any]:
    # A range of the table's primary key, (batch_id, line), in its order.
    query = query.where(LineError.batch_id == batch_id, LineError.line > after)
    query = query.order_by(LineError.line)
    return query if limit is None else query.limit(limit)


def _rendered(
    session: Session,
    storage: Storage,
    batch_id: str,
    endpoint: str,
    after: int,
    limit: int | None,
) -> Iterator[dict[str, Any]]:
    """The lines, in line order, each as the batch's output or error file holds it; rows are
    fetched a few hundred at a time, never all at once."""
    # A line's request (up to a megabyte) is no part of a chat line's output: it is left
    # unread. A completion's logprobs count their text offsets from its prompt.
    unread = [defer(Job.sampling, raiseload=True)]
    if endpoint == CHAT_ENDPOINT:
        unread.append(defer(Job.input, raiseload=True))
    job = select(Job).options(*unread)
    fetched = {"yield_per": ROWS_PER_FETCH}
    jobs = session.scalars(_ended_jobs(job, batch_id, after, limit).execution_options(**fetched))
    refused = session.scalars(
        _refused(select(LineError), batch_id, after, limit).execution_options(**fetched)
    )
    rows: Iterator[Job | LineError] = heapq.merge(jobs, refused, key=_line_of)
    for row in itertools.islice(rows, limit):
        if isinstance(row, LineError):
            yield refused_line(batch_id, row)
        elif row.status == JobStatus.succeeded:
            yield succeeded_line(row, storage, endpoint)
        else:
            yield ended_line(row)


def _line_of(row: Job | LineError) -> int:
    return row.line or 0
