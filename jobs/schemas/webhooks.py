"""What the API shows of webhooks: the owner's signing secret, and events with every attempt."""

from typing import Literal

from pydantic import BaseModel, Field

from jobs.models import WebhookAttempt, WebhookEvent, WebhookSecret
from jobs.timeutil import aware, unix_seconds, utcnow


class WebhookSecretPublic(BaseModel):
    object: Literal["webhook.secret"] = "webhook.secret"
    secret: str = Field(description="Verify deliveries with `standardwebhooks.Webhook(secret)`.")
    created_at: int
    # After a rotation, deliveries are also signed with the previous secret until then.
    previous_secret_expires_at: int | None

    @classmethod
    def of(cls, secret: WebhookSecret) -> "WebhookSecretPublic":
        until = aware(secret.previous_until)
        return cls(
            secret=secret.secret,
            created_at=unix_seconds(secret.created_at) or 0,
            previous_secret_expires_at=unix_seconds(until) if until and until > utcnow() else None,
        )


class AttemptPublic(BaseModel):
    number: int
    at: int
    status_code: int | None = Field(description="The receiver's answer; null if none came.")
    latency_ms: float | None
    response: str | None = Field(description="The first 1 KB of the receiver's answer.")
    error: str | None = Field(description="Why no answer came (a timeout, a refused address).")

    @classmethod
    def of(cls, attempt: WebhookAttempt) -> "AttemptPublic":
        return cls(
            number=attempt.number,
            at=unix_seconds(attempt.at) or 0,
            status_code=attempt.status_code,
            latency_ms=attempt.latency_ms,
            response=attempt.response,
            error=attempt.error,
        )


class EventPublic(BaseModel):
    id: str
    object: Literal["event"] = "event"
    type: str
    object_id: str
    url: str
    status: str = Field(description="`pending`, `delivered` or `failed`.")
    created_at: int
    delivered_at: int | None
    next_attempt_at: int | None
    attempts: list[AttemptPublic]

    @classmethod
    def of(cls, event: WebhookEvent, attempts: list[WebhookAttempt]) -> "EventPublic":
        return cls(
            id=event.id,
            type=event.type,
            object_id=event.object_id,
            url=event.url,
            status=event.status.value,
            created_at=unix_seconds(event.created_at) or 0,
            delivered_at=unix_seconds(event.delivered_at),
            next_attempt_at=unix_seconds(event.next_attempt_at),
            attempts=[AttemptPublic.of(attempt) for attempt in attempts],
        )


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventPublic]
    first_id: str | None
    last_id: str | None
    has_more: bool
