"""Webhooks: the owner's signing secret, and the events delivered to callback URLs."""

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Query

from api.deps import OwnerDep, QueueDep, ScopeDep, SessionDep
from jobs.schemas.webhooks import EventList, EventPublic, WebhookSecretPublic
from jobs.webhooks import signing, store
from jobs.webhooks.publishing import publish

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


@router.get("/secret", response_model=WebhookSecretPublic)
def get_secret(session: SessionDep, owner: OwnerDep) -> WebhookSecretPublic:
    """Your signing secret (made on first use): verify deliveries with it."""
    return WebhookSecretPublic.of(signing.owner_secret(session, owner))


@router.post("/secret/rotate", response_model=WebhookSecretPublic)
def rotate_secret(session: SessionDep, owner: OwnerDep) -> WebhookSecretPublic:
    """A new signing secret; for 24 hours deliveries are signed with the old one as well."""
    return WebhookSecretPublic.of(signing.rotate_secret(session, owner))


@router.get("/events", response_model=EventList)
def list_events(
    session: SessionDep,
    owner: OwnerDep,
    object_id: Annotated[str | None, Query(max_length=64)] = None,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> EventList:
    """Your webhook events with every attempt, newest first; `after` is the last id of a page."""
    page, has_more = store.list_events(session, owner, object_id, after, limit)
    attempts = store.attempts_of(session, [event.id for event in page])
    return EventList(
        data=[EventPublic.of(event, attempts[event.id]) for event in page],
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=has_more,
    )


@router.post("/events/{event_id}/redeliver", response_model=EventPublic)
def redeliver_event(
    event_id: str,
    background: BackgroundTasks,
    session: SessionDep,
    scope: ScopeDep,
    owner: OwnerDep,
    queue: QueueDep,
) -> EventPublic:
    """Deliver an event again now, its retries started over."""
    event = store.redeliver(session, owner, event_id)
    # After the commit (background tasks run after it): a message that came first would find
    # the event not yet due. Should this publish fail, maintenance publishes the event.
    background.add_task(publish, scope, queue, [event.id], event.id)
    return EventPublic.of(event, store.attempts_of(session, [event.id])[event.id])
