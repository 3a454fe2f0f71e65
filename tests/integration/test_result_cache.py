"""The result cache against the API and real Postgres: a deterministic request asked again with
`"cache": true` is answered at submission, succeeded, marked cached, at no cost, with the usage
of the first; anything else (sampling without a seed, an expired entry, another owner, another
adapter or seed) runs. Results are recorded through the same claim and record path a worker
takes; no worker runs here."""

import json
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal
from functools import partial
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from jobs import batches, queries, service
from jobs.db import get_session_factory, session_scope
from jobs.maintenance.retention import purge
from jobs.models import CacheEntry, Job, JobStatus, LoraAdapter, WebhookEvent
from jobs.queries import Outcome
from jobs.queue import InProcessQueue
from jobs.schemas.native import JobCreate
from jobs.settings import Settings
from jobs.storage import Storage, storage_from_settings
from jobs.timeutil import utcnow
from jobs.webhooks.events import event_id
from tests.integration import test_batch_steps as batch_steps

MODEL = "tiny-random-mistral"
CHAT = "/v1/chat/completions"


@pytest.fixture
def db(api_settings: Settings) -> Iterator[Session]:
    session = get_session_factory(api_settings.database_url)()
    yield session
    session.close()


@pytest.fixture
def storage(api_settings: Settings) -> Storage:
    return storage_from_settings(api_settings)


def request(**extra: Any) -> dict[str, Any]:
    """A greedy request no other test sends, with the cache on."""
    return {
        "prompt": f"Name a colour ({uuid.uuid4().hex}).",
        "max_tokens": 4,
        "temperature": 0,
        "cache": True,
        **extra,
    }


