"""Webhooks against the real database: events written by the transactions that end jobs and
batches, the routes (secret, rotation, events, redelivery), and delivery attempts made to a
real HTTP receiver on 127.0.0.1."""

import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, Final

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from standardwebhooks import WebhookVerificationError

from api.app import create_app
from jobs import batches, maintenance, queries
from jobs.db import get_session_factory, session_scope
from jobs.models import (
    Batch,
    EventStatus,
    FileObject,
    Job,
    JobStatus,
    WebhookAttempt,
    WebhookEvent,
)
from jobs.queue import InProcessQueue
from jobs.schemas.batches import BatchCreate
from jobs.settings import Settings
from jobs.storage import Storage, storage_from_settings
from jobs.timeutil import utcnow
from jobs.webhooks import publishing
from jobs.webhooks.delivery import LEASE, RESPONSE_BYTES, deliver
from jobs.webhooks.events import event_id
from jobs.webhooks.signing import RETRY_SCHEDULE, new_secret
from tests.factories import make_job
from tests.integration.test_claims import OUTCOME
from tests.receiver import Receiver

MODEL = "tiny-random-mistral"
CHAT: Final = "/v1/chat/completions"


@pytest.fixture(scope="module")
def hook_settings(api_settings: Settings) -> Settings:
    """Callbacks to 127.0.0.1 allowed (the receiver is local), and retries without waiting."""
    return api_settings.model_copy(
        update={"webhook_allow_private": True, "webhook_retry_scale": 0.0}
    )


