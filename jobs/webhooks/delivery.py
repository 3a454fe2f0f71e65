"""One delivery attempt of one event, as `mbatch webhooks` runs it for each message.

A message only says "look at this event": Postgres decides. The attempt first claims the
event (a conditional UPDATE that gives it a token and a lease, and only while it is pending,
due and not leased), so that duplicate messages (a redelivery by Redis, maintenance
publishing again) never post the same event twice at once. The lease outlasts the longest an
attempt can take, and only the holder of the token records the attempt.

The body is the event with its object as the object's GET shows it, rendered and stored on
the first attempt; every later attempt and redelivery sends those same bytes, under the same
`webhook-id`, signed afresh with the attempt's own timestamp.
"""

import json
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from jobs.models import Batch, EventStatus, Job, WebhookAttempt, WebhookEvent
from jobs.queue import JobQueue
from jobs.schemas.batches import BatchPublic
from jobs.schemas.jobs import job_public
from jobs.settings import Settings
from jobs.storage import Storage
from jobs.timeutil import aware, utcnow
from jobs.webhooks.addresses import DELIVERY_TIMEOUT_SECONDS, guarded_client
from jobs.webhooks.publishing import SessionScope, publish
from jobs.webhooks.signing import owner_secret, retry_delay, signature_headers, signing_secrets

log = logging.getLogger(__name__)

# SPEC 2.4: an attempt gives up on its receiver after 10 s, all of it (the guarded client
# ends every connect, read and write by one deadline); the claim's lease is a few times that,
# for rendering and recording around the POST, so it never lapses while its attempt runs.
LEASE = timedelta(seconds=4 * DELIVERY_TIMEOUT_SECONDS)
# How much of an answer each attempt keeps.
RESPONSE_BYTES = 1024
# A wait up to this long goes out as the message's countdown; a longer one is left to
# maintenance, which publishes the event once it is due. Redis hands a message out again
# once it has waited longer than the visibility timeout, so no countdown may come near it.
MAX_COUNTDOWN_SECONDS = 60.0
# An event that could not be rendered (its job's result in a storage that is down) waits
# this long, without counting as an attempt: nothing was sent.
RENDER_PAUSE = timedelta(seconds=30)

DELIVERED = EventStatus.delivered
FAILED = EventStatus.failed
PENDING = EventStatus.pending


@dataclass(frozen=True)
class Answer:
    """What one attempt got: a status code and the start of the body, or an error."""

    status_code: int | None
    latency_ms: float
    response: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


@dataclass(frozen=True)
class Claimed:
    """An event as claimed for one attempt."""

    id: str
    owner: str
    type: str
    object_id: str
    url: str
    attempts: int
    payload: str | None
    created_at: datetime
    token: str


def max_countdown(settings: Settings) -> float:
    return min(MAX_COUNTDOWN_SECONDS, settings.visibility_timeout_seconds / 2)


def deliver(
    scope: SessionScope,
    storage: Storage,
    queue: JobQueue,
    settings: Settings,
    event_id: str,
    client: httpx.Client | None = None,
) -> EventStatus | None:
    """Make the event's next attempt if it is due and nobody else is making it: the event's
    status afterwards, or None when there was nothing to do (a duplicate message, an event
    delivered or not yet due)."""
    with scope() as session:
        event = _claim(session, event_id)
    if event is None:
        return None
    try:
        body = event.payload or _store_payload(scope, storage, event)
        if body is None:
            return _give_up(scope, event, "the event's object no longer exists")
        with scope() as session:
            keys = signing_secrets(owner_secret(session, event.owner))
    except Exception:
        _release(scope, event)
        raise
    headers = {
        **signature_headers(event.id, body, keys),
        "content-type": "application/json",
        "user-agent": "mbatch-webhooks",
    }
    if client is None:
        with guarded_client(settings.webhook_allow_private, DELIVERY_TIMEOUT_SECONDS) as own:
            answer = post(own, event.url, body, headers)
    else:
        answer = post(client, event.url, body, headers)
    return _record(scope, queue, settings, event, answer)


