"""The interactive lane: a job submitted for a caller who waits, answered as JSON once it ends,
or as server-sent events while it decodes. The routes of each dialect (`api.routes.workers_ai`,
`api.routes.completions`, `api.routes.jobs`) render; this module does the rest, the same for all.

A streamed answer waits for its first piece before the response starts, so that an error or a
timeout before any text is still a proper HTTP error in the route's dialect; an error after it
is the stream's last event, in the same dialect's error shape, with no `[DONE]`.
"""

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Annotated, Any, Protocol

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import OwnerDep, QueueDep, RedisDep, SessionDep, StorageDep, WaiterDep
from api.dialects import Dialect, dialect_of
from api.dialects.errors import error_content
from api.waiting import CallerGone, Finished, JobWaiter
from jobs import service
from jobs.errors import InvalidParameter, MbatchError, NotFound
from jobs.models import Job, JobStatus, Lane
from jobs.outages import unavailable
from jobs.queue import JobQueue
from jobs.registry import ModelSpec, resolve_model
from jobs.service import PreparedJob
from jobs.storage import Storage
from jobs.streams import interactive_key

log = logging.getLogger(__name__)

JOB_ID_HEADER = "x-mbatch-job-id"
SSE_HEADERS = {
    "Cache-Control": "no-cache",
    # A proxy that buffers (nginx does by default) would hold the pieces back.
    "X-Accel-Buffering": "no",
}


class ModelNotFound(NotFound):
    """A model named in a path, or by an OpenAI-compatible body: a 404, as OpenAI answers."""

    code = "model_not_found"

    def __init__(self, refused: InvalidParameter) -> None:
        super().__init__(refused.message, param="model")


class JobFailed(MbatchError):
    """The job ended failed on its worker (its own error says why)."""

    code = "job_failed"
    status_code = 502

    def __init__(self, job_id: str, code: str | None, message: str | None) -> None:
        super().__init__(f"job {job_id} failed: {code}: {message}", param=None)
        self.job_id = job_id


class JobCancelled(MbatchError):
    """The job was cancelled (`POST /v1/jobs/{id}/cancel`) while its caller waited."""

    code = "job_cancelled"
    status_code = 409

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} was cancelled before it finished", param=None)
        self.job_id = job_id


def served_model(name: str) -> ModelSpec:
    """The registry entry for a name or alias; ModelNotFound for any other name."""
    try:
        return resolve_model(name)
    except InvalidParameter as refused:
        raise ModelNotFound(refused) from None


def succeeded(finished: Finished) -> Finished:
    """`finished`, where its job succeeded; the job's failure or cancellation otherwise."""
    job = finished.job
    if job.status == JobStatus.cancelled:
        raise JobCancelled(job.id)
    if job.status == JobStatus.failed:
        raise JobFailed(job.id, job.error_code, job.error_message)
    if finished.public.result is None:  # it succeeded, but its stored result was lost
        error = finished.public.error
        raise JobFailed(job.id, error.code if error else None, error.message if error else None)
    return finished


class StreamShape(Protocol):
    """A dialect's events for a streamed answer, each a JSON object."""

    def start(self) -> list[dict[str, Any]]: ...

    def piece(self, text: str) -> dict[str, Any]: ...

    def end(self, finished: Finished) -> list[dict[str, Any]]: ...


def event_stream_response(description: str) -> dict[str, Any]:
    """A route's 200 in the OpenAPI document, where it may answer server-sent events."""
    return {
        "description": description,
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }


