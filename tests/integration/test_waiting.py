"""The API's wait for a job (`api.waiting`) on real Postgres and Redis: the text as the
worker's publisher writes it, the answer from Postgres when Redis loses the stream or is down,
the timeout that leaves the job running, and the caller who goes away cancelling its job."""

import asyncio
import functools
import threading
from dataclasses import replace
from decimal import Decimal

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis
from sqlalchemy.orm import Session

from api.waiting import Finished, JobWaiter, StreamDiverged, SyncTimeout
from jobs import queries, service
from jobs.db import session_scope
from jobs.models import Job, JobStatus, Lane
from jobs.queries import Claim, Outcome
from jobs.queue import InProcessQueue
from jobs.schemas.native import JobCreate
from jobs.settings import Settings
from jobs.storage import storage_from_settings
from jobs.streams import stream_key
from jobs.tokenizer import v1_tokenizer
from tests import services
from worker.streaming import StreamPublisher

ANSWER = "Red, green and blue 🦩 are colours."


def interactive_job(db: Session, settings: Settings, owner: str = "walt") -> Job:
    prepared = service.prepare_native(
        JobCreate.model_validate({"prompt": "Name colours.", "max_tokens": 32}), settings
    )
    prepared = replace(prepared, lane=Lane.interactive, stream=True)
    job, _ = service.submit_job(db, InProcessQueue(), owner, prepared)
    return job


def claim(db: Session, job: Job) -> Claim:
    claims = queries.claim_batch(db, job.model, "test-worker", 30, 1, first_id=job.id)
    assert [c.job.id for c in claims] == [job.id]
    return claims[0]


def streamed_a_little(db: Session, settings: Settings) -> tuple[Job, Claim, StreamPublisher]:
    """An interactive job claimed as a worker claims it, whose first tokens of ANSWER the
    worker's publisher has written to its stream."""
    job = interactive_job(db, settings)
    held = claim(db, job)
    tokens = v1_tokenizer().encode_prompt(ANSWER, raw=True)[1:]
    url = settings.broker_url
    publisher = StreamPublisher(lambda: redis.Redis.from_url(url), 60)
    publisher.start(held.job, v1_tokenizer().decode, [])
    publisher.step([(job.id, tokens[:4])])
    return job, held, publisher


def outcome(text: str) -> Outcome:
    return Outcome(
        completion_tokens=9,
        finish_reason="stop",
        response_text=text,
        response_uri=None,
        cost_input=Decimal("0.000001"),
        cost_output=Decimal("0.000002"),
        compute_seconds=0.1,
    )


def waiter(settings: Settings, job: Job, redis_url: str, timeout: float = 20) -> JobWaiter:
    return JobWaiter(
        AsyncRedis.from_url(redis_url, socket_connect_timeout=0.5),
        functools.partial(session_scope, settings.database_url),
        storage_from_settings(settings),
        job.owner,
        job.id,
        timeout,
    )


def collect(waiting: JobWaiter, on_piece=None) -> tuple[list[str], Finished]:  # type: ignore[no-untyped-def]
    async def run() -> tuple[list[str], Finished]:
        pieces: list[str] = []
        async for piece in waiting.pieces():
            if isinstance(piece, Finished):
                return pieces, piece
            pieces.append(piece)
            if on_piece is not None:
                on_piece(len(pieces))
        raise AssertionError("no ending")

    return asyncio.run(run())


def test_pieces_then_the_answer_from_postgres_when_redis_loses_the_stream(
    db: Session, api_settings: Settings
) -> None:
    url = api_settings.broker_url
    job, held, publisher = streamed_a_little(db, api_settings)

    def lose_the_stream_then_finish(pieces: int) -> None:
        if pieces != 1:
            return
        # Redis loses the stream (as a restart would), and the worker's ending event with
        # it: the job's answer is only in Postgres.
        redis.Redis.from_url(url).delete(stream_key(job.id))

        def finish() -> None:
            with session_scope(api_settings.database_url) as session:
                assert queries.record_success(session, held, outcome(ANSWER))

        threading.Thread(target=finish).start()

    pieces, finished = collect(waiter(api_settings, job, url), lose_the_stream_then_finish)
    assert len(pieces) >= 2
    assert "".join(pieces) == ANSWER == finished.text
    assert finished.public.status == JobStatus.succeeded


def test_the_answer_comes_from_postgres_while_redis_is_down(
    db: Session, api_settings: Settings
) -> None:
    job = interactive_job(db, api_settings)
    held = claim(db, job)
    assert queries.record_success(db, held, outcome(ANSWER))
    down = f"redis://127.0.0.1:{services.free_port()}/0"
    pieces, finished = collect(waiter(api_settings, job, down))
    assert "".join(pieces) == ANSWER
    assert finished.public.usage is not None and finished.public.usage.completion_tokens == 9


def test_a_job_that_outlasts_the_timeout_goes_on_and_is_named(
    db: Session, api_settings: Settings
) -> None:
    job = interactive_job(db, api_settings)
    with pytest.raises(SyncTimeout) as raised:
        asyncio.run(waiter(api_settings, job, api_settings.broker_url, timeout=1.5).finished())
    assert job.id in raised.value.message and raised.value.status_code == 504
    db.expire_all()
    assert db.get(Job, job.id).status == JobStatus.queued  # type: ignore[union-attr]


def test_a_caller_who_goes_away_cancels_its_job(db: Session, api_settings: Settings) -> None:
    job = interactive_job(db, api_settings)
    looks = 0

    async def gone() -> bool:
        nonlocal looks
        looks += 1
        return looks > 2

    waiting = waiter(api_settings, job, api_settings.broker_url)
    waiting.disconnected = gone

    async def run() -> list[object]:
        return [piece async for piece in waiting.pieces()]

    assert asyncio.run(run()) == []
    db.expire_all()
    assert db.get(Job, job.id).status == JobStatus.cancelled  # type: ignore[union-attr]


def test_a_stream_whose_recorded_answer_differs_ends_with_an_error_not_a_false_end(
    db: Session, api_settings: Settings
) -> None:
    """Its first attempt's text went out, then it ran again unseeded and recorded another
    answer: the stream says so rather than end as if what it showed were the answer."""
    url = api_settings.broker_url
    job, held, publisher = streamed_a_little(db, api_settings)
    shown: list[str] = []

    def rerun_and_record_another_answer() -> None:
        with session_scope(api_settings.database_url) as session:
            assert queries.record_success(session, held, outcome("Something else entirely."))
        publisher.ended(held.job)
        publisher.step([])

    async def run() -> None:
        async for piece in waiter(api_settings, job, url).pieces():
            assert isinstance(piece, str)
            shown.append(piece)
            await asyncio.to_thread(rerun_and_record_another_answer)

    with pytest.raises(StreamDiverged) as raised:
        asyncio.run(run())
    assert shown and ANSWER.startswith("".join(shown))
    assert job.id in raised.value.message
    db.expire_all()
    assert db.get(Job, job.id).status == JobStatus.succeeded  # type: ignore[union-attr]
