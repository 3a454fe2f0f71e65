"""What the API reads and changes of webhook events: the owner's list, and redelivery."""

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from jobs.db import newest_first
from jobs.errors import Conflict, NotFound
from jobs.models import EventStatus, WebhookAttempt, WebhookEvent
from jobs.timeutil import utcnow


def get_event(session: Session, owner: str, event_id: str) -> WebhookEvent:
    event = session.get(WebhookEvent, event_id)
    if event is None or event.owner != owner:
        raise NotFound(f"no webhook event {event_id}", param="event_id")
    return event


def list_events(
    session: Session, owner: str, object_id: str | None, after: str | None, limit: int
) -> tuple[list[WebhookEvent], bool]:
    """The owner's events, newest first (of one object, with `object_id`); `after` is the
    id of the last event of the page before. Read through `(owner, created_at, id)`."""
    query = select(WebhookEvent).where(WebhookEvent.owner == owner)
    if object_id is not None:
        query = query.where(WebhookEvent.object_id == object_id)
    return newest_first(session, query, after, limit, "webhook event")


def attempts_of(session: Session, event_ids: list[str]) -> dict[str, list[WebhookAttempt]]:
    """Every attempt of each event, in order: one read by the attempts' key."""
    found: dict[str, list[WebhookAttempt]] = {event_id: [] for event_id in event_ids}
    if event_ids:
        for attempt in session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.event_id.in_(event_ids))
            .order_by(WebhookAttempt.event_id, WebhookAttempt.number)
        ):
            found[attempt.event_id].append(attempt)
    return found


def redeliver(session: Session, owner: str, event_id: str) -> WebhookEvent:
    """Deliver an event again now, with the retry schedule started over (the same body and
    `webhook-id`); marked enqueued, so the caller publishes its message once this commits.
    Conflict while an attempt of it is under way. A conditional UPDATE, flushed; the unit of
    work commits it."""
    event = get_event(session, owner, event_id)
    now = utcnow()
    taken = session.execute(
        update(WebhookEvent)
        .where(
            WebhookEvent.id == event.id,
            or_(WebhookEvent.lease_expires_at.is_(None), WebhookEvent.lease_expires_at < now),
        )
        .values(
            status=EventStatus.pending,
            attempts=0,
            next_attempt_at=now,
            enqueued_at=now,
            delivered_at=None,
            delivery_token=None,
            lease_expires_at=None,
        )
    )
    if taken.rowcount != 1:  # type: ignore[attr-defined]
        raise Conflict(
            f"webhook event {event_id} is being delivered right now; try again in a minute",
            param="event_id",
        )
    session.refresh(event)
    return event
