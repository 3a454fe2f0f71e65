"""A batch's steps against the real database and storage: poison lines become error lines, a
step that keeps failing ends its batch `failed`, and no batch's failure stops another's."""

import json
import time
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from jobs import batches, maintenance, queries
from jobs.db import session_scope
from jobs.models import Batch, BatchStatus, FileObject
from jobs.queries import Outcome
from jobs.queue import CeleryJobQueue
from jobs.schemas.batches import BatchCreate
from jobs.settings import Settings
from jobs.storage import Storage, storage_from_settings
from jobs.timeutil import utcnow
from worker.results import place_response

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def step_settings(api_settings: Settings) -> Settings:
    """Failed steps tried again within a second, three tries in all."""
    return api_settings.model_copy(
        update={"batch_step_attempts": 3, "batch_step_retry_seconds": 0.3}
    )


@pytest.fixture(scope="module")
def steps_client(step_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(step_settings), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def storage(step_settings: Settings) -> Storage:
    return storage_from_settings(step_settings)


def chat_line(custom_id: Any, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body},
    }


def start_batch(
    client: TestClient,
    headers: dict[str, str],
    lines: list[bytes],
    endpoint: str = CHAT,
    **body: Any,
) -> dict[str, Any]:
    """A batch of these lines (its file uploaded first), with any other fields of its body."""
    uploaded = client.post(
        "/v1/files",
        files={"file": ("in.jsonl", b"\n".join(lines) + b"\n")},
        data={"purpose": "batch"},
        headers=headers,
    )
    assert uploaded.status_code == 200, uploaded.text
    made = client.post(
        "/v1/batches",
        json={"input_file_id": uploaded.json()["id"], "endpoint": endpoint, **body},
        headers=headers,
    )
    assert made.status_code == 200, made.text
    return made.json()  # type: ignore[no-any-return]


def advance(settings: Settings, storage: Storage) -> None:
    def scope():  # type: ignore[no-untyped-def]
        return session_scope(settings.database_url)

    maintenance.advance(scope, storage, CeleryJobQueue(settings), settings)


def test_poison_lines_become_error_lines_and_the_rest_of_the_batch_runs(
    steps_client: TestClient, alice: dict[str, str], step_settings: Settings, storage: Storage
) -> None:
    poison = [
        json.dumps(chat_line("good-1")).encode(),
        json.dumps(chat_line("nul\x00id")).encode(),
        json.dumps(chat_line("lone\ud800")).encode(),
        json.dumps(chat_line("x" * 513)).encode(),
        json.dumps({**chat_line("long-key"), "k" * 300: 1}).encode(),
        json.dumps(chat_line("deep")).encode()[:-2]
        + b', "x": '
        + b"[" * 50_000
        + b"]" * 50_000
        + b"}}",
        json.dumps(chat_line("seed", seed=2**70)).encode(),
        json.dumps(chat_line("good-2")).encode(),
    ]
    batch = start_batch(steps_client, alice, poison)
    shown = steps_client.get(f"/v1/batches/{batch['id']}", headers=alice).json()
    assert shown["status"] == "in_progress", shown
    assert shown["request_counts"] == {"total": 8, "completed": 0, "failed": 6}

    cancelled = steps_client.post(f"/v1/batches/{batch['id']}/cancel", headers=alice).json()
    assert cancelled["status"] in ("cancelling", "cancelled")
    ended = steps_client.get(f"/v1/batches/{batch['id']}", headers=alice).json()
    assert ended["status"] == "cancelled", ended
    content = steps_client.get(f"/v1/files/{ended['error_file_id']}/content", headers=alice)
    errors = [json.loads(line)["error"] for line in content.text.splitlines()]
    assert [error["line"] for error in errors] == list(range(1, 9))
    by_line = {error["line"]: error for error in errors}
    assert {by_line[n]["code"] for n in (1, 8)} == {"batch_cancelled"}
    assert all(by_line[n]["message"].startswith(f"line {n}:") for n in range(2, 8))
    assert by_line[7]["param"] == "body.seed"


def upload(client: TestClient, headers: dict[str, str], lines: list[bytes]) -> str:
    uploaded = client.post(
        "/v1/files",
        files={"file": ("in.jsonl", b"\n".join(lines))},
        data={"purpose": "batch"},
        headers=headers,
    )
    assert uploaded.status_code == 200, uploaded.text
    return uploaded.json()["id"]  # type: ignore[no-any-return]


def stored_path(settings: Settings, file_id: str) -> Path:
    """Where the local storage keeps a file's contents."""
    with session_scope(settings.database_url) as session:
        file = session.get(FileObject, file_id)
        assert file is not None
        return Path(settings.storage_url.removeprefix("file://")) / file.storage_key


LINES = [json.dumps(chat_line(f"row-{n}")).encode() for n in range(3)]


def test_a_lost_input_file_fails_its_batch_at_once(
    steps_client: TestClient, alice: dict[str, str], step_settings: Settings
) -> None:
    file_id = upload(steps_client, alice, LINES)
    stored_path(step_settings, file_id).unlink()
    body = {"input_file_id": file_id, "endpoint": CHAT}
    estimate = steps_client.post("/v1/batches", json={**body, "dry_run": True}, headers=alice)
    assert estimate.status_code == 410, estimate.text
    assert estimate.json()["error"]["code"] == "file_content_unavailable"
    batch = steps_client.post("/v1/batches", json=body, headers=alice).json()
    shown = steps_client.get(f"/v1/batches/{batch['id']}", headers=alice).json()
    assert shown["status"] == "failed", shown
    assert shown["errors"]["data"][0]["code"] == "file_content_unavailable"