def post(client: TestClient, headers: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/jobs", json=body, headers=headers)
    assert response.status_code == 202, response.text
    return response.json()  # type: ignore[no-any-return]


def run(db: Session, job_id: str, text: str = "Blue.", tokens: int = 3) -> None:
    """Record a result for a queued job as a worker would, at a cost."""
    [claim] = queries.claim_batch(db, MODEL, "w", 60, 1, first_id=job_id)
    assert claim.job.id == job_id
    cost = Decimal("0.0000001")
    assert queries.record_success(db, claim, Outcome(tokens, "stop", text, None, cost, cost, 0.1))


def test_a_job_asked_twice_is_answered_from_the_cache_at_no_cost(
    client: TestClient, alice: dict[str, str], db: Session
) -> None:
    body = request()
    first = post(client, alice, body)
    assert first["status"] == "queued" and first["cached"] is False
    run(db, first["id"])
    ran = client.get(f"/v1/jobs/{first['id']}", headers=alice).json()
    assert ran["cost"]["total"] > 0 and ran["cached"] is False

    for _ in range(2):  # the entry stays: every identical request is answered from it
        again = post(client, alice, body)
        assert again["id"] != first["id"]
        assert again["status"] == "succeeded" and again["cached"] is True
        assert again["result"] == ran["result"] == {"response": "Blue."}
        assert again["usage"] == ran["usage"]
        assert again["finish_reason"] == "stop"
        assert again["cost"]["total"] == 0
        assert again["started_at"] is not None and again["finished_at"] is not None
        shown = client.get(f"/v1/jobs/{again['id']}", headers=alice).json()
        assert shown["cached"] is True and shown["cost"]["total"] == 0
        assert (shown["result"], shown["usage"]) == (again["result"], again["usage"])
        db.expire_all()
        job = db.get(Job, again["id"])
        assert job is not None and job.cached and job.status == JobStatus.succeeded
        # It never ran: never published, never claimed.
        assert (job.attempts, job.claimed_by, job.enqueued_at, job.group_id) == (
            0,
            None,
            None,
            None,
        )


def test_a_request_that_samples_without_a_seed_is_never_cached(
    client: TestClient, alice: dict[str, str], db: Session
) -> None:
    body = request(temperature=0.7)
    first = post(client, alice, body)
    run(db, first["id"])
    assert db.scalar(select(CacheEntry).where(CacheEntry.job_id == first["id"])) is None
    again = post(client, alice, body)
    assert again["status"] == "queued" and again["cached"] is False


def test_a_seeded_request_is_cached_and_another_seed_is_not_the_same_request(
    client: TestClient, alice: dict[str, str], db: Session
) -> None:
    body = request(temperature=0.7, seed=42)
    run(db, post(client, alice, body)["id"])
    assert post(client, alice, body)["cached"] is True
    other = post(client, alice, {**body, "seed": 43})
    assert other["status"] == "queued" and other["cached"] is False


def test_the_cache_is_off_unless_asked_for(
    client: TestClient, alice: dict[str, str], db: Session
) -> None:
    body = request()
    run(db, post(client, alice, body)["id"])
    plain = post(client, alice, {**body, "cache": False})
    assert plain["status"] == "queued" and plain["cached"] is False


def test_an_expired_entry_does_not_hit_and_retention_removes_it(
    api_settings: Settings, client: TestClient, alice: dict[str, str], db: Session, storage: Storage
) -> None:
    body = request()
    first = post(client, alice, body)
    run(db, first["id"])
    db.execute(
        update(CacheEntry)
        .where(CacheEntry.job_id == first["id"])
        .values(expires_at=utcnow() - timedelta(seconds=1))
    )
    db.commit()
    again = post(client, alice, body)
    assert again["status"] == "queued" and again["cached"] is False

    deleted = purge(partial(session_scope, api_settings.database_url), storage, api_settings)
    assert deleted["result_cache"] >= 1
    db.expire_all()
    assert db.scalar(select(CacheEntry).where(CacheEntry.job_id == first["id"])) is None


def test_another_owner_never_hits(
    client: TestClient, alice: dict[str, str], bob: dict[str, str], db: Session
) -> None:
    body = request()
    run(db, post(client, alice, body)["id"])
    theirs = post(client, bob, body)
    assert theirs["status"] == "queued" and theirs["cached"] is False
    assert post(client, alice, body)["cached"] is True


def adapter(db: Session, owner: str) -> str:
    """An adapter row of `owner`'s for the tiny model, with weights of its own."""
    name = "cache-" + secrets.token_hex(6)
    db.add(
        LoraAdapter(
            id="lora_" + secrets.token_hex(12),
            owner=owner,
            name=name,
            base_model=MODEL,
            rank=4,
            alpha=8.0,
            target_modules=["q_proj"],
            size_bytes=1,
            sha256=secrets.token_hex(32),
            storage_prefix=f"loras/{name}",
        )
    )
    db.commit()
    return name


def test_another_adapter_is_not_the_same_request(
    client: TestClient, alice: dict[str, str], db: Session
) -> None:
    first, second = adapter(db, "alice"), adapter(db, "alice")
    body = request(lora=first)
    run(db, post(client, alice, body)["id"])
    other = post(client, alice, {**body, "lora": second})
    assert other["status"] == "queued" and other["cached"] is False
    base = post(client, alice, {k: v for k, v in body.items() if k != "lora"})
    assert base["cached"] is False
    assert post(client, alice, body)["cached"] is True


@pytest.mark.parametrize("value", ["yes", "true", 1, None, [True]])
def test_a_cache_that_is_not_a_bool_is_422_naming_cache(
    client: TestClient, alice: dict[str, str], value: Any
) -> None:
    job = client.post("/v1/jobs", json={**request(), "cache": value}, headers=alice)
    assert job.status_code == 422, job.text
    assert job.json()["error"]["param"] == "cache"
    batch = client.post(
        "/v1/batches",
        json={"input_file_id": "file-x", "endpoint": CHAT, "cache": value},
        headers=alice,
    )
    assert batch.status_code == 422, batch.text
    assert batch.json()["error"]["param"] == "cache"


def test_a_hit_with_a_callback_url_writes_its_webhook_event(
    api_settings: Settings, db: Session, storage: Storage
) -> None:
    prepared = service.prepare_native(JobCreate.model_validate(request()), api_settings)
    first, _ = service.submit_job(db, InProcessQueue(), "alice", prepared, storage=storage)
    run(db, first.id)
    hooked = replace(prepared, callback_url="https://hooks.example/ended")
    again, created = service.submit_job(db, InProcessQueue(), "alice", hooked, storage=storage)
    assert created and again.cached and again.status == JobStatus.succeeded
    event = db.get(WebhookEvent, event_id(again.id, "job.succeeded"))
    assert event is not None and event.url == "https://hooks.example/ended"


def test_a_large_answer_is_copied_for_the_job_it_answers(
    client: TestClient, alice: dict[str, str], db: Session, storage: Storage
) -> None:
    body = request()
    first = post(client, alice, body)
    [claim] = queries.claim_batch(db, MODEL, "w", 60, 1, first_id=first["id"])
    storage.put_bytes(f"results/{first['id']}.txt", b"a long answer")
    outcome = Outcome(3, "length", None, f"results/{first['id']}.txt", Decimal(0), Decimal(0), 0.1)
    assert queries.record_success(db, claim, outcome)
    again = post(client, alice, body)
    assert again["cached"] is True and again["result"] == {"response": "a long answer"}
    job = db.get(Job, again["id"])
    assert job is not None and job.response_uri == f"results/{again['id']}.txt"
    # The first job's object goes with it (retention): the copy stays.
    storage.delete(f"results/{first['id']}.txt")
    assert client.get(f"/v1/jobs/{again['id']}", headers=alice).json()["result"] == {
        "response": "a long answer"
    }
    # An entry whose answer is gone is dropped, and the request runs.
    missed = post(client, alice, body)
    assert missed["status"] == "queued" and missed["cached"] is False


def chat_line(custom_id: str, content: str, **body: Any) -> bytes:
    line = {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"messages": [{"role": "user", "content": content}], "max_tokens": 4, **body},
    }
    return json.dumps(line).encode()


