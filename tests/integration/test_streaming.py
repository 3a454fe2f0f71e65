"""Streaming rows through real Redis: the engine's tokens, the worker's publisher (one pipeline
per step), and the reader the API uses: the pieces joined are each row's answer, stop strings
included, and a reader that missed events or a second attempt never shows text twice."""

import random
from collections.abc import Hashable, Sequence
from dataclasses import replace
from typing import Any

import pytest
import redis

from jobs.models import Job, Lane
from jobs.sampling import SamplingParams
from jobs.streams import END, TEXT, StreamedText, StreamEvent, stream_key
from tests import services
from tests.unit.test_engine import random_prompt
from worker.engine.decode import Generation, NewRow, decode_rows
from worker.engine.loader import LoadedModel
from worker.streaming import StreamPublisher


@pytest.fixture(scope="module")
def redis_url() -> str:
    return services.redis_url()


class CountingRedis(redis.Redis):
    """The real client, counting the round trips its pipelines make."""

    executed = 0

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipeline = super().pipeline(transaction, shard_hint)
        execute = pipeline.execute

        def counted(*args: Any, **kwargs: Any) -> Any:
            CountingRedis.executed += 1
            return execute(*args, **kwargs)

        pipeline.execute = counted  # type: ignore[method-assign]
        return pipeline


def read_all(client: redis.Redis, job_id: str) -> list[StreamEvent]:
    return [StreamEvent.parse(fields) for _id, fields in client.xrange(stream_key(job_id))]


def job(job_id: str, stream: bool = True, lane: Lane = Lane.interactive) -> Job:
    return Job(id=job_id, stream=stream, lane=lane.value, attempts=1)


def decode_streaming(
    loaded: LoadedModel, rows: list[NewRow], publisher: StreamPublisher, jobs: dict[str, Job]
) -> tuple[dict[Hashable, Generation], int]:
    """Decode the rows as a worker does: after each step the streaming rows go to the
    publisher, and each ending is noted once its row is reported. Returns the results and
    the number of steps."""
    results: dict[Hashable, Generation] = {}
    steps = 0
    for row in rows:
        publisher.start(jobs[str(row.key)], loaded.tokenizer.decode, row.params.stop)

    def finished(key: Hashable, generation: Generation) -> None:
        results[key] = generation
        publisher.ended(jobs[str(key)])

    def on_tokens(streaming: list[tuple[Hashable, Sequence[int]]]) -> None:
        nonlocal steps
        steps += 1
        publisher.step((str(key), tokens) for key, tokens in streaming)

    decode_rows(loaded, rows, finished, slots=len(rows), on_tokens=on_tokens)
    return results, steps


def test_joined_pieces_are_each_rows_answer_with_stop_strings_split_across_tokens(
    loaded: LoadedModel, redis_url: str
) -> None:
    rng = random.Random(7)
    prompts = [random_prompt(loaded, rng, 30) for _ in range(6)]
    base = [SamplingParams(max_tokens=40, temperature=0.9, seed=100 + i) for i in range(6)]
    # First without stop strings: each row's text, in which a stop string is then chosen that
    # spans tokens in the middle of it.
    keys = [f"job_stream_{index}_{rng.randrange(10**9)}" for index in range(6)]
    plain, _ = decode_streaming(
        loaded,
        [NewRow(key, p, params) for key, p, params in zip(keys, prompts, base, strict=True)],
        StreamPublisher(lambda: redis.Redis.from_url(redis_url), 60),
        {key: job(key, stream=False, lane=Lane.native) for key in keys},
    )
    rows = []
    for key, prompt, params in zip(keys, prompts, base, strict=True):
        text = plain[key].text
        stop = text[len(text) // 2 : len(text) // 2 + 4].strip() or "zzzz"
        rows.append(NewRow(key, prompt, replace(params, stop=[stop]), None, stream=True))
    CountingRedis.executed = 0
    publisher = StreamPublisher(lambda: CountingRedis.from_url(redis_url), 60)
    results, steps = decode_streaming(loaded, rows, publisher, {key: job(key) for key in keys})
    # One round trip per step at most, whatever the number of streaming rows.
    assert 0 < CountingRedis.executed <= steps
    client = redis.Redis.from_url(redis_url)
    several = 0
    for row in rows:
        events = read_all(client, str(row.key))
        assert events[-1].kind == END
        reader = StreamedText()
        pieces = [reader.add(event) for event in events if event.kind == TEXT]
        several += len([piece for piece in pieces if piece]) > 1
        final = results[row.key].text
        assert results[row.key].finish_reason in ("stop", "length")
        assert all(stop not in reader.shown for stop in row.params.stop)
        assert final.startswith("".join(pieces))
        reader.offer(final)  # what the API adds from Postgres at the end
        assert reader.shown == final
    assert several >= 3  # the text did arrive in pieces as it decoded


def test_text_not_sent_while_redis_is_away_is_sent_again_from_where_it_stopped(
    loaded: LoadedModel, redis_url: str
) -> None:
    key = f"job_outage_{random.randrange(10**9)}"
    answers = iter([False, True, True, True])

    def client() -> redis.Redis:
        # The first connection points at a port nothing listens on.
        if next(answers):
            return redis.Redis.from_url(redis_url)
        return redis.Redis(port=services.free_port(), socket_connect_timeout=0.2)

    publisher = StreamPublisher(client, 60)
    publisher.start(job(key), loaded.tokenizer.decode, [])
    tokens = loaded.tokenizer.encode_prompt("one two three four five", raw=True)[1:]
    publisher.step([(key, tokens[:2])])  # lost: Redis away
    publisher._down_until = 0  # the back-off is over
    publisher._client = None
    publisher.step([(key, tokens)])
    events = read_all(redis.Redis.from_url(redis_url), key)
    assert [event.offset for event in events] == [0]
    reader = StreamedText()
    for event in events:
        reader.add(event)
    assert reader.shown == "one two three four five"