@pytest.fixture(scope="module")
def hooks_client(hook_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(hook_settings), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def storage(hook_settings: Settings) -> Storage:
    return storage_from_settings(hook_settings)


@pytest.fixture
def db(hook_settings: Settings) -> Iterator[Session]:
    session = get_session_factory(hook_settings.database_url)()
    # Earlier tests leave queued jobs in this database: none may be claimed here but ours.
    unfinished = (JobStatus.queued, JobStatus.running, JobStatus.scheduled)
    session.query(Job).filter(Job.status.in_(unfinished)).update({"status": JobStatus.cancelled})
    # Events of earlier tests are not ours to publish.
    session.query(WebhookEvent).filter(WebhookEvent.status == EventStatus.pending).update(
        {"status": EventStatus.failed}
    )
    session.commit()
    yield session
    session.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as running:
        yield running


def scope_of(settings: Settings):  # type: ignore[no-untyped-def]
    def scope():  # type: ignore[no-untyped-def]
        return session_scope(settings.database_url)

    return scope


def events_of(session: Session, object_id: str) -> list[WebhookEvent]:
    session.expire_all()
    return list(session.scalars(select(WebhookEvent).where(WebhookEvent.object_id == object_id)))


def finished_job(
    db: Session, settings: Settings, url: str | None, owner: str = "alice", **body: Any
) -> Job:
    if url is not None:
        body["callback_url"] = url
    job = make_job(db, settings, owner, **body)
    [claim] = queries.claim_batch(db, MODEL, "w", 60, 1, first_id=job.id)
    assert queries.record_success(db, claim, OUTCOME)
    return job


def make_delivery(settings: Settings, storage: Storage, queue: InProcessQueue | None = None):  # type: ignore[no-untyped-def]
    queue = queue or InProcessQueue()
    return lambda event: deliver(scope_of(settings), storage, queue, settings, event)


# --- the outbox -------------------------------------------------------------------------------


def test_a_job_that_ends_writes_its_event_in_the_same_transaction(
    db: Session, hook_settings: Settings
) -> None:
    url = "https://example.com/hook"
    succeeded = finished_job(db, hook_settings, url)
    [event] = events_of(db, succeeded.id)
    assert (event.type, event.owner, event.url) == ("job.succeeded", "alice", url)
    assert event.status == EventStatus.pending and event.attempts == 0
    assert event.id == event_id(succeeded.id, "job.succeeded") and event.payload is None

    failing = make_job(db, hook_settings, callback_url=url)
    [claim] = queries.claim_batch(db, MODEL, "w", 60, 1, first_id=failing.id)
    assert queries.record_failure(db, claim, "engine_error", "it broke")
    assert [e.type for e in events_of(db, failing.id)] == ["job.failed"]
    # The same claim again records nothing, and writes no second event.
    assert not queries.record_failure(db, claim, "engine_error", "again")
    assert len(events_of(db, failing.id)) == 1

    # A job without a callback URL has no event.
    assert events_of(db, finished_job(db, hook_settings, None).id) == []


def test_a_cancel_rolled_back_leaves_no_event_and_a_committed_one_does(
    db: Session, hook_settings: Settings
) -> None:
    job = make_job(db, hook_settings, callback_url="https://example.com/hook")
    queries.cancel(db, job)
    # Visible to the ending transaction only, and gone with it.
    with session_scope(hook_settings.database_url) as other:
        assert other.get(WebhookEvent, event_id(job.id, "job.cancelled")) is None
    db.rollback()
    assert events_of(db, job.id) == []
    db.refresh(job)
    assert job.status == JobStatus.queued
    queries.cancel(db, job)
    db.commit()
    assert [e.type for e in events_of(db, job.id)] == ["job.cancelled"]


def test_the_cancel_route_writes_the_event(
    db: Session, hook_settings: Settings, hooks_client: TestClient, alice: dict[str, str]
) -> None:
    job = make_job(db, hook_settings, callback_url="https://example.com/hook")
    answer = hooks_client.post(f"/v1/jobs/{job.id}/cancel", headers=alice)
    assert answer.status_code == 200, answer.text
    assert [e.type for e in events_of(db, job.id)] == ["job.cancelled"]


def test_a_job_whose_worker_died_every_time_writes_job_failed(
    db: Session, hook_settings: Settings
) -> None:
    job = make_job(db, hook_settings, callback_url="https://example.com/hook")
    queries.claim_batch(db, MODEL, "w", 60, 1, first_id=job.id)
    db.execute(
        update(Job)
        .where(Job.id == job.id)
        .values(attempts=3, lease_expires_at=utcnow() - timedelta(seconds=1))
    )
    db.commit()
    queries.release_expired(db, max_attempts=3)
    db.refresh(job)
    assert job.status == JobStatus.failed and job.error_code == "worker_lost"
    assert [e.type for e in events_of(db, job.id)] == ["job.failed"]


def upload(client: TestClient, headers: dict[str, str], lines: int = 1) -> str:
    line = {
        "custom_id": "x",
        "method": "POST",
        "url": CHAT,
        "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    }
    content = b"\n".join(
        json.dumps({**line, "custom_id": f"row-{n}"}).encode() for n in range(lines)
    )
    uploaded = client.post(
        "/v1/files",
        files={"file": ("in.jsonl", content + b"\n")},
        data={"purpose": "batch"},
        headers=headers,
    )
    assert uploaded.status_code == 200, uploaded.text
    return uploaded.json()["id"]  # type: ignore[no-any-return]


def test_batches_that_end_write_their_events(
    db: Session,
    hook_settings: Settings,
    hooks_client: TestClient,
    alice: dict[str, str],
    storage: Storage,
) -> None:
    url = "https://example.com/batch-hook"
    body = {"endpoint": CHAT, "callback_url": url}
    # Cancelled, then finalized (after the response, as a background task).
    made = hooks_client.post(
        "/v1/batches", json={**body, "input_file_id": upload(hooks_client, alice)}, headers=alice
    ).json()
    assert [e.type for e in events_of(db, made["id"])] == []
    hooks_client.post(f"/v1/batches/{made['id']}/cancel", headers=alice)
    shown = hooks_client.get(f"/v1/batches/{made['id']}", headers=alice).json()
    assert shown["status"] == "cancelled", shown
    assert [(e.type, e.url) for e in events_of(db, made["id"])] == [("batch.cancelled", url)]

    # Failed in validation: its input file's contents are gone.
    file_id = upload(hooks_client, alice)
    with session_scope(hook_settings.database_url) as session:
        stored = session.get(FileObject, file_id)
        assert stored is not None
        storage.delete(stored.storage_key)
    failed = hooks_client.post(
        "/v1/batches", json={**body, "input_file_id": file_id}, headers=alice
    ).json()
    shown = hooks_client.get(f"/v1/batches/{failed['id']}", headers=alice).json()
    assert shown["status"] == "failed", shown
    assert [e.type for e in events_of(db, failed["id"])] == ["batch.failed"]

    # Failed because its step's process died every time (`_give_up`).
    with session_scope(hook_settings.database_url) as session:
        request = BatchCreate(
            input_file_id=upload(hooks_client, alice), endpoint=CHAT, callback_url=url
        )
        batch, _ = batches.create_batch(session, "alice", request, hook_settings)
        batch.step_attempts = hook_settings.batch_step_attempts
        batch.step_token = "dead"
        batch.lease_expires_at = utcnow() - timedelta(seconds=1)
        session.commit()
        given_up = batch.id
    maintenance.advance(scope_of(hook_settings), storage, InProcessQueue(), hook_settings)
    assert db.get(Batch, given_up, populate_existing=True).status.value == "failed"  # type: ignore[union-attr]
    assert [e.type for e in events_of(db, given_up)] == ["batch.failed"]


# --- delivery to a real receiver ------------------------------------------------------------


def test_a_delivery_is_signed_and_carries_the_object_as_its_get_shows_it(
    db: Session,
    hook_settings: Settings,
    hooks_client: TestClient,
    alice: dict[str, str],
    storage: Storage,
    receiver: Receiver,
) -> None:
    job = finished_job(db, hook_settings, receiver.url, metadata={"k": "v"})
    evt = event_id(job.id, "job.succeeded")
    queue = InProcessQueue()
    assert make_delivery(hook_settings, storage, queue)(evt) == EventStatus.delivered
    [got] = receiver.snapshot()
    secret = hooks_client.get("/v1/webhooks/secret", headers=alice).json()["secret"]
    body = got.verify(secret)
    assert body["id"] == evt == got.event_id
    assert (body["object"], body["type"]) == ("event", "job.succeeded")
    assert body["data"] == hooks_client.get(f"/v1/jobs/{job.id}", headers=alice).json()
    assert got.headers["content-type"] == "application/json"
    # Delivered: a message for it again does nothing.
    assert make_delivery(hook_settings, storage)(evt) is None
    assert len(receiver.snapshot()) == 1
    listed = hooks_client.get(
        "/v1/webhooks/events", params={"object_id": job.id}, headers=alice
    ).json()
    [shown] = listed["data"]
    assert shown["status"] == "delivered" and shown["delivered_at"] is not None
    [attempt] = shown["attempts"]
    assert attempt["number"] == 1 and attempt["status_code"] == 200
    assert attempt["response"] == "ok" and attempt["latency_ms"] >= 0


def test_retries_resend_the_same_bytes_and_id_signed_afresh_until_a_2xx(
    db: Session, hook_settings: Settings, storage: Storage
) -> None:
    with Receiver(answer=lambda _, n: 500 if n < 2 else 204, body=b"x" * 3000) as receiver:
        job = finished_job(db, hook_settings, receiver.url)
        evt = event_id(job.id, "job.succeeded")
        queue = InProcessQueue()
        delivery = make_delivery(hook_settings, storage, queue)
        assert delivery(evt) == EventStatus.pending
        # A short wait goes out at once as the message's countdown.
        assert queue.events == [evt]
        assert delivery(evt) == EventStatus.pending
        assert delivery(evt) == EventStatus.delivered
        got = receiver.snapshot()
    assert len(got) == 3
    assert {g.event_id for g in got} == {evt}
    assert len({g.body for g in got}) == 1
    attempts = list(
        db.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.event_id == evt)
            .order_by(WebhookAttempt.number)
        )
    )
    assert [(a.number, a.status_code) for a in attempts] == [(1, 500), (2, 500), (3, 204)]
    # The first 1 KB of each answer is kept.
    assert attempts[0].response == "x" * RESPONSE_BYTES


