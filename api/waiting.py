"""Waiting for a job while its caller waits: the sync and streaming interfaces' one loop.

The wait is asynchronous: it reads the job's Redis stream (`jobs.streams`) with blocking reads
of at most a second, so no thread is held per waiting request. Postgres is the record: it is
read when the stream says the job ended, and every few seconds whatever the stream says (so a
stream that Redis lost, or a worker that died before it could say so, costs seconds, never the
answer). A job that has not ended, nor sent text, for `sync_timeout_seconds` ends the wait
with `SyncTimeout`, which names the job so that its caller can poll it. A caller that goes
away (`disconnected`, asked between reads, or the streaming response cancelled) cancels its
job. A stream ends true or with an error: an answer recorded that does not continue the text
already shown (`StreamDiverged`) is never passed off as the end of it.
"""

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager, aclosing
from dataclasses import dataclass
from typing import Any

import anyio
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from jobs import queries
from jobs.errors import MbatchError, NotFound
from jobs.models import Job
from jobs.schemas.jobs import JobPublic, job_public
from jobs.storage import Storage
from jobs.streams import END, TEXT, StreamedText, StreamEvent, stream_key

log = logging.getLogger(__name__)

# Postgres is read this often while a job runs and its stream cannot be read, and every
# POSTGRES_CHECK_SECONDS while it can (the worker's ending event usually comes first): a
# stream that Redis lost, or a worker that died before it could say so, costs that long.
POSTGRES_POLL_SECONDS = 1.0
POSTGRES_CHECK_SECONDS = 3.0
# The longest one blocking read of a stream; the wait looks at its deadline and its caller
# between reads.
READ_BLOCK_SECONDS = 1.0
# A stream Redis cannot serve is tried again after this long (Postgres is read meanwhile).
REDIS_RETRY_SECONDS = 1.0


class SyncTimeout(MbatchError):
    """The job did not end within the sync timeout; it goes on, and can be polled."""

    code = "timeout"
    status_code = 504

    def __init__(self, job_id: str, seconds: float) -> None:
        super().__init__(
            f"job {job_id} did not finish within {seconds:g} s; it goes on: poll "
            f"GET /v1/jobs/{job_id} for its result",
            param="job_id",
        )
        self.job_id = job_id


class StreamDiverged(MbatchError):
    """The job's recorded answer does not continue the text already streamed (it ran again,
    unseeded, after its first attempt's text had gone out): the stream cannot end true."""

    code = "stream_diverged"
    status_code = 502

    def __init__(self, job_id: str) -> None:
        super().__init__(
            f"job {job_id} ran again after part of its text was streamed, and its recorded "
            f"answer differs from it: read the answer with GET /v1/jobs/{job_id}",
            param="job_id",
        )
        self.job_id = job_id


class CallerGone(MbatchError):
    """The caller went away before its job ended; the job was cancelled, and nobody reads
    this answer (nginx's 499, "client closed request")."""

    code = "client_closed_request"
    status_code = 499

    def __init__(self, job_id: str) -> None:
        super().__init__(f"the caller went away; job {job_id} was cancelled", param="job_id")
        self.job_id = job_id


@dataclass(frozen=True)
class Finished:
    """A job that ended, as its answer needs it: the row (detached), its text and the texts
    of its further samples (read from storage where they are kept there), and its public
    view."""

    job: Job
    text: str
    choice_texts: list[str]
    public: JobPublic


Scope = Callable[[], AbstractContextManager[Session]]


