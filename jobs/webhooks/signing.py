"""Owners' signing secrets and the Standard Webhooks signature (`standardwebhooks`), and the
retry schedule deliveries follow.

A receiver verifies with `standardwebhooks.Webhook(secret).verify(body, headers)`, which
refuses a timestamp more than 5 minutes from its clock: so every attempt is signed afresh at
its own time, over the same body bytes and under the same `webhook-id` (the event id).
"""

import base64
import os
from datetime import UTC, datetime, timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from jobs.db import insert_ignoring_duplicates
from jobs.models import WebhookSecret
from jobs.timeutil import aware, utcnow

SECRET_PREFIX = "whsec_"
# The Standard Webhooks spec asks for 24 to 64 random bytes.
SECRET_BYTES = 32
# After a rotation the previous secret signs too, for this long, so that receivers can
# switch over without refusing a delivery.
ROTATION_OVERLAP = timedelta(hours=24)

# Seconds before each attempt, counted from the end of the one before (the first from the
# object's end): SPEC 2.4. Eight attempts in all, over about 28 hours.
HOUR = 3600.0
RETRY_SCHEDULE = (0.0, 5.0, 5 * 60.0, 30 * 60.0, 2 * HOUR, 5 * HOUR, 10 * HOUR, 10 * HOUR)


def retry_delay(attempts: int, scale: float) -> float | None:
    """Seconds to wait before the next attempt after `attempts` attempts of a series, scaled
    by `webhook_retry_scale`; None once the schedule is spent."""
    if attempts >= len(RETRY_SCHEDULE):
        return None
    return RETRY_SCHEDULE[attempts] * scale


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(os.urandom(SECRET_BYTES)).decode()


def owner_secret(session: Session, owner: str) -> WebhookSecret:
    """The owner's secret, made on first use (once, however many ask at once). Flushed; the
    caller commits."""
    secret = session.get(WebhookSecret, owner)
    if secret is not None:
        return secret
    row = {"owner": owner, "secret": new_secret(), "created_at": utcnow()}
    insert_ignoring_duplicates(session, WebhookSecret, [row])
    made = session.get(WebhookSecret, owner, populate_existing=True)
    assert made is not None  # inserted now, or by whoever won the race
    return made


def rotate_secret(session: Session, owner: str) -> WebhookSecret:
    """A new secret for the owner; the one it replaces keeps signing for ROTATION_OVERLAP.
    One UPDATE under the row's lock, so two rotations at once apply one after the other: the
    second keeps the first's new secret, and the one before that stops signing (one previous
    secret is kept, as the Standard Webhooks rotation has it). Flushed; the caller commits."""
    owner_secret(session, owner)
    now = utcnow()
    session.execute(
        update(WebhookSecret)
        .where(WebhookSecret.owner == owner)
        .values(
            previous_secret=WebhookSecret.secret,
            previous_until=now + ROTATION_OVERLAP,
            secret=new_secret(),
            created_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    rotated = session.get(WebhookSecret, owner, populate_existing=True)
    assert rotated is not None
    return rotated


def signing_secrets(secret: WebhookSecret, now: datetime | None = None) -> list[str]:
    """The secrets a delivery is signed with now: the current one, and the previous one
    while its overlap lasts."""
    now = now or utcnow()
    until = aware(secret.previous_until)
    if secret.previous_secret and until is not None and until > now:
        return [secret.secret, secret.previous_secret]
    return [secret.secret]


def signature_headers(
    message_id: str, body: str, secrets: list[str], at: datetime | None = None
) -> dict[str, str]:
    """The Standard Webhooks headers for `body` sent at `at`, signed with each secret."""
    # `Webhook.sign` reads the datetime as UTC whatever its zone says: hand it UTC.
    at = (at or utcnow()).astimezone(UTC)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": " ".join(Webhook(s).sign(message_id, at, body) for s in secrets),
    }