def _claim(session: Session, event_id: str) -> Claimed | None:
    """Take the event for one attempt, if it is pending, due and nobody holds it. Its own
    transaction, committed here. The message is spent: `enqueued_at` is cleared, so that
    should this process die, maintenance publishes the event again once the lease lapses."""
    now = utcnow()
    token = secrets.token_hex(16)
    row = session.execute(
        update(WebhookEvent)
        .where(
            WebhookEvent.id == event_id,
            WebhookEvent.status == PENDING,
            WebhookEvent.next_attempt_at <= now,
            or_(WebhookEvent.lease_expires_at.is_(None), WebhookEvent.lease_expires_at < now),
        )
        .values(delivery_token=token, lease_expires_at=now + LEASE, enqueued_at=None)
        .returning(
            WebhookEvent.id,
            WebhookEvent.owner,
            WebhookEvent.type,
            WebhookEvent.object_id,
            WebhookEvent.url,
            WebhookEvent.attempts,
            WebhookEvent.payload,
            WebhookEvent.created_at,
        )
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if row is None:
        # A message that came before its event was due (another host's clock runs ahead, a
        # countdown cut short) is spent all the same: the event counts as unpublished again,
        # so the publisher sends it once it is due rather than after requeue_after_seconds.
        session.execute(
            update(WebhookEvent)
            .where(
                WebhookEvent.id == event_id,
                WebhookEvent.status == PENDING,
                WebhookEvent.next_attempt_at > now,
            )
            .values(enqueued_at=None)
            .execution_options(synchronize_session=False)
        )
    session.commit()
    if row is None:
        return None
    return Claimed(
        id=row.id,
        owner=row.owner,
        type=row.type,
        object_id=row.object_id,
        url=row.url,
        attempts=row.attempts,
        payload=row.payload,
        created_at=aware(row.created_at) or now,
        token=token,
    )


def render(session: Session, storage: Storage, event: Claimed) -> str | None:
    """The event's body: its object exactly as the object's GET returns it (serialized as
    FastAPI serializes the response). None when the object is gone."""
    data: dict[str, Any]
    if event.type.startswith("job."):
        job = session.get(Job, event.object_id)
        if job is None:
            return None
        data = job_public(job, storage).model_dump(mode="json", by_alias=True)
    else:
        batch = session.get(Batch, event.object_id)
        if batch is None:
            return None
        data = BatchPublic.of(batch).model_dump(mode="json", by_alias=True)
    return json.dumps(
        {
            "id": event.id,
            "object": "event",
            "type": event.type,
            "created_at": int(event.created_at.timestamp()),
            "data": data,
        },
        separators=(",", ":"),
        ensure_ascii=False,
    )


def _store_payload(scope: SessionScope, storage: Storage, event: Claimed) -> str | None:
    """Render the body on the first attempt and keep it, under the claim."""
    with scope() as session:
        body = render(session, storage, event)
        if body is not None:
            session.execute(
                update(WebhookEvent)
                .where(WebhookEvent.id == event.id, WebhookEvent.delivery_token == event.token)
                .values(payload=body)
            )
    return body


def post(client: httpx.Client, url: str, body: str, headers: dict[str, str]) -> Answer:
    """POST the body; the status code and the first RESPONSE_BYTES of the answer, or the
    error. Never raises for what the receiver (or the way to it) did."""
    started = time.monotonic()
    try:
        with client.stream("POST", url, content=body.encode(), headers=headers) as response:
            kept = bytearray()
            deadline = started + DELIVERY_TIMEOUT_SECONDS
            for chunk in response.iter_bytes():
                kept += chunk
                # The rest of the answer is not ours to wait for, nor is an answer that
                # trickles in: what came within the timeout is what is kept.
                if len(kept) >= RESPONSE_BYTES or time.monotonic() > deadline:
                    break
            return Answer(
                response.status_code,
                _ms(started),
                kept[:RESPONSE_BYTES].decode("utf-8", errors="replace"),
            )
    except httpx.HTTPError as exc:
        return Answer(None, _ms(started), error=_describe(exc))
    except Exception as exc:
        # Not httpx's (a resolver's error, a bug): still an attempt, recorded and counted,
        # so that the event moves on through its schedule rather than retry unrecorded.
        log.warning("posting to %s failed unexpectedly", url, exc_info=True)
        return Answer(None, _ms(started), error=_describe(exc))


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


def _describe(exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:RESPONSE_BYTES]


def _record(
    scope: SessionScope, queue: JobQueue, settings: Settings, event: Claimed, answer: Answer
) -> EventStatus | None:
    """Record the attempt and what comes next, under the claim: delivered on a 2xx, failed
    on a 410 or once the schedule is spent, else pending until the next try. A short wait is
    published at once as the message's countdown; a long one is left to maintenance."""
    now = utcnow()
    tries = event.attempts + 1
    # 410 Gone: the receiver says it wants no more of these.
    done = answer.ok or answer.status_code == 410
    delay = None if done else retry_delay(tries, settings.webhook_retry_scale)
    status = DELIVERED if answer.ok else PENDING if delay is not None else FAILED
    countdown = delay if delay is not None and delay <= max_countdown(settings) else None
    with scope() as session:
        recorded = session.execute(
            update(WebhookEvent)
            .where(WebhookEvent.id == event.id, WebhookEvent.delivery_token == event.token)
            .values(
                status=status,
                attempts=tries,
                next_attempt_at=now + timedelta(seconds=delay) if delay is not None else None,
                delivered_at=now if answer.ok else None,
                # A message that goes out below counts as live from now.
                enqueued_at=now if countdown is not None else None,
                delivery_token=None,
                lease_expires_at=None,
            )
        )
        if recorded.rowcount != 1:  # type: ignore[attr-defined]
            # Not possible while the lease outlasts an attempt; said rather than recorded
            # twice.
            log.warning("event %s: the claim was lost during the attempt", event.id)
            session.rollback()
            return None
        session.add(
            WebhookAttempt(
                event_id=event.id,
                number=_next_number(session, event.id),
                at=now,
                status_code=answer.status_code,
                latency_ms=answer.latency_ms,
                response=answer.response,
                error=answer.error,
            )
        )
    if countdown is not None:
        publish(scope, queue, [event.id], event.id, countdown)
    log.info(
        "event %s attempt %d to %s: %s",
        event.id,
        tries,
        event.url,
        answer.status_code or answer.error,
    )
    return status


def _next_number(session: Session, event_id: str) -> int:
    """Attempts are numbered over the event's whole life, redeliveries included."""
    last = session.scalar(
        select(func.max(WebhookAttempt.number)).where(WebhookAttempt.event_id == event_id)
    )
    return int(last or 0) + 1


def _give_up(scope: SessionScope, event: Claimed, why: str) -> EventStatus:
    """An event that can never be sent ends failed, with the reason as an attempt."""
    now = utcnow()
    with scope() as session:
        recorded = session.execute(
            update(WebhookEvent)
            .where(WebhookEvent.id == event.id, WebhookEvent.delivery_token == event.token)
            .values(status=FAILED, next_attempt_at=None, delivery_token=None, lease_expires_at=None)
        )
        if recorded.rowcount == 1:  # type: ignore[attr-defined]
            session.add(
                WebhookAttempt(
                    event_id=event.id,
                    number=_next_number(session, event.id),
                    at=now,
                    latency_ms=0.0,
                    error=why,
                )
            )
    log.warning("event %s failed: %s", event.id, why)
    return FAILED


def _release(scope: SessionScope, event: Claimed) -> None:
    """Hand back a claim that sent nothing (the body or the secret could not be read: an
    outage of ours, not the receiver's): tried again after RENDER_PAUSE, not counted."""
    try:
        with scope() as session:
            session.execute(
                update(WebhookEvent)
                .where(WebhookEvent.id == event.id, WebhookEvent.delivery_token == event.token)
                .values(
                    next_attempt_at=utcnow() + RENDER_PAUSE,
                    delivery_token=None,
                    lease_expires_at=None,
                    enqueued_at=None,
                )
            )
    except Exception:
        # The lease lapses by itself; maintenance publishes the event again then.
        log.warning("event %s: could not hand the claim back", event.id, exc_info=True)