def test_410_stops_retries_and_a_spent_schedule_fails_the_event(
    db: Session, hook_settings: Settings, storage: Storage
) -> None:
    with Receiver(answer=lambda _, __: 410) as gone:
        evt = event_id(finished_job(db, hook_settings, gone.url).id, "job.succeeded")
        assert make_delivery(hook_settings, storage)(evt) == EventStatus.failed
        assert make_delivery(hook_settings, storage)(evt) is None
        assert len(gone.snapshot()) == 1
    with Receiver(answer=lambda _, __: 503) as down:
        evt = event_id(finished_job(db, hook_settings, down.url).id, "job.succeeded")
        delivery = make_delivery(hook_settings, storage)
        statuses = [delivery(evt) for _ in range(len(RETRY_SCHEDULE) + 1)]
        assert statuses == [EventStatus.pending] * 7 + [EventStatus.failed, None]
        assert len(down.snapshot()) == len(RETRY_SCHEDULE)


def test_a_long_wait_is_left_to_maintenance_which_publishes_it_once_due(
    db: Session, hook_settings: Settings, storage: Storage, receiver: Receiver
) -> None:
    slow = hook_settings.model_copy(update={"webhook_retry_scale": 1.0})
    with Receiver(answer=lambda _, __: 500) as failing:
        evt = event_id(finished_job(db, slow, failing.url).id, "job.succeeded")
        # Due now, never published: maintenance publishes it, once.
        queue = InProcessQueue()
        assert publishing.publish_due(scope_of(slow), queue, slow) == 1
        assert publishing.publish_due(scope_of(slow), queue, slow) == 0
        assert queue.events == [evt]
        # The first retry is 5 s away: a countdown, marked as a live message.
        assert make_delivery(slow, storage, queue)(evt) == EventStatus.pending
        assert queue.events == [evt, evt]
        # Not due yet: an early message posts nothing, and is spent: the event counts as
        # unpublished, so the publisher sends it once due (not after requeue_after_seconds).
        assert make_delivery(slow, storage, queue)(evt) is None
        early = db.get(WebhookEvent, evt, populate_existing=True)
        assert early is not None and early.enqueued_at is None and len(failing.snapshot()) == 1
        assert publishing.publish_due(scope_of(slow), queue, slow) == 0  # not due yet
        db.execute(
            update(WebhookEvent)
            .where(WebhookEvent.id == evt)
            .values(attempts=3, next_attempt_at=utcnow() - timedelta(seconds=1))
        )
        db.commit()
        assert make_delivery(slow, storage, queue)(evt) == EventStatus.pending
    # Two hours to the next try: no countdown that long; maintenance publishes it when due.
    event = db.get(WebhookEvent, evt, populate_existing=True)
    assert event is not None and event.enqueued_at is None
    assert queue.events == [evt, evt]
    assert publishing.publish_due(scope_of(slow), queue, slow) == 0


