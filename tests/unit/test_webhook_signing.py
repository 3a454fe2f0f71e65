"""Signing as the Standard Webhooks spec says, checked with the receivers' own library, and the
retry schedule of SPEC 2.4."""

import json
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from jobs.models import WebhookSecret
from jobs.webhooks.signing import (
    RETRY_SCHEDULE,
    new_secret,
    retry_delay,
    signature_headers,
    signing_secrets,
)

BODY = json.dumps({"id": "evt_1", "object": "event", "data": {"text": "héllo"}})


def test_a_delivery_signed_with_the_owners_secret_verifies() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_") and len(secret) == 50
    headers = signature_headers("evt_1", BODY, [secret])
    assert headers["webhook-id"] == "evt_1"
    assert Webhook(secret).verify(BODY, headers) == json.loads(BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY.replace("1", "2"), headers)


def test_during_a_rotation_either_secret_verifies() -> None:
    old, new = new_secret(), new_secret()
    headers = signature_headers("evt_1", BODY, [new, old])
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert Webhook(old).verify(BODY, headers) == Webhook(new).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers)


def test_the_previous_secret_signs_only_until_its_overlap_ends() -> None:
    now = datetime.now(UTC)
    row = WebhookSecret(
        owner="o", secret="new", previous_secret="old", previous_until=now + timedelta(hours=1)
    )
    assert signing_secrets(row, now) == ["new", "old"]
    assert signing_secrets(row, now + timedelta(hours=2)) == ["new"]
    # SQLite hands back naive UTC datetimes.
    row.previous_until = (now + timedelta(hours=1)).replace(tzinfo=None)
    assert signing_secrets(row, now) == ["new", "old"]


def test_each_attempt_is_signed_at_its_own_time_whatever_the_zone() -> None:
    secret = new_secret()
    # The same instant given in another zone signs the same timestamp (the library reads
    # any datetime as UTC, so it must be handed UTC).
    at = datetime.now(ZoneInfo("America/New_York"))
    headers = signature_headers("evt_1", BODY, [secret], at)
    assert headers["webhook-timestamp"] == str(int(at.timestamp()))
    Webhook(secret).verify(BODY, headers)
    # An attempt signed ten minutes ago is refused by receivers: never re-send old headers.
    stale = signature_headers("evt_1", BODY, [secret], at - timedelta(minutes=10))
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY, stale)


def test_the_retry_schedule_is_the_specs_scaled() -> None:
    assert RETRY_SCHEDULE == (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    assert [retry_delay(n, 1.0) for n in range(9)] == [*RETRY_SCHEDULE, None]
    assert retry_delay(1, 0.01) == pytest.approx(0.05)
    assert retry_delay(7, 0.001) == pytest.approx(36.0)
    assert retry_delay(8, 0.001) is None