def start_batch(client: TestClient, headers: dict[str, str], lines: list[bytes]) -> str:
    made = batch_steps.start_batch(client, headers, lines, cache=True)
    assert made["cache"] is True
    return str(made["id"])


def run_lines(
    api_settings: Settings, storage: Storage, db: Session, batch_id: str, lines: list[int]
) -> None:
    for line in lines:
        run(db, batches.line_job_id(batch_id, line), text=f"answer {line}", tokens=line)
    batches.finalize(
        partial(session_scope, api_settings.database_url), storage, api_settings, batch_id
    )


def output(client: TestClient, headers: dict[str, str], batch: dict[str, Any]) -> dict[str, Any]:
    content = client.get(f"/v1/files/{batch['output_file_id']}/content", headers=headers)
    return {
        line["custom_id"]: line["response"]["body"]
        for line in map(json.loads, content.text.splitlines())
    }


def test_batch_lines_are_answered_from_the_cache_and_counted(
    api_settings: Settings, client: TestClient, alice: dict[str, str], db: Session, storage: Storage
) -> None:
    tag = uuid.uuid4().hex
    seeded = [chat_line(f"q{n}", f"Question {n} {tag}", temperature=0.9, seed=n) for n in (1, 2)]
    greedy = chat_line("q3", f"Question 3 {tag}", temperature=0)
    sampled = chat_line("q4", f"Question 4 {tag}", temperature=0.9)
    lines = [*seeded, greedy, sampled]

    first = start_batch(client, alice, lines)
    run_lines(api_settings, storage, db, first, [1, 2, 3, 4])
    ran = client.get(f"/v1/batches/{first}", headers=alice).json()
    assert ran["status"] == "completed" and ran["usage"]["estimated_cost"] > 0
    first_output = output(client, alice, ran)
    assert not any("cached" in body for body in first_output.values())

    second = start_batch(client, alice, lines)
    shown = client.get(f"/v1/batches/{second}", headers=alice).json()
    # The three deterministic lines ended at validation; the sampled one waits for a worker.
    assert shown["status"] == "in_progress"
    assert shown["request_counts"] == {"total": 4, "completed": 3, "failed": 0}
    assert shown["usage"]["completion_tokens"] == 1 + 2 + 3
    assert shown["usage"]["estimated_cost"] == 0
    run_lines(api_settings, storage, db, second, [4])
    done = client.get(f"/v1/batches/{second}", headers=alice).json()
    assert done["status"] == "completed"
    answers = output(client, alice, done)
    for custom_id in ("q1", "q2", "q3"):
        body = answers[custom_id]
        assert body["cached"] is True and body["usage"]["estimated_cost"] == 0
        assert body["choices"] == first_output[custom_id]["choices"]
        assert (
            body["usage"]["completion_tokens"]
            == first_output[custom_id]["usage"]["completion_tokens"]
        )
    assert "cached" not in answers["q4"]

    # Every line answered: the batch needs no worker, and completes at once.
    only_hits = start_batch(client, alice, [*seeded, greedy])
    ended = client.get(f"/v1/batches/{only_hits}", headers=alice).json()
    assert ended["status"] == "completed", ended
    assert ended["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert all(body["cached"] for body in output(client, alice, ended).values())