def test_a_duplicate_message_never_posts_while_an_attempt_is_under_way(
    db: Session, hook_settings: Settings, storage: Storage
) -> None:
    with Receiver(delay=1.0) as slow:
        evt = event_id(finished_job(db, hook_settings, slow.url).id, "job.succeeded")
        delivery = make_delivery(hook_settings, storage)
        first: list[EventStatus | None] = []
        running = threading.Thread(target=lambda: first.append(delivery(evt)))
        running.start()
        publishing_queue = InProcessQueue()
        for _ in range(50):
            if slow.snapshot():
                break
            threading.Event().wait(0.05)
        # Claimed and leased: a second message, and maintenance, leave it alone.
        assert delivery(evt) is None
        assert publishing.publish_due(scope_of(hook_settings), publishing_queue, hook_settings) == 0
        running.join()
        assert first == [EventStatus.delivered]
        assert len(slow.snapshot()) == 1
    # A claim whose process died is published again once its lease lapses.
    with Receiver() as receiver:
        evt = event_id(finished_job(db, hook_settings, receiver.url).id, "job.succeeded")
        db.execute(
            update(WebhookEvent)
            .where(WebhookEvent.id == evt)
            .values(delivery_token="dead", lease_expires_at=utcnow() + LEASE)
        )
        db.commit()
        assert publishing.publish_due(scope_of(hook_settings), publishing_queue, hook_settings) == 0
        db.execute(
            update(WebhookEvent)
            .where(WebhookEvent.id == evt)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
        db.commit()
        assert publishing.publish_due(scope_of(hook_settings), publishing_queue, hook_settings) == 1
        assert make_delivery(hook_settings, storage)(evt) == EventStatus.delivered


def test_a_private_address_is_refused_at_delivery_without_allow_private(
    db: Session, hook_settings: Settings, storage: Storage, receiver: Receiver
) -> None:
    evt = event_id(finished_job(db, hook_settings, receiver.url).id, "job.succeeded")
    strict = hook_settings.model_copy(update={"webhook_allow_private": False})
    assert make_delivery(strict, storage)(evt) == EventStatus.pending
    assert receiver.snapshot() == []
    [attempt] = db.scalars(select(WebhookAttempt).where(WebhookAttempt.event_id == evt))
    assert attempt.status_code is None and "127.0.0.1" in (attempt.error or "")


# --- the routes -------------------------------------------------------------------------------


def test_the_secret_is_made_once_and_a_rotation_signs_with_both_for_a_day(
    db: Session,
    hook_settings: Settings,
    hooks_client: TestClient,
    storage: Storage,
    receiver: Receiver,
) -> None:
    from tests.integration.conftest import make_key

    carol = {"Authorization": f"Bearer {make_key(hook_settings, 'carol')}"}
    first = hooks_client.get("/v1/webhooks/secret", headers=carol).json()
    assert first["secret"].startswith("whsec_") and first["previous_secret_expires_at"] is None
    assert hooks_client.get("/v1/webhooks/secret", headers=carol).json() == first
    rotated = hooks_client.post("/v1/webhooks/secret/rotate", headers=carol)
    assert rotated.status_code == 200, rotated.text
    second = rotated.json()
    assert second["secret"] != first["secret"]
    overlap = second["previous_secret_expires_at"] - second["created_at"]
    assert abs(overlap - 24 * 3600) <= 1
    assert hooks_client.get("/v1/webhooks/secret", headers=carol).json() == second

    job = finished_job(db, hook_settings, receiver.url, owner="carol")
    make_delivery(hook_settings, storage)(event_id(job.id, "job.succeeded"))
    [got] = receiver.snapshot()
    got.verify(first["secret"])
    got.verify(second["secret"])
    with pytest.raises(WebhookVerificationError):
        got.verify(new_secret())


def test_events_are_listed_newest_first_with_a_cursor_and_only_to_their_owner(
    db: Session,
    hook_settings: Settings,
    hooks_client: TestClient,
    alice: dict[str, str],
    bob: dict[str, str],
) -> None:
    url = "https://example.com/hook"
    jobs = [finished_job(db, hook_settings, url) for _ in range(3)]
    one = hooks_client.get(
        "/v1/webhooks/events", params={"object_id": jobs[0].id}, headers=alice
    ).json()
    assert [e["object_id"] for e in one["data"]] == [jobs[0].id]
    assert one["data"][0]["attempts"] == [] and one["has_more"] is False
    page = hooks_client.get("/v1/webhooks/events", params={"limit": 2}, headers=alice).json()
    assert [e["object_id"] for e in page["data"]] == [jobs[2].id, jobs[1].id]
    assert page["has_more"] is True and page["last_id"] == page["data"][1]["id"]
    more = hooks_client.get(
        "/v1/webhooks/events", params={"limit": 2, "after": page["last_id"]}, headers=alice
    ).json()
    assert more["data"][0]["object_id"] == jobs[0].id
    # Another owner sees none of them, and cannot redeliver them.
    theirs = hooks_client.get(
        "/v1/webhooks/events", params={"object_id": jobs[0].id}, headers=bob
    ).json()
    assert theirs["data"] == []
    evt = one["data"][0]["id"]
    refused = hooks_client.post(f"/v1/webhooks/events/{evt}/redeliver", headers=bob)
    assert refused.status_code == 404 and refused.json()["error"]["param"] == "event_id"
    bad_cursor = hooks_client.get("/v1/webhooks/events", params={"after": evt}, headers=bob)
    assert bad_cursor.status_code == 422 and bad_cursor.json()["error"]["param"] == "after"
    assert hooks_client.get("/v1/webhooks/events", headers={}).status_code == 401


def test_redelivery_sends_the_same_event_again_with_its_attempts_numbered_on(
    db: Session,
    hook_settings: Settings,
    hooks_client: TestClient,
    alice: dict[str, str],
    storage: Storage,
    receiver: Receiver,
) -> None:
    job_id = finished_job(db, hook_settings, receiver.url).id
    evt = event_id(job_id, "job.succeeded")
    delivery = make_delivery(hook_settings, storage)
    assert delivery(evt) == EventStatus.delivered
    again = hooks_client.post(f"/v1/webhooks/events/{evt}/redeliver", headers=alice)
    assert again.status_code == 200, again.text
    assert again.json()["status"] == "pending" and len(again.json()["attempts"]) == 1
    # The route published its message (to Redis, where no delivery worker listens in these
    # tests); the attempt is made here.
    assert delivery(evt) == EventStatus.delivered
    first, second = receiver.snapshot()
    assert first.event_id == second.event_id == evt and first.body == second.body
    shown = hooks_client.get(
        "/v1/webhooks/events", params={"object_id": job_id}, headers=alice
    ).json()["data"][0]
    assert [a["number"] for a in shown["attempts"]] == [1, 2]
    # While an attempt is under way, a redelivery is a conflict.
    db.execute(
        update(WebhookEvent)
        .where(WebhookEvent.id == evt)
        .values(delivery_token="busy", lease_expires_at=utcnow() + LEASE)
    )
    db.commit()
    busy = hooks_client.post(f"/v1/webhooks/events/{evt}/redeliver", headers=alice)
    assert busy.status_code == 409, busy.text


def test_retention_deletes_ended_events_with_their_attempts_and_keeps_the_rest(
    db: Session, hook_settings: Settings, storage: Storage, receiver: Receiver
) -> None:
    old = utcnow() - timedelta(days=hook_settings.retention_days + 1)
    delivered = event_id(finished_job(db, hook_settings, receiver.url).id, "job.succeeded")
    make_delivery(hook_settings, storage)(delivered)
    redelivered = event_id(finished_job(db, hook_settings, receiver.url).id, "job.succeeded")
    make_delivery(hook_settings, storage)(redelivered)
    pending = event_id(finished_job(db, hook_settings, receiver.url).id, "job.succeeded")
    for evt in (delivered, redelivered, pending):
        db.execute(update(WebhookEvent).where(WebhookEvent.id == evt).values(created_at=old))
    # The first's attempt is as old as it; the second was attempted again just now.
    db.execute(update(WebhookAttempt).where(WebhookAttempt.event_id == delivered).values(at=old))
    db.commit()
    maintenance.purge(scope_of(hook_settings), storage, hook_settings)
    db.expire_all()
    assert db.get(WebhookEvent, delivered) is None
    assert (
        db.scalars(select(WebhookAttempt).where(WebhookAttempt.event_id == delivered)).all() == []
    )
    assert db.get(WebhookEvent, redelivered) is not None
    assert db.get(WebhookEvent, pending) is not None
