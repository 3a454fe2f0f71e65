"""The outbox: an event row written in the transaction that ends its object, so that a process
that dies after the commit loses no event, and one that dies before it writes none.

Writing one is the cheapest thing the ending transaction can do: a row that says who, what,
which object and where. What is sent (the object as its GET shows it) is rendered by the
delivery worker on the first attempt, away from the hot path, and stored then.
"""

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy.orm import Session

from jobs.db import insert_ignoring_duplicates
from jobs.models import EventStatus, WebhookEvent
from jobs.timeutil import utcnow

JOB_EVENTS = ("job.succeeded", "job.failed", "job.cancelled")
BATCH_EVENTS = ("batch.completed", "batch.failed", "batch.expired", "batch.cancelled")
EVENT_TYPES = JOB_EVENTS + BATCH_EVENTS


def event_id(object_id: str, type_: str) -> str:
    """An object ends once, so (object, type) names its event: an ending written twice (a
    step retried, two maintainers racing) stays one event."""
    return "evt_" + hashlib.sha256(f"{object_id}\x00{type_}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Ending:
    """An object that just ended with a callback URL: the event to write for it."""

    owner: str
    type: str
    object_id: str
    url: str


def emit(session: Session, endings: Iterable[Ending]) -> None:
    """Write the endings' events, once each (an event already written is left as it is).
    Flushed with the caller's transaction, which commits it together with the ending."""
    now = utcnow()
    rows = [
        {
            "id": event_id(ending.object_id, ending.type),
            "owner": ending.owner,
            "type": ending.type,
            "object_id": ending.object_id,
            "url": ending.url,
            "status": EventStatus.pending,
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
        }
        for ending in endings
    ]
    insert_ignoring_duplicates(session, WebhookEvent, rows)


def job_ended(session: Session, owner: str, job_id: str, status: str, url: str | None) -> None:
    """A job ended `status` (succeeded, failed or cancelled): its event, if it has a URL."""
    if url:
        emit(session, [Ending(owner, f"job.{status}", job_id, url)])


def batch_ended(session: Session, owner: str, batch_id: str, status: str, url: str | None) -> None:
    """A batch ended `status` (completed, failed, expired or cancelled): its event, if it has
    a URL."""
    if url:
        emit(session, [Ending(owner, f"batch.{status}", batch_id, url)])