class JobWaiter:
    """One caller's wait for one of its jobs.

    `pieces()` yields the text as the worker writes it (for a job that streams), then the
    `Finished` job; the streamed pieces joined are its text. `finished()` waits for the
    ending alone. `disconnected` is asked between reads; a streaming response's server also
    cancels the wait when its client goes. Either way the job is cancelled."""

    def __init__(
        self,
        redis: Redis,
        scope: Scope,
        storage: Storage,
        owner: str,
        job_id: str,
        timeout_seconds: float,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.redis = redis
        self.scope = scope
        self.storage = storage
        self.owner = owner
        self.job_id = job_id
        self.timeout_seconds = timeout_seconds
        self.disconnected = disconnected
        self.text = StreamedText()
        self._deadline = time.monotonic() + timeout_seconds
        self._last_id = "0-0"
        self._redis_down_until = 0.0

    async def finished(self) -> Finished:
        async with aclosing(self.pieces()) as pieces:
            async for piece in pieces:
                if isinstance(piece, Finished):
                    return piece
        # The wait ends without the job only when its caller went away (the job is cancelled).
        raise CallerGone(self.job_id)

    async def pieces(self) -> AsyncGenerator[str | Finished, None]:
        ended = False
        try:
            async for piece in self._follow():
                if isinstance(piece, Finished):
                    ended = True
                yield piece
        except (SyncTimeout, StreamDiverged):
            ended = True  # the job goes on, or has ended: its caller can read it
            raise
        finally:
            if not ended:
                # The caller went away (or the wait failed): nobody wants the answer now.
                with anyio.CancelScope(shield=True):
                    await run_in_threadpool(self._cancel)

    async def _follow(self) -> AsyncIterator[str | Finished]:
        # A job just submitted has not ended: its stream is read first (a job that had, an
        # idempotent replay's, is read from Postgres within a second).
        next_poll = time.monotonic() + POSTGRES_POLL_SECONDS
        while True:
            now = time.monotonic()
            if now >= next_poll:
                finished = await run_in_threadpool(self._read_finished)
                if finished is not None:
                    if not finished.text.startswith(self.text.shown):
                        raise StreamDiverged(self.job_id)
                    rest = self.text.offer(finished.text)
                    if rest:
                        yield rest
                    yield finished
                    return
                redis_readable = time.monotonic() >= self._redis_down_until
                interval = POSTGRES_CHECK_SECONDS if redis_readable else POSTGRES_POLL_SECONDS
                next_poll = time.monotonic() + interval
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise SyncTimeout(self.job_id, self.timeout_seconds)
            if self.disconnected is not None and await self.disconnected():
                return
            block = min(READ_BLOCK_SECONDS, remaining, max(next_poll - time.monotonic(), 0.01))
            events = await self._read(block)
            for event in events:
                if event.kind == TEXT:
                    new = self.text.add(event)
                    if new:
                        # The timeout is for a job that does not come: one whose text is
                        # flowing has until the timeout after its latest piece.
                        self._deadline = time.monotonic() + self.timeout_seconds
                        yield new
                elif event.kind == END:
                    next_poll = 0.0

    async def _read(self, block_seconds: float) -> list[StreamEvent]:
        """The stream's next events, waiting up to `block_seconds` for one; none while Redis
        cannot serve it (the wait then reads Postgres)."""
        if time.monotonic() < self._redis_down_until:
            await anyio.sleep(block_seconds)
            return []
        try:
            answer = await self.redis.xread(
                {stream_key(self.job_id): self._last_id},
                block=max(1, int(block_seconds * 1000)),
                count=1000,
            )
        except (RedisError, OSError) as exc:
            log.warning("stream of job %s unreadable, reading Postgres: %s", self.job_id, exc)
            self._redis_down_until = time.monotonic() + REDIS_RETRY_SECONDS
            return []
        events = []
        streams: Any = answer or []  # RESP2: [(key, [(id, fields)...])...]
        for _key, entries in streams:
            for entry_id, fields in entries:
                self._last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                events.append(StreamEvent.parse(fields))
        return events

    def _read_finished(self) -> Finished | None:
        with self.scope() as session:
            job = queries.get_owned_job(session, self.owner, self.job_id)
            if not job.status.finished:
                return None
            public = job_public(job, self.storage)
            session.expunge(job)
        result = public.result
        text = result.response if result is not None else ""
        others = [choice.response for choice in (result.choices or [])[1:]] if result else []
        return Finished(job, text, others, public)

    def _cancel(self) -> None:
        try:
            with self.scope() as session:
                job = queries.get_owned_job(session, self.owner, self.job_id)
                queries.cancel(session, job)
                session.commit()
        except NotFound:  # deleted meanwhile: nothing is left to cancel
            log.info("job %s is gone; its caller went away", self.job_id)
        except Exception:  # the job stays; its worker finishes it for nobody
            log.exception("could not cancel job %s after its caller went away", self.job_id)