def sse(data: dict[str, Any] | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n"


@dataclass(frozen=True)
class Submission:
    job: Job
    waiter: JobWaiter


class Interactive:
    """One request's job of the interactive lane: its submission, and its answer."""

    def __init__(
        self,
        dialect: Dialect,
        session: Session,
        queue: JobQueue,
        storage: Storage,
        owner: str,
        make_waiter: Callable[[str], JobWaiter],
        redis: Redis,
    ) -> None:
        self.dialect = dialect
        self.session = session
        self.queue = queue
        self.storage = storage
        self.owner = owner
        self.make_waiter = make_waiter
        self.redis = redis

    async def submit(
        self, prepare: Callable[[], PreparedJob], *, stream: bool, idempotency_key: str | None
    ) -> Submission:
        """Prepare and record the job (off the event loop: tokenizing, Postgres), signal it
        to the workers whose batches are full of bulk work, then wait."""
        job = await run_in_threadpool(self._record, prepare, stream, idempotency_key)
        try:
            await self.redis.incr(interactive_key(job.model))
        except (RedisError, OSError) as exc:  # the workers look in Postgres every few steps
            log.warning("could not signal interactive job %s: %s", job.id, exc)
        return Submission(job, self.make_waiter(job.id))

    def _record(
        self, prepare: Callable[[], PreparedJob], stream: bool, idempotency_key: str | None
    ) -> Job:
        prepared = replace(prepare(), lane=Lane.interactive, stream=stream)
        job, _ = service.submit_job(
            self.session, self.queue, self.owner, prepared, idempotency_key, storage=self.storage
        )
        # The request's unit of work ends here: the wait that follows holds no connection
        # (the waiter reads Postgres in short sessions of its own).
        self.session.commit()
        return job

    async def finished(self, submission: Submission) -> Finished:
        """The job, once it has succeeded; its failure, cancellation or timeout is raised."""
        return succeeded(await submission.waiter.finished())

    def json(self, submission: Submission, content: dict[str, Any]) -> JSONResponse:
        return JSONResponse(content, headers={JOB_ID_HEADER: submission.job.id})

    async def stream(self, submission: Submission, shape: StreamShape) -> StreamingResponse:
        """The job's text as server-sent events in `shape`, then `data: [DONE]`."""
        pieces = submission.waiter.pieces()
        try:
            first = await anext(pieces)
            if isinstance(first, Finished):
                succeeded(first)
        except StopAsyncIteration:
            raise CallerGone(submission.job.id) from None
        except BaseException:
            await pieces.aclose()
            raise
        headers = {**SSE_HEADERS, JOB_ID_HEADER: submission.job.id}
        events = self._events(shape, first, pieces)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)

    async def _events(
        self,
        shape: StreamShape,
        first: str | Finished,
        pieces: AsyncGenerator[str | Finished, None],
    ) -> AsyncIterator[str]:
        # A caller who goes away cancels this generator where it waits for a piece; the
        # waiter then cancels the job (`JobWaiter.pieces`).
        try:
            for event in shape.start():
                yield sse(event)
            piece = first
            while not isinstance(piece, Finished):
                yield sse(shape.piece(piece))
                piece = await anext(pieces)
            succeeded(piece)
            for event in shape.end(piece):
                yield sse(event)
            yield sse("[DONE]")
        except StopAsyncIteration:
            return  # the caller went away: nobody reads on
        except MbatchError as exc:
            yield sse(self._error(exc.status_code, exc.code, exc.message, exc.param))
        except Exception as exc:
            # The response has started: what would have been a 503 or a 500 is its last event.
            down = unavailable(exc)
            if down is None:
                log.exception("stream of job failed", exc_info=exc)
                yield sse(self._error(500, "internal_error", "internal error"))
            else:
                log.warning("%s is unavailable mid-stream: %s", down, exc)
                yield sse(self._error(503, "service_unavailable", f"{down} is unavailable"))
        finally:
            await pieces.aclose()

    def _error(self, status: int, code: str, message: str, param: str | None = None) -> Any:
        return error_content(self.dialect, status, code, message, param)[1]


def get_interactive(
    request: Request,
    session: SessionDep,
    queue: QueueDep,
    storage: StorageDep,
    owner: OwnerDep,
    make_waiter: WaiterDep,
    redis: RedisDep,
) -> Interactive:
    dialect = dialect_of(request.scope.get("path", ""))
    return Interactive(dialect, session, queue, storage, owner, make_waiter, redis)


InteractiveDep = Annotated[Interactive, Depends(get_interactive)]
