"""What a worker writes to its jobs' Redis streams (`jobs.streams`): each streaming row's new
text after a step, and the ending of each job that a caller waits for, once Postgres holds it.

Everything a step has to say goes out in one pipeline, whatever the number of rows. The stream
is a convenience: when Redis cannot take it, decoding goes on, the text not sent is sent again
from where it stopped at the next step that reaches Redis, and the waiting caller reads the
ending from Postgres.
"""

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from jobs.models import Job, Lane
from jobs.streams import END, MAX_EVENTS, TEXT, StreamEvent, interactive_key, stream_key
from worker.engine.text_stream import Decode, TextStream

log = logging.getLogger(__name__)

# After Redis fails to take a step's events, the worker stops trying for this long, so that a
# Redis outage costs decoding one timeout, not one per step.
REDIS_BACKOFF_SECONDS = 5.0
# How long one write to Redis may take before the step goes on without it.
REDIS_TIMEOUT_SECONDS = 1.0


def waited_for(job: Job) -> bool:
    """Whether a caller waits on the job's stream: it streams, or it is interactive."""
    return bool(job.stream) or job.lane == Lane.interactive


def broker_client(broker_url: str) -> Callable[[], redis.Redis]:
    """Makes the worker's client of the broker's Redis, with short timeouts: what it writes
    and reads there is a hint beside Postgres, never worth a stalled step."""

    def client() -> redis.Redis:
        return redis.Redis.from_url(
            broker_url,
            socket_timeout=REDIS_TIMEOUT_SECONDS,
            socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
        )

    return client


class InteractiveSignal:
    """Whether the API has queued interactive jobs of a model since the last look
    (`jobs.streams.interactive_key`); None while Redis cannot say."""

    def __init__(self, client: Callable[[], redis.Redis], model: str) -> None:
        self._client_factory = client
        self._client: redis.Redis | None = None
        self.key = interactive_key(model)
        self._seen: bytes | str | None = None
        self._down_until = 0.0

    def moved(self) -> bool | None:
        if time.monotonic() < self._down_until:
            return None
        try:
            if self._client is None:
                self._client = self._client_factory()
            value = self._client.get(self.key)
        except (redis.RedisError, OSError) as exc:
            log.warning("cannot read %s; looking in Postgres instead: %s", self.key, exc)
            self._down_until = time.monotonic() + REDIS_BACKOFF_SECONDS
            return None
        moved, self._seen = value != self._seen, value
        return moved

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


@dataclass
class _Streaming:
    """A streaming job's text: what it shows, and how much of that Redis has."""

    attempt: int
    text: TextStream
    sent: int = 0


class StreamPublisher:
    def __init__(self, client: Callable[[], redis.Redis], ttl_seconds: float) -> None:
        self._client_factory = client
        self._client: redis.Redis | None = None
        self.ttl_seconds = ttl_seconds
        self._streaming: dict[str, _Streaming] = {}
        # Endings come from the thread that records results, steps from the decode loop.
        self._ended: list[tuple[str, StreamEvent]] = []
        self._lock = threading.Lock()
        self._down_until = 0.0

    @classmethod
    def for_broker(cls, broker_url: str, ttl_seconds: float) -> "StreamPublisher":
        """Publishes to the broker's Redis, connecting when a job first needs it (a worker whose
        jobs never stream never connects)."""
        return cls(broker_client(broker_url), ttl_seconds)

    def start(self, job: Job, decode: Decode, stops: Sequence[str]) -> None:
        """Follow a job's text from its first token, if it asked to stream."""
        if job.stream:
            self._streaming[job.id] = _Streaming(job.attempts, TextStream(decode, stops))

    def ended(self, job: Job) -> None:
        """A job's ending was recorded (or could not be: Postgres has the job's state either
        way): say so on its stream, with the next step's events, for its caller to read it."""
        self._streaming.pop(job.id, None)
        if waited_for(job):
            with self._lock:
                self._ended.append((job.id, StreamEvent(END, job.attempts)))

    def forget(self, job_ids: Iterable[str]) -> None:
        """Stop following jobs that left without an ending (given back, to run again)."""
        for job_id in job_ids:
            self._streaming.pop(job_id, None)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def step(self, rows: Iterable[tuple[str, Sequence[int]]]) -> None:
        """After a step: the new text of each streaming row (`(job id, tokens so far)`), and the
        endings noted since the last step, in one pipeline."""
        events: list[tuple[str, StreamEvent]] = []
        for job_id, tokens in rows:
            streaming = self._streaming.get(job_id)
            if streaming is None:
                continue
            shown = streaming.text.update(tokens)
            if len(shown) > streaming.sent:
                new = shown[streaming.sent :]
                events.append((job_id, StreamEvent(TEXT, streaming.attempt, new, streaming.sent)))
        with self._lock:
            # Endings go out once, whether Redis takes them or not: a caller whose ending
            # was lost reads it from Postgres.
            ended, self._ended = self._ended, []
        self._send(events + ended)

    def _send(self, events: list[tuple[str, StreamEvent]]) -> None:
        if not events or time.monotonic() < self._down_until:
            return
        try:
            if self._client is None:
                self._client = self._client_factory()
            pipeline = self._client.pipeline(transaction=False)
            for job_id, event in events:
                key = stream_key(job_id)
                fields: dict[Any, Any] = event.fields()
                pipeline.xadd(key, fields, maxlen=MAX_EVENTS, approximate=True)
                if event.kind == END or event.offset == 0:
                    # Set as the stream begins (again, after a resend from its start) and as
                    # it ends: one command less for every step between.
                    pipeline.expire(key, max(1, int(self.ttl_seconds)))
            pipeline.execute()
        except (redis.RedisError, OSError) as exc:
            log.warning("could not write %d stream events; decoding goes on: %s", len(events), exc)
            self._down_until = time.monotonic() + REDIS_BACKOFF_SECONDS
            return
        for job_id, event in events:
            streaming = self._streaming.get(job_id)
            if event.kind == TEXT and streaming is not None:
                streaming.sent = event.offset + len(event.text)