def test_a_storage_outage_of_one_batch_is_waited_out_and_never_stops_another_batch(
    steps_client: TestClient,
    alice: dict[str, str],
    bob: dict[str, str],
    step_settings: Settings,
    storage: Storage,
) -> None:
    # Alice's input cannot be read for now (its place in storage is not a readable file).
    file_id = upload(steps_client, alice, LINES)
    path = stored_path(step_settings, file_id)
    path.unlink()
    path.mkdir()
    body = {"input_file_id": file_id, "endpoint": CHAT}
    waiting = steps_client.post("/v1/batches", json=body, headers=alice).json()

    # Bob's batch is cancelled: it waits for a maintenance pass to write its files.
    healthy = start_batch(steps_client, bob, LINES)
    with session_scope(step_settings.database_url) as session:
        row = session.get(Batch, healthy["id"])
        assert row is not None
        batches.cancel_batch(session, row)

    for _ in range(4):  # more passes than the batch has tries: an outage costs none
        time.sleep(0.4)
        advance(step_settings, storage)
    with session_scope(step_settings.database_url) as session:
        bobs, alices = session.get(Batch, healthy["id"]), session.get(Batch, waiting["id"])
        assert bobs is not None and alices is not None
        assert bobs.status == BatchStatus.cancelled  # finalized in the same passes
        assert alices.status == BatchStatus.validating and alices.step_attempts == 0
        assert alices.step_error == "validation is waiting: object storage is unavailable"

    path.rmdir()
    path.write_bytes(b"\n".join(LINES))
    time.sleep(0.4)
    advance(step_settings, storage)
    shown = steps_client.get(f"/v1/batches/{waiting['id']}", headers=alice).json()
    assert shown["status"] == "in_progress", shown
    assert shown["request_counts"]["total"] == 3


def test_a_step_whose_process_dies_every_time_fails_its_batch(
    steps_client: TestClient, alice: dict[str, str], step_settings: Settings, storage: Storage
) -> None:
    file_id = upload(steps_client, alice, LINES)
    with session_scope(step_settings.database_url) as session:
        body = BatchCreate(input_file_id=file_id, endpoint=CHAT)
        batch, _ = batches.create_batch(session, "alice", body, step_settings)
        # What three processes that each took the step and died leave behind.
        batch.step_attempts = step_settings.batch_step_attempts
        batch.step_token = "dead"
        batch.lease_expires_at = utcnow() - timedelta(seconds=1)
        session.commit()
        batch_id = batch.id
    advance(step_settings, storage)
    shown = steps_client.get(f"/v1/batches/{batch_id}", headers=alice).json()
    assert shown["status"] == "failed", shown
    error = shown["errors"]["data"][0]
    assert error["code"] == "batch_processing_failed"
    assert error["message"] == (
        "the batch could not be processed in 3 tries: the process working on it stopped each time"
    )


def test_a_line_whose_stored_result_is_gone_becomes_an_error_line(
    steps_client: TestClient, alice: dict[str, str], step_settings: Settings, storage: Storage
) -> None:
    lines = [json.dumps(chat_line(f"kept-{n}")).encode() for n in (1, 2)]
    batch = start_batch(steps_client, alice, lines)
    keys = []
    with session_scope(step_settings.database_url) as session:
        for line in (1, 2):
            job_id = batches.line_job_id(batch["id"], line)
            [claim] = queries.claim_batch(
                session, "tiny-random-mistral", "w", 60, 1, first_id=job_id
            )
            assert claim.job.id == job_id
            _, key = place_response(storage, job_id, f"answer {line}", inline_max_bytes=0)
            assert key is not None
            keys.append(key)
            outcome = Outcome(2, "stop", None, key, Decimal(0), Decimal(0), 0.1)
            assert queries.record_success(session, claim, outcome)
    storage.delete(keys[0])

    def scope():  # type: ignore[no-untyped-def]
        return session_scope(step_settings.database_url)

    assert batches.finalize(scope, storage, step_settings, batch["id"])
    shown = steps_client.get(f"/v1/batches/{batch['id']}", headers=alice).json()
    assert shown["status"] == "completed", shown
    assert shown["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    output = steps_client.get(f"/v1/files/{shown['output_file_id']}/content", headers=alice)
    assert [json.loads(line)["custom_id"] for line in output.text.splitlines()] == ["kept-2"]
    errors = steps_client.get(f"/v1/files/{shown['error_file_id']}/content", headers=alice)
    [error] = [json.loads(line) for line in errors.text.splitlines()]
    assert error["custom_id"] == "kept-1" and error["error"]["code"] == "result_unavailable"


def test_a_batch_whose_last_line_is_cancelled_as_a_job_ends_at_once(
    steps_client: TestClient, alice: dict[str, str]
) -> None:
    batch = start_batch(steps_client, alice, [json.dumps(chat_line("only")).encode()])
    job_id = batches.line_job_id(batch["id"], 1)
    cancelled = steps_client.post(f"/v1/jobs/{job_id}/cancel", headers=alice)
    assert cancelled.json()["status"] == "cancelled"
    shown = steps_client.get(f"/v1/batches/{batch['id']}", headers=alice).json()
    assert shown["status"] == "completed", shown
    assert shown["request_counts"] == {"total": 1, "completed": 0, "failed": 1}
