"""Publishing the messages that wake `mbatch webhooks`: the guarantee behind every delivery.

An event is written with no message (the transaction that ends a job knows nothing of the
broker), a message can be lost (a Redis restart) and a worker can die holding one. So the
maintenance pass, and the delivery worker itself every second, publish each event that is
due and has no live message: never published (`enqueued_at` NULL, as every new event and
every event whose claim was spent), or published longer than `requeue_after_seconds` ago,
and not held under a live lease. A message too many only costs a claim that finds nothing to
do.
"""

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from jobs.models import EventStatus, WebhookEvent
from jobs.queue import JobQueue
from jobs.settings import Settings
from jobs.timeutil import utcnow

log = logging.getLogger(__name__)

SessionScope = Callable[[], AbstractContextManager[Session]]

# Events published per pass at most: a backlog is published over a few passes, at the pace
# the delivery workers take it.
EVENTS_PER_PASS = 500


def take_due(
    scope: SessionScope,
    settings: Settings,
    now: datetime | None = None,
    limit: int = EVENTS_PER_PASS,
) -> list[str]:
    """Mark up to `limit` due events without a live message enqueued now, longest due first;
    their ids. Read through the partial index of pending events by `next_attempt_at`, so a
    pass never reads an event that has ended. Rows another maintainer holds are skipped."""
    now = now or utcnow()
    stale = now - timedelta(seconds=settings.requeue_after_seconds)
    due = (
        select(WebhookEvent.id)
        .where(
            WebhookEvent.status == EventStatus.pending,
            WebhookEvent.next_attempt_at <= now,
            or_(WebhookEvent.enqueued_at.is_(None), WebhookEvent.enqueued_at < stale),
            or_(WebhookEvent.lease_expires_at.is_(None), WebhookEvent.lease_expires_at < now),
        )
        .order_by(WebhookEvent.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    with scope() as session:
        ids = list(
            session.scalars(
                update(WebhookEvent)
                .where(WebhookEvent.id.in_(due))
                .values(enqueued_at=now)
                .returning(WebhookEvent.id)
                .execution_options(synchronize_session=False)
            )
        )
    return ids


def publish_due(scope: SessionScope, queue: JobQueue, settings: Settings) -> int:
    """Publish the events that are due and have no message in flight; how many."""
    ids = take_due(scope, settings)
    for done, event_id in enumerate(ids):
        if not publish(scope, queue, ids[done:], event_id):
            return done
    if ids:
        log.info("published %d webhook events", len(ids))
    return len(ids)


def publish(
    scope: SessionScope,
    queue: JobQueue,
    marked: list[str],
    event_id: str,
    countdown: float = 0,
) -> bool:
    """Publish `event_id`'s message; True if it went out. The events `marked` enqueued with
    it are marked unpublished again when the broker is down, so that maintenance publishes
    them when they are due; they are not tried one by one against a broker that is down."""
    try:
        queue.publish_event(event_id, countdown=countdown)
        return True
    except Exception:
        log.warning("could not publish webhook event %s; maintenance will", event_id, exc_info=True)
    try:
        with scope() as session:
            session.execute(
                update(WebhookEvent)
                .where(WebhookEvent.id.in_(marked), WebhookEvent.status == EventStatus.pending)
                .values(enqueued_at=None)
                .execution_options(synchronize_session=False)
            )
    except Exception:
        # They were published longer than requeue_after_seconds ago by then: published again.
        log.warning("could not mark webhook events unpublished", exc_info=True)
    return False
